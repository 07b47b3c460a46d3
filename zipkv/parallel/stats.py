"""A tensor-parallel cache's bytes: this rank's, every rank's, and their total.

Each rank's `cache.stats()` counts exactly the tensors that rank holds. They split in two:
- head-sharded: codes, scales, fp16 states, per-head scores ([B, H_local, ...] floats / uint8):
  the single-process cache's tensors cut along the KV-head axis, so they sum over ranks to
  exactly the single-process figure (for methods whose selections the ranks share: see
  parallel/reduce.py);
- bookkeeping: bool / integer tensors (padding and sink masks [B, T], key-group and value-chunk
  ends, varlen offsets) and the saliency counts shared by a row's heads (`score_count`,
  `recent_score_count`, float [B, 1, T]): the same rows on every rank, so held once per rank;
  except a ragged store's offsets (adakv, cake), one per (row, local head) + 1 on each rank.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from ..cache.stats import held_tensors_of, tensor_bytes
from .shard import HeadShard


# float tensors of a layer with one entry per row and token, shared by its heads ([B, 1, T])
ROW_ATTRIBUTES = ("score_count", "recent_score_count")


def is_bookkeeping(tensor: torch.Tensor) -> bool:
    """A bool / integer tensor: row bookkeeping every rank holds whole, not cut by KV head."""
    return tensor.dtype == torch.bool or not (tensor.dtype.is_floating_point or tensor.dtype == torch.uint8)


def split_bytes(cache) -> tuple[int, int]:
    """(head-sharded bytes, bookkeeping bytes) of every tensor `cache` holds on this process."""
    sharded = bookkeeping = 0
    for layer in cache.layers:
        rows = {id(getattr(layer, name, None)) for name in ROW_ATTRIBUTES}
        for tensor in held_tensors_of(layer):
            if tensor is None:
                continue
            if id(tensor) in rows or is_bookkeeping(tensor):
                bookkeeping += tensor_bytes([tensor])
            else:
                sharded += tensor_bytes([tensor])
    return sharded, bookkeeping


@dataclass(frozen=True)
class ShardedStats:
    """rank_bytes: what this rank holds (= its cache.stats().bytes_held); ranks_bytes: each
    rank's; total_bytes: all ranks together; sharded_total: the head-sharded part summed over
    ranks (= a single-process cache's non-bookkeeping bytes); bookkeeping_bytes: this rank's
    replicated part; fp16_bytes: the fp16-equivalent of all ranks' heads; ratio over those."""

    rank: int
    world_size: int
    rank_bytes: int
    ranks_bytes: list
    total_bytes: int
    sharded_total: int
    bookkeeping_bytes: int
    fp16_bytes: int

    @property
    def ratio(self) -> float:
        return self.fp16_bytes / self.total_bytes if self.total_bytes else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


def sharded_stats(cache, shard: HeadShard | None = None) -> ShardedStats:
    """Collective (every rank of the shard's group calls it): this rank's and the total bytes.
    shard: the cache's own (`shard_cache`) unless given; none: one process, nothing reduced."""
    shard = shard if shard is not None else getattr(cache, "head_shard", None)
    stats = cache.stats()
    sharded, bookkeeping = split_bytes(cache)
    if stats.bytes_held != sharded + bookkeeping:
        raise RuntimeError(f"stats() counts {stats.bytes_held} bytes but the held tensors are {sharded + bookkeeping}")
    mine = torch.tensor([stats.bytes_held, sharded, stats.fp16_bytes], dtype=torch.int64)
    if shard is None or shard.world_size == 1:
        every = [mine]
    else:
        every = [torch.empty_like(mine) for _ in range(shard.world_size)]
        dist.all_gather(every, mine, group=shard.group)
    rank = 0 if shard is None else shard.rank
    return ShardedStats(
        rank=rank, world_size=len(every), rank_bytes=int(mine[0]), ranks_bytes=[int(e[0]) for e in every],
        total_bytes=sum(int(e[0]) for e in every), sharded_total=sum(int(e[1]) for e in every),
        bookkeeping_bytes=bookkeeping, fp16_bytes=sum(int(e[2]) for e in every))
