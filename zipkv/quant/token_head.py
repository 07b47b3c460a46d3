"""Per token-head quantization: one scale (and zero) per token and KV head, over the head's channels.

What serving engines store: fp8 e4m3 codes with one float32 scale per token and head
(vLLM's `--kv-cache-dtype fp8` with per-token-head scales), and int4 codes, two per byte, with
a 16-bit scale and zero per token and head (asymmetric). A token is quantized alone, so a new
token is quantized when it is appended: no block, no flush, and left padding never widens a
real token's range.

    fp8:  x' = code * scale, scale = amax(|x|) / 448 (e4m3's largest finite value), float32
    int4: x' = code * scale + zero, code in 0..15, plane-packed like every zipkv tier
          (byte j: channel j in the low nibble, channel j + D/2 in the high one)

Every function here is a fixed sequence of tensor ops (no host wait), so a CUDA graph can
capture it; NaN/inf inputs give NaN/inf outputs and are the caller's to check.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import pack, unpack
from .quantizer import quantize

FORMS = ("fp8", "int4")
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
FP8_MIN_SCALE = 1e-12  # an all-zero token: any positive scale reproduces it


def check_form(form: str) -> str:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS} (got {form!r})")
    return form


def int4_param_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scale and zero of int4 codes: bf16 for bf16 states (their range), else fp16."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


@dataclass
class TokenCodes:
    """One side (keys or values) of tokens [B, H, N, D] quantized per token-head: codes
    (fp8 [B, H, N, D] float8_e4m3fn, or int4 [B, H, N, D/2] uint8), scale [B, H, N]
    (float32 / 16-bit), zero [B, H, N] (int4) or None (fp8)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.scale, self.zero) if t is not None]


def quantize_token_head(x: torch.Tensor, form: str) -> TokenCodes:
    """x [B, H, N, D] (any float dtype) -> its codes in `form`."""
    check_form(form)
    xf = x.float()
    if form == "fp8":
        scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(FP8_MIN_SCALE)
        # clamped: a quotient a rounding past 448 would cast to NaN (e4m3fn has no inf)
        codes = (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return TokenCodes(codes, scale[..., 0], None)
    codes, scale, zero = quantize(xf, 4, dims=-1, out_dtype=int4_param_dtype(x.dtype), check_finite=False)
    return TokenCodes(pack(codes, 4), scale[..., 0], zero[..., 0])


def dequantize_token_head(codes: TokenCodes, form: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The states [B, H, N, D] the codes stand for, in `dtype` (arithmetic in float32)."""
    check_form(form)
    scale = codes.scale.float()[..., None]
    if form == "fp8":
        return (codes.codes.float() * scale).to(dtype)
    return (unpack(codes.codes, 4).float() * scale + codes.zero.float()[..., None]).to(dtype)


def bits_per_value(form: str, head_dim: int) -> float:
    """Bits held per stored K/V element: the codes plus the per token-head parameters."""
    check_form(form)
    if form == "fp8":
        return 8 + 32 / head_dim
    return 4 + 2 * 16 / head_dim


__all__ = ["FORMS", "FP8_MAX", "TokenCodes", "bits_per_value", "check_form", "dequantize_token_head",
           "int4_param_dtype", "quantize_token_head"]
