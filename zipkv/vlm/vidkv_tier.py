"""`VidKVTier`: a precision tier holding VidKV-quantized tokens (the 1.x-bit visual tier).

Same interface as `zipkv.cache.tier.PackedTier` (append / dequantize / tensors / nbytes /
select_batch), so `VisualZipCacheLayer` uses it wherever it would use a packed tier.
Append-only: each quantization event is one block with its own channel split; key scales
and value alphas are per token group of `group_size` tokens inside a block.

Held per tier (B rows, H KV heads, N tokens, head dim D, G token groups, K blocks):
  channel_mask uint8 [B, H, K, D/8]   which channels are the 2-bit ones, per block
  wide_codes   uint8 [B, H, N, D/8]   2-bit codes of the D/2 wide channels
  wide_scale, wide_min [B, H, G, D/2] their channelwise parameters
  narrow_codes uint8 [B, H, N, D/16]  1 bit per half-spectrum component
  narrow_scale [B, H, G, D/2]         mean |component| per group
  v_codes      uint8 [B, H, sum_k ceil(n_k * D / 5)]  ternary values, 5 per byte
  v_alpha      [B, H, G, D]           per channel and group
  group_ends, block_ends int32 [G], [K]  cumulative end offsets (tokens)
"""

from __future__ import annotations

import torch

from ..cache.tier import owner_of_each_token
from .vidkv import (
    TRITS_PER_BYTE,
    dequantize_keys_vidkv,
    dequantize_values_ternary,
    quantize_keys_vidkv,
    quantize_values_ternary,
)

_PER_TOKEN = ("wide_codes", "narrow_codes")
_PER_GROUP = ("wide_scale", "wide_min", "narrow_scale", "v_alpha")
_NAMES = ("channel_mask", *_PER_TOKEN, *_PER_GROUP, "v_codes", "group_ends", "block_ends")


class VidKVTier:
    bits = "vidkv"

    def __init__(self, group_size: int = 32):
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"vidkv_group_size must be a positive integer (got {group_size!r})")
        self.group_size = group_size
        for name in _NAMES:
            setattr(self, name, None)
        self.head_dim = None

    @property
    def num_tokens(self) -> int:
        return 0 if self.wide_codes is None else self.wide_codes.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        n = keys.shape[2]
        if n == 0:
            return
        self.head_dim = keys.shape[3]
        k = quantize_keys_vidkv(keys, self.group_size)
        v_codes, v_alpha = quantize_values_ternary(values, self.group_size)
        start = self.num_tokens
        groups = -(-n // self.group_size)
        ends = [start + min((i + 1) * self.group_size, n) for i in range(groups)]
        device = keys.device

        def cat(old, new, dim):
            return new if old is None else torch.cat([old, new], dim=dim)

        self.channel_mask = cat(self.channel_mask, k["channel_mask"], 2)
        for name in _PER_TOKEN + ("wide_scale", "wide_min", "narrow_scale"):
            setattr(self, name, cat(getattr(self, name), k[name], 2))
        self.v_alpha = cat(self.v_alpha, v_alpha, 2)
        self.v_codes = cat(self.v_codes, v_codes, 2)
        self.group_ends = cat(self.group_ends, torch.tensor(ends, dtype=torch.int32, device=device), 0)
        self.block_ends = cat(self.block_ends, torch.tensor([start + n], dtype=torch.int32, device=device), 0)

    @property
    def token_group(self) -> torch.Tensor:
        return owner_of_each_token(self.group_ends, self.num_tokens)

    @property
    def token_block(self) -> torch.Tensor:
        return owner_of_each_token(self.block_ends, self.num_tokens)

    def dequantize(self, dtype: torch.dtype):
        """Reference path: keys and values [B, H, N, D] in `dtype`."""
        group = self.token_group
        keys = dequantize_keys_vidkv(
            self.channel_mask, self.wide_codes, self.wide_scale, self.wide_min, self.narrow_codes,
            self.narrow_scale, group, self.token_block, dtype,
        )
        parts, start, offset = [], 0, 0
        for end in self.block_ends.tolist():
            width = -(-(end - start) * self.head_dim // TRITS_PER_BYTE)
            block = self.v_codes[:, :, offset: offset + width]
            parts.append(dequantize_values_ternary(block, self.v_alpha, group[start:end], self.head_dim, dtype))
            start, offset = end, offset + width
        return keys, torch.cat(parts, dim=2)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (getattr(self, name) for name in _NAMES) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def select_batch(self, index: torch.Tensor) -> None:
        for name in ("channel_mask", *_PER_TOKEN, *_PER_GROUP, "v_codes"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, index.to(tensor.device)))
