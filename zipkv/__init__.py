"""zipkv: real KV-cache compression for Hugging Face transformers.

    import zipkv
    model, tok = zipkv.load_default_model()
    cache = zipkv.ZipCache(model.config, high_bits=4, low_bits=2, salient_ratio=0.6)
    model.generate(**tok(prompt, return_tensors="pt"), cache=cache, max_new_tokens=64)
    print(cache.stats())

transformers < 5.24 takes the cache as `past_key_values=cache`; `**zipkv.cache_kwargs(cache)`
spells it for the installed release.

Names are imported lazily (PEP 562), so `zipkv.quant` and friends load without transformers.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "ZipCache": "zipkv.cache",
    "CompressionConfig": "zipkv.cache",
    "CacheStats": "zipkv.cache",
    "make_cache": "zipkv.methods",
    "METHODS": "zipkv.registry",
    "MiniCache": "zipkv.cache.minicache",
    "PRESETS": "zipkv.methods",
    "enable_zipkv_attention": "zipkv.attention",
    "load_default_model": "zipkv.models",
    "load_model": "zipkv.models",
    "list_models": "zipkv.model_zoo",
    "make_eviction_cache": "zipkv.eviction_cache",
    "EvictionCache": "zipkv.eviction_cache",
    "cache_kwargs": "zipkv.transformers_support",
    "greedy_decode": "zipkv.graph_decode",
    "chunked_prefill": "zipkv.prefill",
    "StaticDecoder": "zipkv.graph_decode",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'zipkv' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
