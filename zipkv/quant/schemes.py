"""Quantization schemes for keys and values, on tensors shaped [B, H, N, D].

- Keys, channelwise (ZipCache; KIVI with `group` = 32): one (scale, min) per channel over
  groups of `group` consecutive tokens (`group=None`: all N tokens form one group).
- Values, tokenwise (ZipCache CS, KIVI): one (scale, min) per token over groups of
  `group` channels (`group=None`: all D channels). With `channel_separable`, each channel is
  first divided by c_i = sqrt(max_t |v_ti|) and multiplied back after dequantization, which
  tames outlier channels at the cost of D parameters per chunk.

Each function returns packed codes plus parameters; `dequantize_*` are the references the
kernels are checked against.
"""

from __future__ import annotations

import torch

from .packing import pack, unpack
from .quantizer import dequantize, param_dtype, quantize


def _check_group(name: str, group: int | None, size: int) -> int:
    if group is None:
        return max(size, 1)
    if not isinstance(group, int) or group < 1:
        raise ValueError(f"{name} must be a positive integer or None (got {group!r})")
    return group


def quantize_keys_channelwise(keys: torch.Tensor, bits: int, group: int | None, check_finite: bool = True,
                              out_dtype: torch.dtype | None = None):
    """Returns (packed codes [B,H,N,D*bits/8], scale [B,H,G,D], min [B,H,G,D], G). out_dtype:
    the parameters' dtype (None: `param_dtype(keys)`, which for float32 keys reads their range
    on the host: a sync that a CUDA graph cannot hold)."""
    b, h, n, d = keys.shape
    g = _check_group("key_group_size", group, n)
    n_groups = -(-n // g)
    padded = keys
    if n_groups * g != n:
        # Pad the last group with copies of its own first token: min/max are unchanged.
        fill = keys[:, :, (n_groups - 1) * g : (n_groups - 1) * g + 1].expand(b, h, n_groups * g - n, d)
        padded = torch.cat([keys, fill], dim=2)
    grouped = padded.reshape(b, h, n_groups, g, d)
    codes, scale, minimum = quantize(grouped, bits, dims=3, out_dtype=out_dtype, check_finite=check_finite, name="keys")
    codes = codes.reshape(b, h, n_groups * g, d)[:, :, :n]
    return pack(codes, bits), scale.squeeze(3), minimum.squeeze(3), n_groups


def dequantize_keys_channelwise(packed, scale, minimum, token_group, bits, dtype=torch.float32):
    codes = unpack(packed, bits)
    index = token_group.long()
    return dequantize(codes, scale[:, :, index], minimum[:, :, index], dtype)


def channel_factors(values: torch.Tensor) -> torch.Tensor:
    """c_i = sqrt(max_t |v_ti|) per (batch, head, channel); 1 where a channel is all zero."""
    c = values.float().abs().amax(dim=2, keepdim=True).sqrt()
    return torch.where(c > 0, c, torch.ones_like(c))


def quantize_values_tokenwise(values: torch.Tensor, bits: int, group: int | None, channel_separable: bool,
                              check_finite: bool = True, out_dtype: torch.dtype | None = None):
    """Returns (packed codes [B,H,N,D*bits/8], scale [B,H,N,D/g], min [B,H,N,D/g],
    channel factors [B,H,1,D] or None). out_dtype: as quantize_keys_channelwise's."""
    b, h, n, d = values.shape
    g = _check_group("value_group_size", group, d)
    if d % g:
        raise ValueError(f"value_group_size must divide head_dim {d} (got {g})")
    factors = None
    x = values
    if channel_separable:
        factors = channel_factors(values)
        x = values.float() / factors
    codes, scale, minimum = quantize(x.reshape(b, h, n, d // g, g), bits, dims=4, out_dtype=out_dtype or param_dtype(values),
                                     check_finite=check_finite, name="values")
    if factors is not None:
        factors = factors.to(scale.dtype)
    return pack(codes.reshape(b, h, n, d), bits), scale.squeeze(4), minimum.squeeze(4), factors


def dequantize_values_tokenwise(packed, scale, minimum, channel, token_chunk, bits, dtype=torch.float32):
    codes = unpack(packed, bits)
    b, h, n, d = codes.shape
    groups = scale.shape[-1]
    x = dequantize(codes.reshape(b, h, n, groups, d // groups), scale.unsqueeze(-1), minimum.unsqueeze(-1))
    x = x.reshape(b, h, n, d)
    if channel is not None:
        x = x * channel[:, :, token_chunk.long()].float()
    return x.to(dtype)

