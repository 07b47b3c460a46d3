"""`FixedLayers`: a zipkv cache holds the layers of the config it was built from; a layer index
past them means a model the cache was not built for (transformers' Cache would raise a bare
IndexError from its layer list)."""

from __future__ import annotations


class FixedLayers:
    """Mixin in front of transformers' `Cache` (zipkv's caches build their layers up front)."""

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(
                f"layer_idx={layer_idx} is outside this cache's layers [0, {len(self.layers) - 1}]: the cache was "
                f"built for a model with {len(self.layers)} decoder layers; build a new cache for this model"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


__all__ = ["FixedLayers"]
