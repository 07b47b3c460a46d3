"""The append step of a static baseline layer (`full` / `fp8` / `int4`, cache/static_flash_layer.py),
fused into one launch on CUDA (Triton), with its PyTorch reference:

    token_append(keys, values, seg, lengths, nonfinite)

keys/values [B, H, 1, D] (this step's token) go into the FlashSegment's capacity buffers
[B, H, N, .] at slot lengths[b] of each row b: a copy ("dense"), or quantized per token-head as
zipkv/quant/token_head.py does (fp8 codes + float32 scale; int4 packed codes + 16-bit scale and
zero); nonfinite (bool scalar) |= any NaN/inf among them; then lengths += 1. lengths is int32 [B]
on the device, read and advanced there: nothing syncs, so a CUDA graph captures the step.

- `token_append_reference`: quantize_token_head then a scatter per buffer (10-20 tiny launches).
- `token_append`: the Triton kernel of _triton_token_append.py where `append_supported` takes the
  inputs (bit-exact with the reference: same codes, scales and zeros), else the reference; under
  torch.compile one custom op (kernels/ops.py). Tests: tests/test_token_append.py (interpreter),
  tests/test_gpu_token_append.py (CUDA).
"""

from __future__ import annotations

import torch

from ..quant.token_head import int4_param_dtype, quantize_token_head
from ._runtime import use_triton
from .flash_decode import FLASH_FORMS, FlashSegment

HEAD_DIMS = (16, 32, 64, 128, 256)
STATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def raw(t: torch.Tensor) -> torch.Tensor:
    """fp8 codes as uint8 (the same bytes): gather / scatter have no float8 kernels on the CPU."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def check_append_inputs(keys, values, seg: FlashSegment, lengths, nonfinite) -> None:
    if seg.form not in FLASH_FORMS:
        raise ValueError(f"segment form must be one of {FLASH_FORMS} (got {seg.form!r})")
    b, h, _ = seg.k.shape[:3]
    want = (b, h, 1, seg.head_dim)
    if keys.shape != want or values.shape != want:
        raise ValueError(f"keys and values must be [B, H, 1, D] = {want} (got {tuple(keys.shape)}, "
                         f"{tuple(values.shape)})")
    if lengths.dtype != torch.int32 or lengths.shape != (b,) or lengths.device != seg.k.device:
        raise ValueError(f"lengths must be int32 [{b}] on {seg.k.device} (got {lengths.dtype} "
                         f"{tuple(lengths.shape)} on {lengths.device})")
    if nonfinite.dtype != torch.bool or nonfinite.dim() != 0:
        raise ValueError(f"nonfinite must be a bool scalar tensor (got {nonfinite.dtype} {tuple(nonfinite.shape)})")


def token_append_reference(keys, values, seg: FlashSegment, lengths, nonfinite) -> None:
    nonfinite |= ~(torch.isfinite(keys).all() & torch.isfinite(values).all())
    slot = lengths.long()[:, None, None]  # [B, 1, 1]
    if seg.form == "dense":
        parts = [(seg.k, keys.to(seg.k.dtype)), (seg.v, values.to(seg.v.dtype))]
    else:
        k, v = quantize_token_head(keys, seg.form), quantize_token_head(values, seg.form)
        parts = [(seg.k, k.codes), (seg.v, v.codes), (seg.k_scale, k.scale), (seg.v_scale, v.scale),
                 (seg.k_zero, k.zero), (seg.v_zero, v.zero)]
    for buffer, new in parts:
        if buffer is None:
            continue
        index = slot.view(-1, 1, 1, *([1] * (buffer.dim() - 3))).expand(*new.shape)
        raw(buffer).scatter_(2, index, raw(new))
    lengths += 1


def append_supported(keys, values, seg: FlashSegment) -> str | None:
    """None when the Triton kernel takes these inputs, else why not (callers fall back)."""
    d = keys.shape[-1]
    if d not in HEAD_DIMS:
        return f"head_dim {d} is not one of {HEAD_DIMS}"
    if keys.dtype not in STATE_DTYPES or values.dtype != keys.dtype:
        return f"keys / values dtypes {keys.dtype}, {values.dtype} (one of {STATE_DTYPES} for both)"
    if any(t.stride(-1) != 1 for t in [keys, values] + seg.tensors()):
        return "every tensor needs a unit last stride"
    params = [t for t in (seg.k_scale, seg.v_scale, seg.k_zero, seg.v_zero) if t is not None]
    if any(t.stride() != params[0].stride() for t in params):
        return "scales and zeros must share strides"
    want = {"dense": (keys.dtype, None), "fp8": (torch.float8_e4m3fn, torch.float32),
            "int4": (torch.uint8, int4_param_dtype(keys.dtype))}[seg.form]
    if (seg.k.dtype, seg.v.dtype) != (want[0], want[0]) or any(t.dtype != want[1] for t in params):
        return (f"{seg.form} buffers of {seg.k.dtype} (parameters {[t.dtype for t in params]}) for {keys.dtype} "
                f"states: the kernel writes {want[0]} (parameters {want[1]}), it never casts")
    return None


def token_append(keys, values, seg: FlashSegment, lengths, nonfinite, impl: str = "auto") -> None:
    """This step's token into `seg` at each row's lengths[b], nonfinite |= NaN/inf, lengths += 1
    (module docstring)."""
    check_append_inputs(keys, values, seg, lengths, nonfinite)
    if impl == "auto":
        from . import ops

        if ops.tracing():  # torch.compile: one custom op (kernels/ops.py) instead of a graph break
            return ops.token_append_op(keys, values, seg.form, seg.k, seg.v, seg.k_scale, seg.v_scale, seg.k_zero,
                                       seg.v_zero, lengths, nonfinite)
    if use_triton(seg.k.device, impl):
        reason = append_supported(keys, values, seg)
        if reason is None:
            from ._triton_token_append import token_append_triton

            return token_append_triton(keys, values, seg, lengths, nonfinite)
        if impl == "triton":
            raise ValueError(f"impl='triton' cannot run this append: {reason}")
    token_append_reference(keys, values, seg, lengths, nonfinite)


__all__ = ["append_supported", "check_append_inputs", "raw", "token_append", "token_append_reference"]
