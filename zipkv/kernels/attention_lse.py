"""Causal prompt attention that also returns every query row's log-sum-exp (CUDA only).

Flash attention computes the row log-sum-exp anyway (its backward needs it) and torch's
flash op returns it; ZipCache's probe saliency then needs one pass over the keys instead of
two (zipkv.kernels.probe_scores.probe_scores_lse). torch's flash op takes grouped-query K/V
as they are (32 query heads over 8 KV heads: no expanded copy), which is also what
F.scaled_dot_product_attention(..., enable_gqa=True) dispatches to.

Only for the first prompt forward: q_len == kv_len, no mask. The op's causal flag aligns
the mask top-left, which is right only when queries and keys start together; later chunks
keep the model's mask and the plain SDPA path.
"""

from __future__ import annotations

import torch

_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def flash_lse_supported(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Shapes and dtypes torch's flash op takes (its own checks, on the host side)."""
    d = query.shape[-1]
    return (
        query.device.type == "cuda"
        and query.dtype in _FLASH_DTYPES
        and key.dtype == query.dtype
        and d <= 256
        and d % 8 == 0
        and query.shape[2] == key.shape[2]
        and query.shape[1] % key.shape[1] == 0
        and torch.backends.cuda.flash_sdp_enabled()
    )


def causal_attention_lse(query, key, value, scaling: float):
    """(output [B, Hq, T, D], lse [B, Hq, T] float32) of causal attention with q_len ==
    kv_len, lse = log(sum_j exp(scaling * q.k_j)) in natural-log units; None where torch's
    flash op cannot run it (the caller then takes its usual SDPA path)."""
    if not flash_lse_supported(query, key):
        return None
    try:
        result = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, True, False, scale=scaling)
    except (RuntimeError, NotImplementedError):  # e.g. a GPU older than sm80, a torch built without flash
        return None
    return result[0], result[1]
