"""`make_cache(method, config, **params)`: any method of the registry (zipkv.METHODS) by name."""

from __future__ import annotations

from .registry import METHODS, check_method, names

# Compatibility view: the ZipCache presets' CompressionConfig defaults, by name (the VLM
# presets and older scripts read it). The registry owns them.
PRESETS: dict[str, dict] = {name: dict(METHODS[name].defaults) for name in names("lossless", "quantize")}


def make_cache(method: str, config, **params):
    """Build the cache of a named method for a model config, with overrides.

    Quantizing methods (full, zipcache, zipkv, kivi, uniform) give a ZipCache; eviction
    methods (StreamingLLM, H2O, SnapKV, PyramidKV, AdaKV, CAKE, ZipVL, ...) an
    EvictionCache and take `budget=` (tokens) or `ratio=` (fraction kept); "minicache" a
    MiniCache (cross-layer merging). `zipkv methods` lists them with their parameters.
    Names and values are checked first (zipkv.registry.check_method): a bad one raises
    ValueError naming it and what is allowed."""
    return check_method(method, params).build(config, **params)


__all__ = ["PRESETS", "make_cache"]
