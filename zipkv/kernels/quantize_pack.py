"""Fused quantize + pack of K/V blocks into the PackedTier layout (docs/DESIGN.md).

- `quantize_pack_keys`: channelwise keys in groups of `group` tokens (None: all tokens).
- `quantize_pack_values`: tokenwise values in groups of `group` channels (None: all D),
  optionally channel-separable (ZipCache CS: divide channel i by c_i = sqrt(max_t |v_ti|)).

Both return exactly what zipkv.quant.schemes returns (that module is the reference; on the GPU
codes may differ on rounding ties, tests/test_gpu_kernels.py): on CUDA through one Triton launch
each (the CS factors need all tokens first: one torch amax pass), elsewhere through the
reference itself. PackedTier.append (cache/tier.py) quantizes every eager block through them:
on the H200 the reference's ~30 small ops per call were host time between a prefill's kernels.
"""

from __future__ import annotations

import torch

from ..quant.quantizer import check_bits, param_dtype
from ..quant.schemes import channel_factors, quantize_keys_channelwise, quantize_values_tokenwise
from ._runtime import sm_count, use_triton


def _triton_ok(x: torch.Tensor, bits: int) -> bool:
    d = x.shape[-1]
    return d in (32, 64, 128, 256) and x.stride(-1) == 1 and x.dtype in (torch.float16, torch.bfloat16, torch.float32)


def _check(x: torch.Tensor, name: str, check_finite: bool = True):
    if x.dim() != 4:
        raise ValueError(f"{name} must be [B, H, N, D] (got shape {tuple(x.shape)})")
    if check_finite and x.is_floating_point() and x.numel() and not torch.isfinite(x).all():
        raise ValueError(f"cannot quantize {name} that contain NaN or inf")


def _key_chunk(keys: torch.Tensor, group: int | None) -> int | None:
    """Tokens per program of the fused key kernel, or None for one program per (row, head,
    group). That kernel walks its group's tokens twice: a 32K prompt quantized as one group per
    head at batch 1 was 8 programs on 132 SMs (zipkv's prefill 1.11x DynamicCache's at 32K on
    the H200, 1.08x through the reference's ~30 small ops). With fewer than two programs per
    SM and one group per head, torch's parallel reductions take the min / max and the codes
    are split into chunks, about two programs per SM in all (at least 256 tokens each)."""
    b, h, n, _ = keys.shape
    groups = -(-n // group) if group else 1
    programs = 2 * sm_count(keys.device)
    if b * h * groups >= programs or groups != 1:
        return None
    chunk = max(256, -(-n * b * h // programs))
    return chunk if chunk < n else None  # one chunk: the plain kernel, without the reductions


def _too_few_groups(keys: torch.Tensor, group: int | None) -> bool:
    """Several groups per head but fewer than two programs per SM: the reference."""
    b, h, n, _ = keys.shape
    groups = -(-n // group) if group else 1
    return groups != 1 and b * h * groups < 2 * sm_count(keys.device)


def quantize_pack_keys(keys: torch.Tensor, bits: int, group: int | None, impl: str = "auto",
                       check_finite: bool = True):
    """(codes [B,H,N,D*bits/8] uint8, scale [B,H,G,D], min [B,H,G,D], G). check_finite=False:
    the caller refused NaN/inf already (the check is a device read)."""
    check_bits(bits)
    _check(keys, "keys", check_finite)
    if group is not None and (not isinstance(group, int) or group < 1):
        raise ValueError(f"key_group_size must be a positive integer or None (got {group!r})")
    if not use_triton(keys.device, impl) or not _triton_ok(keys, bits) or (impl == "auto" and _too_few_groups(keys, group)):
        return quantize_keys_channelwise(keys, bits, group, check_finite=False)
    from ._triton_quantize import quantize_keys

    n = keys.shape[2]
    chunk = _key_chunk(keys, group) if impl == "auto" else None
    return quantize_keys(keys, bits, group or max(n, 1), param_dtype(keys), chunk=chunk)


def quantize_pack_values(values: torch.Tensor, bits: int, group: int | None, channel_separable: bool,
                         impl: str = "auto", check_finite: bool = True):
    """(codes [B,H,N,D*bits/8] uint8, scale [B,H,N,D/g], min [B,H,N,D/g], factors [B,H,1,D] or None)."""
    check_bits(bits)
    _check(values, "values", check_finite)
    d = values.shape[-1]
    g = d if group is None else group
    if not isinstance(g, int) or g < 1 or d % g:
        raise ValueError(f"value_group_size must divide head_dim {d} (got {group!r})")
    if not use_triton(values.device, impl) or not _triton_ok(values, bits) or g < 4:
        return quantize_values_tokenwise(values, bits, group, channel_separable, check_finite=False)
    from ._triton_quantize import quantize_values

    out_dtype = param_dtype(values)
    factors = channel_factors(values) if channel_separable else None  # float32, one amax pass
    codes, scale, minimum = quantize_values(values, bits, g, factors, out_dtype)
    return codes, scale, minimum, None if factors is None else factors.to(out_dtype)


__all__ = ["quantize_pack_keys", "quantize_pack_values"]
