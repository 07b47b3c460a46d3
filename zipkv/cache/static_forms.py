"""The static (CUDA-graph) form of every eager layer class, in one table for ZipkvCache.to_static.

Each entry says how to check that a layer can move (a ValueError naming what is wrong; run
for every layer before any moves, so a refusal leaves the cache as it was) and how to build
its static form. A layer class found in no entry (MiniCache's merged layers) has none.

    eager layer                          static form
    TokenQuantLayer, LosslessLayer       StaticFlashLayer (fp8 / int4 / full: flash-decoding)
    ZipCacheLayer (and VLM subclasses)   StaticZipLayer / static_form_of(its class)
    SlidingZipLayer                      StaticSlidingLayer (a packed ring)
    EvictingLayer                        StaticEvictingLayer / StaticTieredLayer (by method)
    transformers' window layer           StaticWindowLayer (an fp16 ring)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from transformers.cache_utils import DynamicSlidingWindowLayer

from .baseline_cache import LosslessLayer, TokenQuantLayer
from .eviction_layer import EvictingLayer
from .layer import ZipCacheLayer
from .sliding_layer import SlidingZipLayer
from .static_base import check_holds_prompt
from .static_flash_layer import StaticFlashLayer, check_flash_form
from .static_evicting_layer import StaticEvictingLayer, static_evicting_layer, static_slot_rule
from .static_layer import StaticZipLayer, check_static_form
from .static_sliding_layer import StaticSlidingLayer
from .static_window_layer import StaticWindowLayer

# classes whose instances already are static (a second to_static() leaves them as they are)
STATIC_LAYERS = (StaticZipLayer, StaticSlidingLayer, StaticEvictingLayer, StaticWindowLayer, StaticFlashLayer)


@dataclass(frozen=True)
class StaticForm:
    """check(cache, index, layer) raises when the layer cannot move; build(cache, index, layer,
    extra_tokens, prompt_padding) returns its static form (prompt_padding: [B] counts or None)."""

    check: Callable
    build: Callable


def check_window(layer, index: int) -> None:
    """transformers' window layer holds the newest window - 1 tokens (or fewer)."""
    check_holds_prompt(layer, index)
    if layer.keys.shape[2] >= layer.sliding_window + 1:
        raise ValueError(f"layer {index}: a window layer of {layer.sliding_window} holds {layer.keys.shape[2]} "
                         "tokens (a cache that recorded its past?)")


FLASH_FORM = StaticForm(check=lambda cache, i, layer: check_flash_form(layer, i),
                        build=lambda cache, i, layer, extra, pads: StaticFlashLayer(layer, extra, pads))

FORMS: list[tuple[type, StaticForm]] = [  # first match wins: static classes subclass eager ones
    (TokenQuantLayer, FLASH_FORM),
    (LosslessLayer, FLASH_FORM),  # before ZipCacheLayer, which it subclasses
    (ZipCacheLayer, StaticForm(
        check=lambda cache, i, layer: check_static_form(layer),
        build=lambda cache, i, layer, extra, pads: StaticZipLayer.from_layer(layer, extra, pads))),
    (SlidingZipLayer, StaticForm(
        check=lambda cache, i, layer: check_holds_prompt(layer, i),
        build=lambda cache, i, layer, extra, pads: StaticSlidingLayer.from_layer(layer, extra, pads))),
    (EvictingLayer, StaticForm(
        check=lambda cache, i, layer: static_slot_rule(layer, cache.method),
        build=lambda cache, i, layer, extra, pads: static_evicting_layer(layer, cache.method, extra))),
    (DynamicSlidingWindowLayer, StaticForm(
        check=lambda cache, i, layer: check_window(layer, i),
        build=lambda cache, i, layer, extra, pads: StaticWindowLayer.from_layer(layer, i, layer.kind, pads))),
]


def static_form(cache, index: int, layer) -> StaticForm:
    """The table entry of `layer`, or a ValueError naming the cache and layer class."""
    for eager, form in FORMS:
        if isinstance(layer, eager):
            return form
    raise ValueError(f"{type(cache).__name__} has no static (CUDA-graph) form: layer {index} is a "
                     f"{type(layer).__name__}; decode it eagerly (model.generate)")


__all__ = ["FORMS", "STATIC_LAYERS", "StaticForm", "static_form"]
