"""H2O's accumulated attention over a causal prompt (the prefill's heavy-hitter totals), with
its PyTorch reference:

    totals[b, h, j] = mean over the G query heads of KV head h of
                      sum over real queries i >= j of softmax_i(scaling * q_i . k)[j]

for real keys j (padding -inf), where query i's softmax runs over the real keys j' <= i; a
padding query adds nothing. The reference (`prefill_attention_mass_reference`) computes it a
chunk of queries at a time against the keys the chunk can see, in float32: its scores are
[B, Hkv, G, chunk, T] floats, which at 8 x 32K with 32 query heads is tens of GB per chunk
read and written again by the softmax and the sum (the eager h2o prefill: 150 s at 8 x 32K on
the H200, 24 s for SnapKV's). The Triton path (`_triton_prefill_mass.py`) never materializes a
score: one pass for each query's log-sum-exp, one for the column sums, both over the causal
half of QK^T (the work of one attention forward without the values); given the lse the prompt's
own flash attention returned, only the second.

Tests: tests/test_kernels_prefill_mass.py (Triton interpreter, against the reference and
against the eviction scorer's chunked accumulate).
"""

from __future__ import annotations

import torch

from ._runtime import use_triton

HEAD_DIMS = (16, 32, 64, 128, 256)
NEG_INF = float("-inf")


def check_prefill_mass(query, keys, real) -> None:
    if query.dim() != 4 or keys.dim() != 4 or query.shape[0] != keys.shape[0] or query.shape[2:] != keys.shape[2:]:
        raise ValueError(f"query [B, Hq, T, D] and keys [B, Hkv, T, D] must share B, T and D (got "
                         f"{tuple(query.shape)}, {tuple(keys.shape)})")
    if query.shape[1] % keys.shape[1]:
        raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of KV heads ({keys.shape[1]})")
    b, _, t, _ = query.shape
    if real.shape != (b, t) or real.dtype != torch.bool:
        raise ValueError(f"real must be bool [B, T] = {(b, t)} (got {real.dtype} {tuple(real.shape)})")


def prefill_attention_mass_reference(query, keys, real, scaling: float, query_chunk: int = 512) -> torch.Tensor:
    """The module docstring's totals, float32 [B, Hkv, T], in chunks of query_chunk queries."""
    b, hq, t, d = query.shape
    hkv = keys.shape[1]
    g = hq // hkv
    totals = torch.zeros(b, hkv, t, dtype=torch.float32, device=keys.device)
    k = keys.float()[:, :, None]  # [B, Hkv, 1, T, D]
    key_pos = torch.arange(t, device=keys.device)
    for start in range(0, t, query_chunk):
        stop = min(start + query_chunk, t)
        q = query[:, :, start:stop].float().reshape(b, hkv, g, stop - start, d)
        logits = (q @ k[..., :stop, :].transpose(-1, -2)) * scaling  # [B, Hkv, G, chunk, stop]
        causal = key_pos[None, :stop] <= torch.arange(start, stop, device=keys.device)[:, None]
        visible = causal[None] & real[:, None, :stop] & real[:, start:stop, None]  # [B, chunk, stop]
        logits = logits.masked_fill(~visible[:, None, None], NEG_INF)
        seen = visible.any(-1)[:, None, None, :, None]
        probs = torch.softmax(logits.masked_fill(~seen, 0.0), dim=-1) * seen
        totals[..., :stop] += probs.sum(dim=3).mean(dim=2)
    return totals.masked_fill(~real[:, None, :], NEG_INF)


def kernel_takes(query, keys, impl: str) -> bool:
    if not use_triton(query.device, impl) or query.shape[-1] not in HEAD_DIMS or query.dtype != keys.dtype:
        return False
    return query.stride(-1) == 1 and keys.stride(-1) == 1 and query.dtype in (torch.float16, torch.bfloat16,
                                                                                  torch.float32)


def prefill_attention_mass(query, keys, real, scaling: float, impl: str = "auto",
                           query_chunk: int = 512, lse: torch.Tensor | None = None) -> torch.Tensor:
    """The totals (module docstring), float32 [B, Hkv, T]: query [B, Hq, T, D], keys [B, Hkv,
    T, D] of one causal prompt (query i at position i), real bool [B, T]; query_chunk: the
    reference path's queries per chunk (its memory). lse: each query's log-sum-exp of its
    scaled scores over the keys it sees (natural log, [B, Hq, T]: what the prompt's flash /
    cuDNN attention returns, kernels/attention_lse.py); the Triton path then skips its own
    log-sum-exp pass (half its work), the reference recomputes it."""
    check_prefill_mass(query, keys, real)
    if lse is not None and tuple(lse.shape) != tuple(query.shape[:3]):
        raise ValueError(f"lse must be [B, Hq, T] = {tuple(query.shape[:3])} (got {tuple(lse.shape)})")
    if query.shape[2] == 0 or not kernel_takes(query, keys, impl):
        if impl == "triton":
            raise ValueError(f"impl='triton' cannot run this shape (head_dim {query.shape[-1]} of {HEAD_DIMS}, "
                             f"{query.dtype} query and {keys.dtype} keys, unit last strides)")
        return prefill_attention_mass_reference(query, keys, real, scaling, query_chunk)
    from ._triton_prefill_mass import prefill_mass_triton

    totals = prefill_mass_triton(query, keys, real, scaling, lse=lse)
    return totals.masked_fill(~real[:, None, :], NEG_INF)


__all__ = ["HEAD_DIMS", "check_prefill_mass", "prefill_attention_mass", "prefill_attention_mass_reference"]
