"""Flash-decoding over a cache stored per token-head, with each batch row's exact valid length.

    out = flash_decode(query, segment, lengths, scale)   # query [B, Hq, 1, D] -> [B, Hq, 1, D]

`segment` (`FlashSegment`) holds capacity buffers [B, Hkv, N, .] in one of three forms:
"dense" (keys/values in the model's dtype), "fp8" (float8_e4m3fn codes [B, Hkv, N, D] and a
float32 scale [B, Hkv, N] per token-head), "int4" (uint8 [B, Hkv, N, D/2], two plane-packed
codes per byte, scale and zero [B, Hkv, N]; zipkv/quant/token_head.py makes them). Row b
attends to its first lengths[b] tokens (int32 [B] on the device: read there, so a CUDA
graph replays the call unchanged); query head i reads KV head i // (Hq / Hkv) (GQA).

- `flash_decode_reference`: dequantize to float32, mask past each length, softmax. Every
  input stays on the device (no host wait), at the cost of reading the whole capacity.
- `flash_decode`: on CUDA (or impl="triton" under TRITON_INTERPRET=1) the Triton kernel of
  _triton_flash_decode.py (the sequence split in blocks across programs, programs past a row's
  length exit at once, then a log-sum-exp merge); elsewhere, or for shapes it does not take
  (`supported` says why), the reference. Tests: tests/test_flash_decode.py (interpreter),
  tests/test_gpu_flash_decode.py (CUDA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..quant.token_head import TokenCodes, dequantize_token_head
from ._runtime import sm_count, use_triton

FLASH_FORMS = ("dense", "fp8", "int4")
HEAD_DIMS = (32, 64, 128, 256)


@dataclass
class FlashSegment:
    """What flash_decode reads: keys and values [B, Hkv, N, D] ("dense") or their codes with
    per token-head scale (and zero) [B, Hkv, N] (module docstring)."""

    form: str
    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    k_zero: torch.Tensor | None = None
    v_zero: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3] * (2 if self.form == "int4" else 1)

    def dequantize(self, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) [B, Hkv, N, D] over the whole capacity."""
        if self.form == "dense":
            return self.k.to(dtype), self.v.to(dtype)
        keys = TokenCodes(self.k, self.k_scale, self.k_zero)
        values = TokenCodes(self.v, self.v_scale, self.v_zero)
        return dequantize_token_head(keys, self.form, dtype), dequantize_token_head(values, self.form, dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.k, self.v, self.k_scale, self.v_scale, self.k_zero, self.v_zero) if t is not None]


def check_flash_inputs(query, seg: FlashSegment, lengths) -> None:
    if seg.form not in FLASH_FORMS:
        raise ValueError(f"segment form must be one of {FLASH_FORMS} (got {seg.form!r})")
    if query.dim() != 4 or query.shape[2] != 1:
        raise ValueError(f"query must be [B, Hq, 1, D] (got shape {tuple(query.shape)})")
    b, hq, _, d = query.shape
    if seg.k.dim() != 4 or seg.k.shape != seg.v.shape or seg.k.shape[0] != b or seg.head_dim != d:
        raise ValueError(f"segment keys/values must be [B={b}, Hkv, N, {d if seg.form != 'int4' else d // 2}] "
                         f"(got {tuple(seg.k.shape)}, {tuple(seg.v.shape)})")
    hkv = seg.k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of the KV heads {hkv}")
    needs = {"dense": (), "fp8": ("k_scale", "v_scale"), "int4": ("k_scale", "v_scale", "k_zero", "v_zero")}[seg.form]
    for name in needs:
        t = getattr(seg, name)
        if t is None or t.shape != seg.k.shape[:3]:
            raise ValueError(f"segment {name} must be [B, Hkv, N] = {tuple(seg.k.shape[:3])} for form {seg.form!r}")
    if lengths.dtype != torch.int32 or lengths.shape != (b,) or lengths.device != query.device:
        raise ValueError(f"lengths must be int32 [{b}] on {query.device} (got {lengths.dtype} "
                         f"{tuple(lengths.shape)} on {lengths.device})")


def flash_decode_reference(query, seg: FlashSegment, lengths, scale: float | None = None) -> torch.Tensor:
    check_flash_inputs(query, seg, lengths)
    b, hq, _, d = query.shape
    r = hq // seg.k.shape[1]
    keys, values = (x.repeat_interleave(r, dim=1) for x in seg.dequantize(torch.float32))
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = (query.float() @ keys.transpose(-1, -2)) * scale  # [B, Hq, 1, N]
    valid = torch.arange(seg.capacity, device=query.device)[None, :] < lengths.long()[:, None]
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row of length 0 attends nothing: 0
    return (p @ values).to(query.dtype)


def supported(query, seg: FlashSegment) -> str | None:
    """None when the Triton kernel takes these shapes, else why not (callers fall back)."""
    d = query.shape[-1]
    if d not in HEAD_DIMS:
        return f"head_dim {d} is not one of {HEAD_DIMS}"
    if query.shape[1] // seg.k.shape[1] > 64:
        return "more than 64 query heads per KV head"
    if query.stride(-1) != 1 or any(t.stride(-1) != 1 for t in seg.tensors()):
        return "every tensor needs a unit last stride"
    params = [t for t in (seg.k_scale, seg.v_scale, seg.k_zero, seg.v_zero) if t is not None]
    if any(t.stride() != params[0].stride() for t in params):
        return "scales and zeros must share strides"
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"query dtype {query.dtype}"
    return None


def flash_decode(query, seg: FlashSegment, lengths, scale: float | None = None, impl: str = "auto",
                 **tuning) -> torch.Tensor:
    """Attention output [B, Hq, 1, D] in query's dtype (module docstring). `tuning` (kernel
    path): block_n, num_splits, num_warps, num_stages."""
    check_flash_inputs(query, seg, lengths)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if impl == "auto" and not tuning:
        from . import ops

        if ops.tracing():  # torch.compile: one custom op (kernels/ops.py) instead of a graph break
            return ops.flash_decode_op(query, seg.form, seg.k, seg.v, seg.k_scale, seg.v_scale, seg.k_zero, seg.v_zero,
                                       lengths, float(scale))
    if use_triton(query.device, impl):
        reason = supported(query, seg)
        if reason is None:
            from ._triton_flash_decode import flash_decode_triton

            return flash_decode_triton(query, seg, lengths, scale, 4 * sm_count(query.device), **tuning)
        if impl == "triton":
            raise ValueError(f"impl='triton' cannot run this shape: {reason}")
    return flash_decode_reference(query, seg, lengths, scale)


__all__ = ["FLASH_FORMS", "FlashSegment", "check_flash_inputs", "flash_decode", "flash_decode_reference",
           "supported"]
