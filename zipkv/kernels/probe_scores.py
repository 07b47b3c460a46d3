"""Probe saliency (ZipCache normalized attention score) without materializing probabilities.

probe_scores(query [B, Hq, P, D] (the probe rows), keys [B, Hkv, T, D], probe_pos [P]
(key index of each probe row: it sees keys <= its position), key_mask [B, T] bool or None,
scaling) -> (normalized [B, Hkv, T], accumulated [B, Hkv, T], counts [B, 1, T]), float32,
exactly the contract of zipkv.saliency.attention_scores (the reference): sums over probe rows,
mean over the query heads of each GQA group, counts = probe rows that see each key,
normalized = accumulated / max(counts, 1).
"""

from __future__ import annotations

import torch

from ._runtime import use_triton


def allowed_from_positions(probe_pos: torch.Tensor, key_mask: torch.Tensor | None, batch: int, kv_len: int, device):
    keys = torch.arange(kv_len, device=device)
    allowed = keys[None, :] <= probe_pos.to(device)[:, None]  # [P, T]
    allowed = allowed[None, None].expand(batch, 1, -1, -1)
    if key_mask is not None:
        allowed = allowed & key_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    return allowed


def probe_scores_reference(query, keys, probe_pos, key_mask=None, scaling=None):
    from ..saliency import attention_scores

    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    allowed = allowed_from_positions(probe_pos, key_mask, query.shape[0], keys.shape[2], keys.device)
    return attention_scores(query, keys, allowed, scaling)


def probe_scores(query, keys, probe_pos, key_mask=None, scaling=None, impl: str = "auto", **tuning):
    if query.dim() != 4 or keys.dim() != 4 or query.shape[0] != keys.shape[0] or query.shape[-1] != keys.shape[-1]:
        raise ValueError(f"query [B, Hq, P, D] and keys [B, Hkv, T, D] do not match: {tuple(query.shape)}, {tuple(keys.shape)}")
    if query.shape[1] % keys.shape[1]:
        raise ValueError(f"query heads {query.shape[1]} must be a multiple of the KV heads {keys.shape[1]}")
    if probe_pos.dim() != 1 or probe_pos.shape[0] != query.shape[2]:
        raise ValueError(f"probe_pos must be [P={query.shape[2]}] (got {tuple(probe_pos.shape)})")
    if key_mask is not None and tuple(key_mask.shape) != (keys.shape[0], keys.shape[2]):
        raise ValueError(f"key_mask must be [B, T] = {(keys.shape[0], keys.shape[2])} (got {tuple(key_mask.shape)})")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    d = query.shape[-1]
    if not use_triton(query.device, impl) or d not in (32, 64, 128, 256) or query.shape[2] == 0:
        return probe_scores_reference(query, keys, probe_pos, key_mask, scaling)
    from ._triton_probe import probe_scores_triton

    return probe_scores_triton(query, keys, probe_pos, key_mask, scaling, **tuning)


def probe_scores_lse(query, keys, probe_pos, lse, scaling=None, rows=None, impl: str = "auto", positions_sorted=False, **tuning):
    """probe_scores for causal probes whose log-sum-exp the model's attention already gave
    (one pass over the keys instead of two; no key mask). query [B, Hq, Tq, D], lse
    [B, Hq, >= Tq] float32, natural log of sum_j exp(scaling * q.k_j) over the keys the row
    saw; rows [P] (None: every query row is a probe) picks the probe rows of both, probe_pos
    [P] their key positions (positions_sorted: the caller guarantees they ascend, which saves
    a sort on the device). Same return contract as probe_scores."""
    if query.dim() != 4 or keys.dim() != 4 or query.shape[0] != keys.shape[0] or query.shape[-1] != keys.shape[-1]:
        raise ValueError(f"query [B, Hq, Tq, D] and keys [B, Hkv, T, D] do not match: {tuple(query.shape)}, {tuple(keys.shape)}")
    if query.shape[1] % keys.shape[1]:
        raise ValueError(f"query heads {query.shape[1]} must be a multiple of the KV heads {keys.shape[1]}")
    if lse.dim() != 3 or tuple(lse.shape[:2]) != tuple(query.shape[:2]) or lse.shape[2] < query.shape[2]:
        raise ValueError(f"lse must be [B, Hq, >= Tq] for query {tuple(query.shape)} (got {tuple(lse.shape)})")
    n = query.shape[2] if rows is None else rows.numel()
    if probe_pos.dim() != 1 or probe_pos.shape[0] != n:
        raise ValueError(f"probe_pos must be [P={n}] (got {tuple(probe_pos.shape)})")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if not use_triton(query.device, impl) or query.shape[-1] not in (32, 64, 128, 256) or n == 0:
        picked = query if rows is None else query[:, :, rows.to(query.device)]
        return probe_scores_reference(picked, keys, probe_pos, None, scaling)
    from ._triton_probe_lse import probe_scores_lse_triton

    if lse.dtype != torch.float32:
        lse = lse.float()
    return probe_scores_lse_triton(query, keys, probe_pos, lse, scaling, rows, positions_sorted, **tuning)


__all__ = ["probe_scores", "probe_scores_lse", "probe_scores_reference", "allowed_from_positions"]
