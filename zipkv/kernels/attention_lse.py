"""Causal prompt attention that also returns every query row's log-sum-exp (CUDA only).

Fused attention kernels compute the row log-sum-exp anyway (their backward needs it) and
torch's cuDNN and flash ops return it; ZipCache's probe saliency then needs one pass over
the keys instead of two (zipkv.kernels.probe_scores.probe_scores_lse).

Which op: the one F.scaled_dot_product_attention itself picks for these inputs
(torch._fused_sdp_choice), so the prompt's attention costs what it cost before. On the H100
with torch 2.11 that is cuDNN (benchmarks/results/probe_lse*.json): the flash op took
1.6-1.8x as long there (+0.8 ms at 8K, +10-11.5 ms at 32K, twice the old two-pass probe
scoring). Both ops take grouped-query K/V as they are (32 query heads over 8 KV heads).
Any other choice (efficient, math), or a torch without these ops: None, and the caller runs
its usual SDPA path.

Only for the first prompt forward: q_len == kv_len, no mask. The ops' causal flag aligns
the mask top-left, which is right only when queries and keys start together; later chunks
keep the model's mask and the plain SDPA path.
"""

from __future__ import annotations

import torch

_DTYPES = (torch.float16, torch.bfloat16)


def _sdpa_choice(query, key, value, scaling) -> str | None:
    """The fused backend F.sdpa(is_causal=True, enable_gqa=True) would run: "cudnn",
    "flash", or None (another backend, or torch cannot say)."""
    try:
        from torch.nn.attention import SDPBackend

        choice = torch._fused_sdp_choice(query, key, value, None, 0.0, True, scale=scaling, enable_gqa=True)
        names = {int(SDPBackend.CUDNN_ATTENTION.value): "cudnn", int(SDPBackend.FLASH_ATTENTION.value): "flash"}
        return names.get(int(choice))
    except (AttributeError, RuntimeError, TypeError):
        return None


def causal_attention_lse(query, key, value, scaling: float):
    """(output [B, Hq, T, D], lse [B, Hq, T] float32) of causal attention with q_len ==
    kv_len, lse = log(sum_j exp(scaling * q.k_j)) in natural-log units (both ops, checked
    against a float32 reference on the GPU); None where neither op is SDPA's choice."""
    if query.device.type != "cuda" or query.dtype not in _DTYPES or key.dtype != query.dtype:
        return None
    if query.shape[2] != key.shape[2] or query.shape[1] % key.shape[1]:
        return None
    backend = _sdpa_choice(query, key, value, scaling)
    aten = torch.ops.aten
    try:
        if backend == "cudnn":
            out, lse = aten._scaled_dot_product_cudnn_attention(query, key, value, None, True, 0.0, True, False, scale=scaling)[:2]
            return out, lse.reshape(lse.shape[0], lse.shape[1], -1)  # cuDNN gives [B, H, T, 1]
        if backend == "flash":
            out, lse = aten._scaled_dot_product_flash_attention(query, key, value, 0.0, True, False, scale=scaling)[:2]
            return out, lse
    except (RuntimeError, NotImplementedError):  # an op SDPA chose but cannot run here: SDPA path
        return None
    return None
