"""Stores of tokens quantized per token-head (fp8 / int4, zipkv/quant/token_head.py).

- `TokenHeadTier` (a `TierStore`): the eager store, append-only; each append quantizes its
  tokens (a token alone: no block to wait for).
- `TokenHeadBuffers` (a `StaticStore`): capacity buffers for the static (CUDA-graph) form, in
  any of flash_decode's three forms ("dense" too: the lossless `full` cache), each batch row
  with its own valid count `lengths` (int32 [B] on the device): a step writes row b's token at
  lengths[b] (quantized on the device when the form is lossy) and advances the count there,
  one launch on CUDA (kernels/token_append.py).
  Rows come in compacted (their left padding dropped), so the counts are exact lengths and
  flash_decode needs no mask.
"""

from __future__ import annotations

import torch

from ..kernels.flash_decode import FlashSegment
from ..kernels.token_append import raw, token_append
from ..quant.token_head import TokenCodes, check_form, dequantize_token_head, quantize_token_head

BITS = {"dense": 16, "fp8": 8, "int4": 4}


def cat_codes(held: TokenCodes | None, new: TokenCodes) -> TokenCodes:
    if held is None:
        return new
    zero = None if new.zero is None else torch.cat([held.zero, new.zero], dim=2)
    return TokenCodes(torch.cat([held.codes, new.codes], dim=2), torch.cat([held.scale, new.scale], dim=2), zero)


class TokenHeadTier:
    """Tokens [B, H, N, D] as per token-head codes (TierStore, zipkv/cache/protocol.py)."""

    def __init__(self, form: str):
        self.form = check_form(form)
        self.bits = BITS[form]
        self.k: TokenCodes | None = None
        self.v: TokenCodes | None = None

    @property
    def num_tokens(self) -> int:
        return 0 if self.k is None else self.k.codes.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if keys.shape[2]:
            self.k = cat_codes(self.k, quantize_token_head(keys, self.form))
            self.v = cat_codes(self.v, quantize_token_head(values, self.form))

    def dequantize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return dequantize_token_head(self.k, self.form, dtype), dequantize_token_head(self.v, self.form, dtype)

    def segment(self) -> FlashSegment:
        k, v = self.k, self.v
        return FlashSegment(self.form, k.codes, v.codes, k.scale, v.scale, k.zero, v.zero)

    def tensors(self) -> list[torch.Tensor]:
        return [] if self.k is None else self.k.tensors() + self.v.tensors()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def select_batch(self, index: torch.Tensor) -> None:
        if self.k is None:
            return
        index = index.to(self.k.codes.device)
        pick = lambda c: TokenCodes(*(None if t is None else t.index_select(0, index) for t in (c.codes, c.scale, c.zero)))
        self.k, self.v = pick(self.k), pick(self.v)


def compacted(t: torch.Tensor, pads: torch.Tensor, capacity: int) -> torch.Tensor:
    """t [B, H, N, ...] -> [B, H, capacity, ...] zeros with row b's tokens pads[b]: at its front."""
    b, h, n = t.shape[:3]
    index = (torch.arange(n, device=t.device)[None, :] + pads[:, None]).clamp_max(n - 1)  # [B, N]
    index = index.view(b, 1, n, *([1] * (t.dim() - 3))).expand(b, h, n, *t.shape[3:])
    rows = raw(t).gather(2, index)
    out = rows.new_zeros(b, h, capacity, *t.shape[3:])
    out[:, :, :n] = rows
    return out.view(t.dtype) if t.dtype == torch.float8_e4m3fn else out


class TokenHeadBuffers:
    """A FlashSegment's tensors in capacity buffers with per-row device counts (StaticStore;
    module docstring). Built from the eager store's segment and each row's left padding."""

    def __init__(self, held: FlashSegment, pads: torch.Tensor, extra_tokens: int):
        n = held.capacity
        pads = pads.to(device=held.k.device, dtype=torch.int64)
        self.form, self.bits = held.form, BITS[held.form]
        self.capacity = n - int(pads.min()) + extra_tokens
        fields = {name: getattr(held, name) for name in ("k", "v", "k_scale", "v_scale", "k_zero", "v_zero")}
        self.buffers = FlashSegment(held.form, **{name: None if t is None else compacted(t, pads, self.capacity)
                                                  for name, t in fields.items()})
        self.lengths = (n - pads).to(torch.int32)
        self.filled = n - int(pads.min())  # the longest row (host mirror)

    @property
    def num_tokens(self) -> int:
        return self.filled

    def append(self, keys: torch.Tensor, values: torch.Tensor, nonfinite: torch.Tensor | None = None,
               impl: str = "auto") -> None:
        """One token per row [B, H, 1, D] at slot lengths[b] of its row, then lengths += 1 (on
        the device, one launch on CUDA: kernels/token_append.py; `advance()` mirrors it on the
        host); nonfinite (bool scalar on the device) |= any NaN/inf among them."""
        # a host check, outside a compiled step (its changing count would recompile the step
        # every time): StaticDecoder.step() checks has_room() before it instead
        if not torch.compiler.is_compiling() and self.filled >= self.capacity:
            raise RuntimeError(f"the static buffers of {self.capacity} tokens are full")
        if nonfinite is None:  # a flag nobody reads
            nonfinite = torch.zeros((), dtype=torch.bool, device=self.lengths.device)
        token_append(keys, values, self.buffers, self.lengths, nonfinite, impl=impl)

    def advance(self) -> None:
        self.filled += 1

    def segment(self) -> FlashSegment:
        """The whole buffers (what flash_decode reads with `lengths`)."""
        return self.buffers

    def valid_segment(self) -> FlashSegment:
        """The buffers cut to the longest row (shorter rows hold zeros past their count)."""
        seg = self.buffers
        return FlashSegment(self.form, *(None if t is None else t[:, :, :self.filled]
                                         for t in (seg.k, seg.v, seg.k_scale, seg.v_scale, seg.k_zero, seg.v_zero)))

    def dequantize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.valid_segment().dequantize(dtype)
        valid = torch.arange(self.filled, device=keys.device)[None, :] < self.lengths[:, None]
        hide = ~valid[:, None, :, None]
        return keys.masked_fill(hide, 0), values.masked_fill(hide, 0)

    def tensors(self) -> list[torch.Tensor]:
        return self.buffers.tensors() + [self.lengths]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def select_batch(self, index: torch.Tensor) -> None:
        raise NotImplementedError("static buffers keep their batch rows; select rows before to_static()")


__all__ = ["TokenHeadBuffers", "TokenHeadTier"]
