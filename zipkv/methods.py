"""Named presets: `make_cache("zipcache" | "kivi" | "uniform" | "full" | "minicache", config, **overrides)`."""

from __future__ import annotations

from .cache import ZipCache
from .cache.cache import head_dim
from .cache.minicache import MiniCache

MINICACHE = "minicache"  # cross-layer merging: its own cache class, not a CompressionConfig preset

# Each preset is a set of CompressionConfig defaults; keyword arguments override them.
PRESETS: dict[str, dict] = {
    # lossless: every token fp16, reproduces DynamicCache exactly
    "full": dict(high_bits=16, low_bits=16, saliency="none"),
    # ZipCache: probe-normalized saliency, salient tokens 4-bit, the rest 2-bit
    "zipcache": dict(high_bits=4, low_bits=2, salient_ratio=0.6, saliency="probe"),
    # KIVI: keys per channel in groups of 32 tokens, values per token in groups of 32
    # channels, newest 128 tokens fp16, no saliency
    "kivi": dict(
        high_bits=2, low_bits=2, saliency="none", key_group_size=32, value_group_size=32,
        channel_separable=False, residual_length=128, stream_interval=32,
    ),
    # one bit width for every token, ZipCache's channelwise keys / CS tokenwise values
    "uniform": dict(high_bits=2, low_bits=2, saliency="none"),
    # zipkv's recipe: the bits go to the keys. ZipCache's channelwise keys at 4 bits and
    # channel-separable tokenwise values at 2 bits, for every token (about 3 bits a value).
    # On the embedded model it keeps passkey retrieval where the 4/2 salient split loses it
    # (README, results/passkey_ablation.json).
    "zipkv": dict(high_bits=4, low_bits=4, high_value_bits=2, low_value_bits=2, saliency="none"),
}

# "bits" is a shorthand for presets with one width
_ONE_WIDTH = ("kivi", "uniform")


def make_cache(method: str, config, **params):
    """Build the cache of a named method for a model config, with overrides.

    Quantizing presets (PRESETS) give a ZipCache; eviction methods (StreamingLLM, H2O,
    SnapKV, PyramidKV, AdaKV, CAKE, ZipVL, ...: zipkv.eviction_cache) an EvictionCache and
    take `budget=` (tokens) or `ratio=` (fraction kept); "minicache" a MiniCache (cross-layer
    merging; `start_layer=`, `t=`, `retain_ratio=`, `direction_bits=`)."""
    from .eviction_cache import EVICTION_METHODS, make_eviction_cache

    if method == MINICACHE:
        return MiniCache(config, **params)
    if method in EVICTION_METHODS and method != "full":
        return make_eviction_cache(method, config, **params)
    if "sparse_prefill" in params:
        raise ValueError(f"sparse_prefill needs ZipVL's important set (the tau rule); {method} has none: "
                         "use zipvl or zipvl_v2")
    if method not in PRESETS:
        known = sorted(set(PRESETS) | set(EVICTION_METHODS) | {MINICACHE})
        raise ValueError(f"method must be one of {known} (got {method!r})")
    settings = dict(PRESETS[method])
    bits = params.pop("bits", None)
    if bits is not None:
        if method not in _ONE_WIDTH:
            raise ValueError(f"bits applies to {_ONE_WIDTH}; use high_bits/low_bits for {method!r}")
        settings.update(high_bits=bits, low_bits=bits)
    settings.update(params)
    if method == "kivi" and "value_group_size" not in params:
        # KIVI's 32-channel value groups, or the whole head when it is narrower
        settings["value_group_size"] = min(settings["value_group_size"], head_dim(config))
    return ZipCache(config, **settings)
