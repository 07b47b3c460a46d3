"""Which slice of a layer's KV heads this process holds under tensor parallelism.

transformers' `tp_plan="auto"` shards k_proj / v_proj column-wise (DTensor `Shard(0)`), so the
attention module of rank r computes, and hands the cache, KV heads [r * H / R, (r + 1) * H / R)
(contiguous; a GQA group's query heads live on the rank of their KV head). A zipkv cache
therefore already sizes itself from the local head count: its layers allocate on their first
update from the states they receive. What it cannot see alone is the other ranks' heads; the
few rules that aggregate over heads ask the cache's `HeadShard` (parallel/reduce.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class HeadShard:
    """This rank's place among the `world_size` ranks that split every layer's KV heads.

    group: the tensor-parallel process group (None: the default group)."""

    rank: int
    world_size: int
    group: object = None

    def __post_init__(self):
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"world_size must be an integer >= 1 (got {self.world_size!r})")
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be an integer in [0, {self.world_size - 1}] (got {self.rank!r})")

    def local_range(self, num_heads: int) -> tuple[int, int]:
        """[start, end) of this rank's heads among `num_heads` (a multiple of world_size)."""
        if num_heads % self.world_size:
            raise ValueError(f"{num_heads} KV heads do not split over {self.world_size} ranks")
        per_rank = num_heads // self.world_size
        return self.rank * per_rank, (self.rank + 1) * per_rank


def tp_group_of(model):
    """The tensor-parallel process group of a model loaded with `tp_plan=...`, read from its
    first DTensor parameter's device mesh; None when no parameter is a DTensor."""
    from torch.distributed.tensor import DTensor

    for parameter in model.parameters():
        if isinstance(parameter, DTensor):
            mesh = parameter.device_mesh
            return mesh.get_group(mesh.mesh_dim_names[-1]) if mesh.mesh_dim_names else mesh.get_group()
    return None


def head_shard_of_model(model) -> HeadShard | None:
    """The HeadShard of a tensor-parallel model (None for a model on one process)."""
    group = tp_group_of(model)
    if group is None:
        return None
    return HeadShard(rank=dist.get_rank(group), world_size=dist.get_world_size(group), group=group)


def shard_cache(cache, model_or_shard):
    """Tell `cache` (any zipkv cache) which KV heads its rank holds: a HeadShard, or a model
    loaded with `tp_plan=...` (its group is found; a model without one leaves the cache alone).
    Returns the cache. Needed by methods whose rules aggregate over heads (adakv, cake, zipvl,
    zipvl_v2: parallel/reduce.py); harmless for the others."""
    shard = model_or_shard if isinstance(model_or_shard, HeadShard) or model_or_shard is None \
        else head_shard_of_model(model_or_shard)
    cache.head_shard = shard
    return cache


def make_tp_cache(method: str, model, **params):
    """`zipkv.make_cache(method, model.config, **params)` for a tensor-parallel model, sharded."""
    from ..methods import make_cache

    return shard_cache(make_cache(method, model.config, **params), model)


def head_shard_of(layer) -> HeadShard | None:
    """The HeadShard of the cache owning `layer` (None on one process or for a lone layer)."""
    owner = getattr(layer, "owner", None)
    shard = getattr(owner, "head_shard", None)
    return shard if shard is not None and shard.world_size > 1 else None
