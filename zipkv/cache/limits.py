"""Prompt + new tokens beyond the model's context (`max_position_embeddings`): warn or raise.

A model fed more positions than it was trained for still runs (RoPE extrapolates) and returns
fluent garbage, and nothing in transformers says so. Every zipkv cache layer sees the logical
length (positions so far) and each forward's new tokens in update(), and the cache knows the
model config: the check is one integer comparison per layer and forward, no host sync.

What happens past the limit, per cache (`cache.position_limit.on_overflow = ...`) or for the
process (environment variable ZIPKV_ON_OVERFLOW, read when a cache is built):
- "warn" (default): a ContextOverflowWarning at the forward that crosses the limit (once per
  crossing: a reset or new prompt warns again, a 1000-token generation past it warns once);
- "raise": a ContextOverflowError (a ValueError) at every forward that would pass it, raised
  before the cache stores anything, so the cache still holds what it held;
- "ignore": nothing (a model known to extrapolate, e.g. with rope scaling set by the user).
"""

from __future__ import annotations

import os
import warnings

ON_OVERFLOW_ENV = "ZIPKV_ON_OVERFLOW"
ON_OVERFLOW_CHOICES = ("warn", "raise", "ignore")


class ContextOverflowWarning(UserWarning):
    """Prompt + generated tokens passed the model's max_position_embeddings."""


class ContextOverflowError(ValueError):
    """Prompt + generated tokens would pass the model's max_position_embeddings (on_overflow="raise")."""


def max_positions(config) -> int | None:
    """The decoder's max_position_embeddings, or None when the config declares none."""
    text_config = config.get_text_config(decoder=True)
    limit = getattr(text_config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def checked_on_overflow(value: str, name: str = "on_overflow") -> str:
    if value not in ON_OVERFLOW_CHOICES:
        raise ValueError(f"{name} must be one of {ON_OVERFLOW_CHOICES} (got {value!r})")
    return value


class PositionLimit:
    """The model's context and what a cache does past it (module docstring)."""

    def __init__(self, config, on_overflow: str | None = None):
        self.limit = max_positions(config)
        if on_overflow is None:
            on_overflow = checked_on_overflow(os.environ.get(ON_OVERFLOW_ENV, "warn"), ON_OVERFLOW_ENV)
        self.on_overflow = on_overflow
        self.first_layer = None  # the layer each forward reaches first: the one that checks

    @property
    def on_overflow(self) -> str:
        return self._on_overflow

    @on_overflow.setter
    def on_overflow(self, value: str) -> None:
        self._on_overflow = checked_on_overflow(value)

    def check_layer(self, layer, new_tokens: int) -> None:
        """Called by a layer's update() before it stores `new_tokens`: the first layer a forward
        reaches checks (every layer of a forward sees the same positions), the others return."""
        if self.first_layer is None:
            self.first_layer = layer.layer_idx
        if layer.layer_idx == self.first_layer and self.limit is not None:
            self.check(layer.get_seq_length(), new_tokens)

    def check(self, seen: int, new_tokens: int) -> None:
        """`new_tokens` more positions on top of `seen`: within the limit, or on_overflow applies."""
        total = seen + new_tokens
        if self.limit is None or total <= self.limit or self._on_overflow == "ignore":
            return
        message = (
            f"prompt + new tokens reach {total} positions, more than the model's "
            f"max_position_embeddings={self.limit}: a model runs past its context without an error but "
            f"its outputs there are unreliable. Keep prompt + max_new_tokens within {self.limit}; "
            f"{ON_OVERFLOW_ENV}=raise or cache.position_limit.on_overflow = 'raise' makes this an error, "
            "'ignore' silences it"
        )
        if self._on_overflow == "raise":
            raise ContextOverflowError(message)
        if seen <= self.limit:  # the forward that crosses the limit: warn once per crossing
            warnings.warn(message, ContextOverflowWarning, stacklevel=3)


def check_positions(layer, new_tokens: int) -> None:
    """A layer's update() hook: check `new_tokens` more positions against its cache's limit.
    A layer outside a zipkv cache, a cache without a limit, or a layer inside another one
    (a window layer's inner ZipCacheLayer, which holds the window only) checks nothing."""
    owner = layer.owner
    limit = getattr(owner, "position_limit", None)
    if limit is not None and owner.layers[layer.layer_idx] is layer:
        limit.check_layer(layer, new_tokens)


__all__ = [
    "ON_OVERFLOW_CHOICES",
    "ON_OVERFLOW_ENV",
    "ContextOverflowError",
    "ContextOverflowWarning",
    "PositionLimit",
    "check_positions",
    "checked_on_overflow",
    "max_positions",
]
