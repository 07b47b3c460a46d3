"""`MergedPair`: what one MiniCache layer pair really holds of its prefill.

Layers a and b (adjacent, b = a + 1) share, for keys and for values: ONE direction tensor
for the merged tokens (fp16 in an `Fp16Tier`, or quantized in a `PackedTier`: keys
channelwise, values channel-separable tokenwise, MiniCache's combination with low-bit
quantization), the merged tokens' norms of each layer (fp16; fp32 where a norm exceeds the
fp16 range), the retained tokens' original states of each layer (the cache's storage dtype)
and their positions (int32, one set for both layers). Layer a's prefill waits here (as it
was stored) until layer b's prefill arrives; the merge happens then, in one go.
"""

from __future__ import annotations

import torch

from ..merge import merge_states, restore_states
from ..quant.quantizer import FP16_MAX
from .config import LOSSLESS_BITS
from .layer import Fp16Tier
from .tier import PackedTier

SIDES = ("a", "b")


def _norm_to_store(norm: torch.Tensor) -> torch.Tensor:
    if norm.numel() == 0 or float(norm.amax()) < FP16_MAX:
        return norm.to(torch.float16)
    return norm  # float32: a norm beyond fp16 would become inf


class MergedPair:
    def __init__(self, layer_a: int, layer_b: int, t: float, retain_ratio: float, direction_bits: int = LOSSLESS_BITS):
        self.layer_a, self.layer_b = layer_a, layer_b
        self.t, self.retain_ratio, self.direction_bits = t, retain_ratio, direction_bits
        self.reset()

    def reset(self) -> None:
        self.pending = None  # layer a's prefill (keys, values) until layer b's arrives
        self.direction = None  # Fp16Tier / PackedTier of the merged tokens' (key, value) directions
        self.norms = {}  # side -> (key norms, value norms) [B, H, M]
        self.retained_index = None  # (keys' int32 [B, H, k], values' int32 [B, H, k])
        self.retained = {}  # side -> (keys, values) [B, H, k, D]
        self.num_tokens = 0

    @property
    def merged(self) -> bool:
        return self.direction is not None

    def add_prefill(self, side: str, keys: torch.Tensor, values: torch.Tensor) -> None:
        """A layer's first forward (states in the cache's storage dtype). Layer a's is kept
        as it is; layer b's triggers the merge, after which neither is held in full."""
        if side == "a":
            self.pending = (keys, values)
            return
        if self.pending is None:
            raise RuntimeError(
                f"layer {self.layer_b}'s prefill came before layer {self.layer_a}'s: cannot merge the pair"
            )
        keys_a, values_a = self.pending
        if keys_a.shape != keys.shape:
            raise ValueError(
                f"layers {self.layer_a} and {self.layer_b} prefilled different shapes "
                f"{tuple(keys_a.shape)} and {tuple(keys.shape)}: cannot merge them"
            )
        merged_keys = merge_states(keys_a, keys, self.t, self.retain_ratio)
        merged_values = merge_states(values_a, values, self.t, self.retain_ratio)
        if self.direction_bits == LOSSLESS_BITS:
            self.direction = Fp16Tier()
            self.direction.append(merged_keys.direction.half(), merged_values.direction.half())
        else:
            self.direction = PackedTier(self.direction_bits, None, None, True)
            self.direction.append(merged_keys.direction, merged_values.direction)
        for s in SIDES:
            self.norms[s] = tuple(_norm_to_store(getattr(m, f"norm_{s}")) for m in (merged_keys, merged_values))
            self.retained[s] = (getattr(merged_keys, f"retained_{s}"), getattr(merged_values, f"retained_{s}"))
        self.retained_index = (merged_keys.retained_index.int(), merged_values.retained_index.int())
        self.num_tokens = keys.shape[2]
        self.pending = None

    def restore(self, side: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `side`'s prefill keys and values [B, H, N, D] in `dtype` (approximate at the
        merged tokens, exact at the retained ones)."""
        if not self.merged:
            if side == "a" and self.pending is not None:  # layer b has not run yet
                return self.pending[0].to(dtype), self.pending[1].to(dtype)
            raise RuntimeError(f"layer pair ({self.layer_a}, {self.layer_b}) holds no prefill for side {side!r}")
        retained_keys, retained_values = self.retained[side]
        if self.direction.num_tokens:
            direction_keys, direction_values = self.direction.dequantize(torch.float32)
        else:  # every token retained
            b, h, _, d = retained_keys.shape
            direction_keys = direction_values = retained_keys.new_zeros(b, h, 0, d)
        norm_keys, norm_values = self.norms[side]
        keys = restore_states(direction_keys, norm_keys, self.retained_index[0], retained_keys, self.num_tokens, dtype)
        values = restore_states(
            direction_values, norm_values, self.retained_index[1], retained_values, self.num_tokens, dtype
        )
        return keys, values

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the pair holds (counted once, by layer a)."""
        held = list(self.pending or ())
        if self.merged:
            held += self.direction.tensors() + list(self.retained_index)
            held += [x for s in SIDES for x in (*self.norms[s], *self.retained[s])]
        return held

    def select_batch(self, index: torch.Tensor) -> None:
        def pick(x):
            return x.index_select(0, index.to(x.device))

        if self.pending is not None:
            self.pending = tuple(pick(x) for x in self.pending)
        if self.merged:
            self.direction.select_batch(index)
            self.retained_index = tuple(pick(x) for x in self.retained_index)
            for s in SIDES:
                self.norms[s] = tuple(pick(x) for x in self.norms[s])
                self.retained[s] = tuple(pick(x) for x in self.retained[s])
