"""zipkv caches on sharded models: tensor parallel (`tp_plan="auto"`, one rank per KV-head
slice) and pipeline / device_map placement checks."""

from .placement import cache_layer_devices, check_one_device, check_placement, layer_device_map
from .reduce import gather_heads, local_heads, rule_counts, sum_over_heads
from .shard import HeadShard, head_shard_of, head_shard_of_model, make_tp_cache, shard_cache, tp_group_of
from .stats import ShardedStats, sharded_stats, split_bytes

__all__ = ["HeadShard", "ShardedStats", "cache_layer_devices", "check_one_device", "check_placement",
           "layer_device_map", "gather_heads", "head_shard_of", "head_shard_of_model", "local_heads",
           "make_tp_cache", "rule_counts", "shard_cache", "sharded_stats", "split_bytes", "sum_over_heads",
           "tp_group_of"]
