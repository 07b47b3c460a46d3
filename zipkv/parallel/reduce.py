"""The reductions over KV heads that tensor parallelism needs, where a rule looks at every
head of a layer at once. Each is the identity without a HeadShard (one process).

Which methods need one (the rest score, select and quantize each KV head on its own, so each
rank computes exactly its heads' share of the single-process result):
- adakv: the layer's budget is handed out by a top-k over ALL heads' scores: the scores are
  gathered (`rule_counts`), every rank computes the same [B, H] budgets and keeps its columns.
- cake: the layer preference sums entropy and variance over heads: both sums are all-reduced
  (`sum_over_heads`) before the power law, so every rank gets the same layer budgets.
- zipvl, zipvl_v2: the tau-important count is over attention mass summed over all query heads
  (prefill probes and every decode block): all-reduced; sparse prefill's important set ranks
  tokens by the score averaged over KV heads: the scores are gathered first.
zipcache's probe saliency, kivi / zipkv / uniform (no saliency), snapkv / pyramidkv /
defensive_kv / key_norm / h2o / streaming_llm (per-head scores, row budgets), three_tier and
mikv (per-head scores, row counts) need none.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .shard import HeadShard


def sum_over_heads(shard: HeadShard | None, partial: torch.Tensor) -> torch.Tensor:
    """`partial` (a sum over this rank's heads) summed over every rank's heads."""
    if shard is None:
        return partial
    total = partial.detach().clone().contiguous()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=shard.group)
    return total


def gather_heads(shard: HeadShard | None, local: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Every rank's heads of `local` ([.., H_local, ..] along `dim`) in head order."""
    if shard is None:
        return local
    local = local.contiguous()
    parts = [torch.empty_like(local) for _ in range(shard.world_size)]
    dist.all_gather(parts, local, group=shard.group)
    return torch.cat(parts, dim=dim)


def local_heads(shard: HeadShard | None, full: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """This rank's slice of `full` along its head axis `dim`."""
    if shard is None:
        return full
    start, end = shard.local_range(full.shape[dim])
    return full.narrow(dim, start, end - start)


def rule_counts(shard: HeadShard | None, rule, scores: torch.Tensor, budgets, real, **context) -> torch.Tensor:
    """A budget rule (policies/select.py BUDGET_RULES) over every head's scores: int64 [B] or
    this rank's columns of [B, H]. Without a shard: the rule itself."""
    if shard is None:
        return rule(scores, budgets, real, **context)
    counts = rule(gather_heads(shard, scores), budgets, real, **context)
    return local_heads(shard, counts) if counts.dim() == 2 else counts
