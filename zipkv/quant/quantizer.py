"""Uniform asymmetric quantizer (methods.md section 1).

q = clip(round((x - min) / s), 0, 2^b - 1), s = (max - min) / (2^b - 1), x' = q * s + min.

Statistics are reduced over the axes the caller names, so the same two functions serve
channelwise keys, tokenwise values and KIVI groups. Arithmetic runs in float32 whatever the
input dtype; parameters are stored in a 16-bit dtype that can hold them (see `param_dtype`).
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 4, 8)
FP16_MAX = 65504.0
# A constant group has max == min: any positive step reproduces it exactly, so the step is
# floored (at the smallest normal number of its storage dtype) instead of dividing by zero.
MIN_STEP = 1e-8


def check_bits(bits: int, name: str = "bits") -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{name} must be one of {SUPPORTED_BITS} (got {bits!r})")
    return int(bits)


def param_dtype(x: torch.Tensor) -> torch.dtype:
    """16-bit dtype for scales and minimums of `x`: bf16 for bf16 data, else fp16 when the
    range fits in fp16, else float32 (fp32 models with huge activations)."""
    if x.dtype == torch.bfloat16:
        return torch.bfloat16
    if x.dtype == torch.float16:
        return torch.float16
    amax = x.detach().abs().amax() if x.numel() else x.new_zeros(())
    return torch.float16 if float(amax) < FP16_MAX / 2 else torch.float32


def quantize(x: torch.Tensor, bits: int, dims, out_dtype: torch.dtype | None = None, check_finite: bool = True,
             name: str = "states"):
    """Quantize `x` with one (scale, min) per slice obtained by reducing over `dims`.

    Returns (codes uint8 with x's shape, scale, minimum); scale/minimum keep the reduced dims
    (keepdim=True) so they broadcast against the codes. check_finite=False skips the NaN/inf
    check (a host wait) for callers that checked already (CUDA-graph block quantization);
    `name` is what the NaN/inf error calls `x` (keys, values).
    """
    check_bits(bits)
    xf = x.float()
    if check_finite and not torch.isfinite(xf).all():
        raise ValueError(f"cannot quantize {name} that contain NaN or inf")
    lo = xf.amin(dim=dims, keepdim=True)
    hi = xf.amax(dim=dims, keepdim=True)
    return quantize_range(xf, bits, lo, hi, out_dtype or param_dtype(x))


def quantize_range(xf: torch.Tensor, bits: int, lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype):
    """Quantize float32 `xf` onto 2^bits levels spanning [lo, hi] (values outside are clipped)."""
    levels = (1 << bits) - 1
    # Round the parameters to their storage dtype first, then quantize against the stored
    # values, so dequantization reproduces exactly what the codes were chosen for.
    lo = lo.to(dtype).float()
    floor = max(MIN_STEP, torch.finfo(dtype).tiny)
    step = ((hi - lo) / levels).clamp_min(floor)
    if dtype == torch.float16:
        step = step.clamp_max(FP16_MAX)
    step = step.to(dtype).float()
    codes = torch.round((xf - lo) / step).clamp_(0, levels).to(torch.uint8)
    return codes, step.to(dtype), lo.to(dtype)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, dtype=torch.float32):
    return (codes.float() * scale.float() + minimum.float()).to(dtype)
