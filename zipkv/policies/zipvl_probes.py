"""ZipVL's probe queries and important set (He et al. 2024, arXiv 2410.08584): the pieces of
TieredPolicy's rule 'zipvl' that are pure functions of the prompt's padding and scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..eviction import rank_tokens


@dataclass
class ZipVLSelection:
    """One layer's ZipVL prefill selection, computed once from the probe queries.

    scores: float32 [B, Hkv, T] normalized probe score (which tokens, per KV head; -inf padding);
    high: int64 [B] important count (tau rule, capped at budget / ratio);
    important: bool [B, T] the row's important set T for sparse prefill (None when off)."""

    positions: torch.Tensor
    scores: torch.Tensor
    high: torch.Tensor
    important: torch.Tensor | None = None


def important_set(scores: torch.Tensor, high: torch.Tensor, real: torch.Tensor,
                  recent: torch.Tensor) -> torch.Tensor:
    """bool [B, T]: ZipVL's important set T of each row for sparse prefill: the high[b] best
    real tokens by the normalized score averaged over KV heads (scores [B, Hkv, T], padding
    -inf), plus the recent probe positions `recent` [R] and the last token; padding never."""
    row = scores.mean(dim=1)  # padding stays -inf (it is -inf in every head)
    ranks = rank_tokens(row)
    important = ranks < high.to(row.device)[:, None]
    important[:, recent.to(row.device)] = True
    important[:, -1] = True
    return important & real.to(row.device)


def _first_real(real: torch.Tensor, unpadded: bool) -> int:
    """The first position real in every row; unpadded: the caller knows there is no padding
    (no device read)."""
    return 0 if unpadded else int((~real).sum(1).max())


def recent_probe_positions(real: torch.Tensor, recent: int, unpadded: bool = False) -> torch.Tensor:
    """int64 [R]: the recent probe positions, the last `recent` positions that are real in
    every row of real [B, T] (fewer when the shortest row is shorter)."""
    t = real.shape[1]
    first_real = _first_real(real, unpadded)
    return torch.arange(t - min(recent, t - first_real), t, device=real.device)


def probe_positions(real: torch.Tensor, recent: int, random: int, seed: int, unpadded: bool = False) -> torch.Tensor:
    """int64 [P] on the host: probe query positions shared by every row: the `recent` last
    positions plus `random` seeded positions among the earlier ones that are real in every
    row (on the host, so that window_attention range-checks them without a device read)."""
    t = real.shape[1]
    first_real = _first_real(real, unpadded)
    recent_pos = torch.arange(t - min(recent, t - first_real), t)  # recent_probe_positions, on the host
    n_recent = len(recent_pos)
    pool = t - n_recent - first_real
    n_random = min(random, max(pool, 0))
    if n_random <= 0:
        return recent_pos
    generator = torch.Generator().manual_seed(seed)
    random_pos = first_real + torch.randperm(pool, generator=generator)[:n_random]
    return torch.cat([random_pos.sort().values, recent_pos])


__all__ = ["ZipVLSelection", "important_set", "probe_positions", "recent_probe_positions"]
