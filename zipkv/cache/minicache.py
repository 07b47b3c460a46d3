"""`MiniCache`: a transformers `Cache` that merges adjacent layers' prefill KV (MiniCache).

From `start_layer` on (default: the middle layer), adjacent full-attention layers are paired
(start, start+1), (start+2, start+3), ...; each pair's prefill keys and values are merged per
token and KV head into one shared SLERP direction plus both layers' norms, the most
divergent tokens (`retain_ratio`) kept exactly (zipkv.merge). Layers before `start_layer`
(and a last unpaired one) keep fp16; sliding-window layers keep transformers' own cache.
Tokens after the prefill stay unmerged in fp16. See methods.md section 2.

    cache = MiniCache(model.config, start_layer=15, t=0.6, retain_ratio=0.05)
    model.generate(**inputs, cache=cache, max_new_tokens=64)
    print(cache.stats())
"""

from __future__ import annotations

from dataclasses import dataclass

from ..merge.pair import check_fraction
from ..quant.quantizer import SUPPORTED_BITS
from .base import ZipkvCache
from .cache import checked_layer_types, sliding_layer
from .config import LOSSLESS_BITS
from .merged_pair import MergedPair
from .minicache_layer import MiniCacheLayer


@dataclass(frozen=True)
class MiniCacheConfig:
    """start_layer: first layer of the first merged pair, in [0, num_layers - 1] (None: the
        middle layer, num_layers // 2).
    t: SLERP weight of the pair's second layer, in [0, 1] (0: the first layer's direction).
    retain_ratio: fraction of each (row, KV head)'s prefill tokens kept unmerged, in [0, 1]
        (1: nothing merged, the cache is lossless and equals DynamicCache).
    direction_bits: 16 keeps the shared directions in fp16; 2, 4 or 8 quantizes them."""

    num_layers: int
    start_layer: int | None = None
    t: float = 0.6
    retain_ratio: float = 0.05
    direction_bits: int = LOSSLESS_BITS

    def __post_init__(self):
        last = self.num_layers - 1
        start = self.start_layer
        if start is not None and (isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= last):
            raise ValueError(f"start_layer must be an integer in [0, {last}] (got {start!r})")
        check_fraction("t", self.t)
        check_fraction("retain_ratio", self.retain_ratio)
        allowed = SUPPORTED_BITS + (LOSSLESS_BITS,)
        bits = self.direction_bits
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in allowed:
            raise ValueError(f"direction_bits must be one of {allowed} (got {self.direction_bits!r})")

    @property
    def first_layer(self) -> int:
        return self.num_layers // 2 if self.start_layer is None else self.start_layer


def merged_pairs(types: list[str], start: int) -> list[tuple[int, int]]:
    """Adjacent full-attention layers paired from `start` on, greedily in order."""
    pairs, i = [], start
    while i + 1 < len(types):
        if types[i] == types[i + 1] == "full_attention":
            pairs.append((i, i + 1))
            i += 2
        else:
            i += 1
    return pairs


class MiniCache(ZipkvCache):
    """KV cache that merges adjacent layers' prefill cache (MiniCache, cross-layer SLERP).

    stats() counts the bytes really held: a pair's shared tensors are counted once, in its
    first layer. It has no static (CUDA-graph) form: to_static() raises a ValueError."""

    def __init__(self, config, start_layer: int | None = None, t: float = 0.6, retain_ratio: float = 0.05,
                 direction_bits: int = LOSSLESS_BITS):
        text_config, types = checked_layer_types(config)
        self.settings = MiniCacheConfig(len(types), start_layer, t, retain_ratio, direction_bits)
        pairs = merged_pairs(types, self.settings.first_layer)
        # Nothing merged: lossless by design, so the model's own dtype is kept (like "full").
        self.lossless = retain_ratio >= 1.0 or not pairs
        self.pairs = [MergedPair(a, b, t, retain_ratio, direction_bits) for a, b in pairs]
        sides = {}
        for pair in self.pairs:
            sides[pair.layer_a], sides[pair.layer_b] = (pair, "a"), (pair, "b")
        layers = [
            MiniCacheLayer(i, self.lossless, *sides.get(i, (None, None))) if kind == "full_attention"
            else sliding_layer(text_config, kind)
            for i, kind in enumerate(types)
        ]
        super().__init__(config, layers)  # its layers never need zipkv attention

    def prefill_from_states(self, records) -> "MiniCache":
        """Fill a fresh cache from a recorded prefill (zipkv.eviction_cache.record_prefill: one
        record per full-attention layer), through the same update() calls as a live prefill."""
        layers = [layer for layer in self.layers if isinstance(layer, MiniCacheLayer)]
        if len(records) != len(layers):
            raise ValueError(f"records hold {len(records)} layers, this cache has {len(layers)} full-attention layers")
        if any(layer.is_initialized for layer in self.layers):
            raise ValueError("prefill_from_states needs a fresh cache")
        for layer, record in zip(layers, records):
            layer.update(record.keys, record.values)
        return self
