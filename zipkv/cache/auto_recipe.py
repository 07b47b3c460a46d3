"""`AutoCache`: a ZipCache that chooses each layer's bits (and rotation) from the prompt itself.

At the end of the prompt forward every full-attention layer (a `CalibratedLayer`) measures each
candidate (key bits, value bits, rotation) on its own prompt (recipe_choice.calibrate: the bytes
its tier would hold, and the attention-output error of the prompt's last `window` queries);
the prompt is kept fp16 until the last such layer has measured. Then the cache chooses one
candidate per layer so that the whole cache holds at most fp16 bytes / `ratio` (or `bits` per
element: ratio = 16 / bits) with the least total error (recipe_choice.choose_per_layer), at every
decoding step (the up to stream_interval tokens that wait unquantized are counted:
`AutoCache.prompt_budget`), and every layer quantizes its prompt with its choice. Later blocks (decoding) use the same choice.
`cache.recipe()` reports it.

The choice is per layer for the whole batch (a tier holds one bit width), so a row's bits can
depend on the other rows of its batch. Window layers (sliding / chunked attention) keep the
base scheme (keys 4-bit, values 2-bit) and count as fixed bytes.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .cache import ZipCache
from .config import CompressionConfig
from .layer import ZipCacheLayer, make_tier, overwrite_padding
from .recipe_choice import calibrate, candidates, choose_per_layer

DEFAULT_RATIO = 5.0
DEFAULT_WINDOW = 32
# what the auto recipe leaves to the user; the bits, the saliency split and the rotation it chooses
AUTO_SETTINGS = ("residual_length", "stream_interval", "key_group_size", "value_group_size", "channel_separable",
                 "seed", "decode_path")


def target_ratio(ratio, bits) -> float:
    """The real compression the recipe aims at, from ratio= or bits= (bits per stored element)."""
    if ratio is not None and bits is not None:
        raise ValueError("ratio (target compression) and bits (bits per element) exclude each other: give one")
    if bits is not None:
        if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not 1.0 <= bits <= 16.0:
            raise ValueError(f"bits must be a number of bits per element in [1, 16] (got {bits!r})")
        return 16.0 / bits
    ratio = DEFAULT_RATIO if ratio is None else ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 1.0 <= ratio <= 16.0:
        raise ValueError(f"ratio must be a target compression in [1, 16] (got {ratio!r})")
    return float(ratio)


def check_window(window) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1 (queries the recipe is measured with; got {window!r})")
    return window


def check_auto_params(params: dict) -> None:
    """The registry's value checks of `auto` (before any model loads)."""
    target_ratio(params.get("ratio"), params.get("bits"))
    check_window(params.get("window", DEFAULT_WINDOW))
    CompressionConfig(**{k: v for k, v in params.items() if k in AUTO_SETTINGS})


class CalibratedLayer(ZipCacheLayer):
    """A full-attention layer whose bits the cache chooses after the prompt (module docstring)."""

    def __init__(self, settings: CompressionConfig, layer_idx: int, window: int = DEFAULT_WINDOW):
        super().__init__(settings, layer_idx)
        self.base_settings = settings
        self.window = window
        self.measured = None  # [Measured] once calibrated (Python numbers only: nothing held)
        self.choice = None  # the chosen Measured
        self.block = 0  # the prompt tokens the choice is for (quantized when it is applied)

    def reset(self) -> None:
        owner = self.owner
        self.__init__(self.base_settings, self.layer_idx, self.window)
        self.owner = owner

    def attend(self, module, query, key, value, attention_mask, scaling, **kwargs):
        if self.choice is not None:
            return super().attend(module, query, key, value, attention_mask, scaling, **kwargs)
        # The first forward (the prompt): attention on the exact states, as ZipCacheLayer's first
        # forward; then measure the candidates and leave the prompt fp16 until the cache chooses.
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        self.awaiting_queries = False
        self._mark_padding(attention_mask, query.shape[2])
        self._calibrate(query.detach(), scaling)
        self.owner.choose_when_calibrated()
        return output, None

    def _calibrate(self, query, scaling: float) -> None:
        s, n = self.settings, self.keys.shape[2]
        excess = n - s.residual_length  # what compress_due will quantize now (no sinks)
        self.block = excess if excess > 0 else n  # a short prompt: measured as if all were quantized
        keys, values = overwrite_padding(self.keys[:, :, :self.block], self.values[:, :, :self.block],
                                         self.is_real[:, :self.block])
        keys = torch.cat([keys, self.keys[:, :, self.block:]], dim=2)
        values = torch.cat([values, self.values[:, :, self.block:]], dim=2)
        w = min(self.window, query.shape[2])
        self.measured = calibrate(query[:, :, -w:], keys, values, self.is_real, self.block, scaling, s, self.layer_idx,
                                  candidates(keys.shape[3]))

    def freed_bytes(self) -> int:
        """Bytes of the fp16 part that quantizing the block frees (its tokens' states and flags)."""
        per_token = [self.keys, self.values, self.score_sum, self.score_count, self.is_real, self.is_sink]
        n = self.keys.shape[2]
        return sum(t.numel() * t.element_size() for t in per_token) * self.block // max(n, 1)

    def apply(self, chosen) -> None:
        """Take the chosen candidate and quantize the prompt with it (compress_due)."""
        c = chosen.candidate
        self.settings = replace(self.base_settings, high_bits=c.key_bits, low_bits=c.key_bits,
                                high_value_bits=c.value_bits, low_value_bits=c.value_bits, rotation=c.rotation)
        self.high, self.low = make_tier(self.settings.tier_bits[0], self.settings), make_tier(self.settings.tier_bits[1],
                                                                                            self.settings)
        self.make_rotation(self.keys.shape[1], self.keys.shape[3])
        self.choice = chosen
        self.compress_due()


class AutoCache(ZipCache):
    """ZipCache with per-layer bits chosen from the prompt (module docstring).

    Example::

        cache = AutoCache(model.config, ratio=5.0)   # or bits=3.2
        model.generate(**inputs, cache=cache, max_new_tokens=32)
        print(cache.recipe())
    """

    def __init__(self, config, ratio: float | None = None, bits: float | None = None, window: int = DEFAULT_WINDOW,
                 **settings):
        self.target = target_ratio(ratio, bits)
        self.window = check_window(window)
        unknown = sorted(set(settings) - set(AUTO_SETTINGS))
        if unknown:
            raise ValueError(f"auto does not take {unknown}: it chooses bits and rotation itself; it accepts "
                             f"{sorted(AUTO_SETTINGS + ('ratio', 'bits', 'window'))}")
        # base scheme: what window layers use, and each full layer's settings until it is chosen
        super().__init__(config, high_bits=4, low_bits=4, high_value_bits=2, low_value_bits=2, saliency="none",
                         **settings)

    def build_layers(self, text_config, types: list[str]) -> list:
        layers = super().build_layers(text_config, types)
        return [CalibratedLayer(self.settings, i, self.window) if type(layer) is ZipCacheLayer else layer
                for i, layer in enumerate(layers)]

    def calibrated_layers(self) -> list[CalibratedLayer]:
        return [layer for layer in self.layers if isinstance(layer, CalibratedLayer)]

    def choose_when_calibrated(self) -> None:
        """Once every full-attention layer has measured its prompt: choose and apply."""
        layers = self.calibrated_layers()
        if any(layer.measured is None or layer.choice is not None for layer in layers):
            return
        stats = self.stats()
        fixed = stats.bytes_held - sum(layer.freed_bytes() for layer in layers)
        budget = self.prompt_budget(stats, fixed, layers)
        for layer, chosen in zip(layers, choose_per_layer([layer.measured for layer in layers], budget)):
            layer.apply(chosen)

    def prompt_budget(self, stats, fixed: int, layers: list[CalibratedLayer]) -> float:
        """Bytes the prompt's quantized blocks may hold so that the cache meets the target at
        every decoding step, not only after the prompt: while decoding, up to stream_interval
        new tokens wait unquantized (beside the residual already in `fixed`) before a block is
        quantized. With t = stream_interval, F(x) the fp16 bytes of x tokens and H(t) what t
        waiting tokens hold: held(prompt) + H(t) <= F(prompt + t) / ratio. (Without the tail,
        ratio=6.4 held 5.4x at the end of a 1K-token case on Qwen2.5-1.5B.)"""
        tail = self.settings.stream_interval
        fp16_per_token = sum(b / max(n, 1) for b, n in zip(stats.fp16_bytes_per_layer, stats.tokens_per_layer))
        held_per_token = sum(layer.freed_bytes() / max(layer.block, 1) for layer in layers) + sum(
            b / max(n, 1) for layer, b, n in zip(self.layers, stats.fp16_bytes_per_layer, stats.tokens_per_layer)
            if not isinstance(layer, CalibratedLayer))  # window layers: their waiting tokens at fp16 cost
        return (stats.fp16_bytes + fp16_per_token * tail) / self.target - fixed - held_per_token * tail

    def recipe(self) -> dict:
        """The target and each full-attention layer's choice (None before the prompt)."""
        rows = []
        for layer in self.calibrated_layers():
            c = layer.choice
            rows.append(None if c is None else dict(
                layer=layer.layer_idx, key_bits=c.candidate.key_bits, value_bits=c.candidate.value_bits,
                rotation=c.candidate.rotation, label=c.candidate.label, prompt_bytes=c.nbytes,
                error=c.error if math.isfinite(c.error) else None))
        return dict(target_ratio=self.target, layers=rows)


__all__ = ["AUTO_SETTINGS", "AutoCache", "CalibratedLayer", "check_auto_params", "check_window", "target_ratio"]
