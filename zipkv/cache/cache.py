"""`ZipCache`: a transformers `Cache` whose full-attention layers are `ZipCacheLayer`s and whose
sliding-window / chunked-attention layers are `SlidingZipLayer`s (a packed ring over the window)."""

from __future__ import annotations

from transformers.cache_utils import DynamicSlidingWindowLayer

from .base import ZipkvCache
from .config import CompressionConfig
from .layer import ZipCacheLayer
from .sliding_layer import KINDS as SLIDING_KINDS, SlidingZipLayer


def layer_types(text_config) -> list[str]:
    """Attention type of every decoder layer, as transformers names them."""
    n = text_config.num_hidden_layers
    types = getattr(text_config, "layer_types", None)
    if types is None:
        if getattr(text_config, "sliding_window", None) is not None:
            types = ["sliding_attention"] * n
        elif getattr(text_config, "attention_chunk_size", None) is not None:
            types = ["chunked_attention"] * n
        else:
            types = ["full_attention"] * n
    return list(types)


def checked_layer_types(config) -> tuple[object, list[str]]:
    """(text config, layer types) of a model zipkv can compress, or a clear ValueError."""
    if config is None:
        raise ValueError("config must be the model's config (model.config)")
    text_config = config.get_text_config(decoder=True)
    if getattr(text_config, "is_encoder_decoder", False):
        raise ValueError("zipkv supports decoder-only models (got an encoder-decoder config)")
    types = layer_types(text_config)
    unknown = sorted(set(types) - {"full_attention", *SLIDING_KINDS})
    if unknown:
        raise ValueError(
            f"unsupported attention layer types {unknown} in config.layer_types "
            f"(zipkv knows {['full_attention', *SLIDING_KINDS]})"
        )
    return text_config, types


def require_full_attention(text_config, types: list[str], method: str) -> None:
    """A clear error for a method that compresses full-attention layers only, on a model whose
    every layer is sliding-window or chunked (it would run, compressing nothing)."""
    if "full_attention" not in types:
        window = getattr(text_config, "sliding_window", None) or getattr(text_config, "attention_chunk_size", None)
        raise ValueError(
            f"method {method!r} compresses full-attention layers only, and every layer of this model is "
            f"sliding-window or chunked (window {window}); the quantizing methods (zipkv, zipcache, kivi, "
            "uniform) compress window layers too"
        )


def window_of(text_config, kind: str) -> int:
    """The window of a sliding-window layer, or the chunk of a chunked-attention one."""
    return text_config.sliding_window if kind == "sliding_attention" else text_config.attention_chunk_size


class DetachedWindowLayer(DynamicSlidingWindowLayer):
    """transformers' own (exact) window layer, whose held states are detached: a forward run
    with grad enabled hands attention its own states (differentiable as with DynamicCache),
    but the cache keeps no autograd graph alive."""

    def update(self, key_states, value_states, *args, **kwargs):
        out = super().update(key_states, value_states, *args, **kwargs)
        self.keys, self.values = self.keys.detach(), self.values.detach()
        return out


def sliding_layer(text_config, kind):
    """transformers' own (fp16, exact) window layer, holding nothing that requires grad."""
    layer = DetachedWindowLayer(sliding_window=window_of(text_config, kind))
    layer.kind = kind  # the mask its static form computes (static_window_layer.py)
    return layer


def head_dim(config) -> int:
    text_config = config.get_text_config(decoder=True)
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


def window_layer(settings, text_config, kind: str, layer_idx: int):
    """A sliding-window / chunked layer under `settings`: compressed (a packed ring over the
    window), or transformers' exact one in a lossless cache ("full" equals DynamicCache)."""
    if settings.lossless:
        return sliding_layer(text_config, kind)
    return SlidingZipLayer(settings, layer_idx, window_of(text_config, kind), kind)


class ZipCache(ZipkvCache):
    """KV cache with saliency-aware mixed-precision quantization (ZipCache).

    Full-attention layers are compressed; so are sliding-window and chunked-attention layers
    (Gemma 3, Mistral, Llama 4: `SlidingZipLayer`), except in a lossless cache, which keeps
    transformers' own window layer. See `CompressionConfig` for every parameter.

    Example::

        cache = ZipCache(model.config, high_bits=4, low_bits=2, salient_ratio=0.6)
        model.generate(**inputs, cache=cache, max_new_tokens=64)
        print(cache.stats())
    """

    def __init__(self, config, **settings):
        self.settings = self.checked_settings(config, settings)
        text_config, types = checked_layer_types(config)
        layers = self.build_layers(text_config, types)
        group = self.settings.value_group_size
        if group is not None and head_dim(config) % group:
            raise ValueError(f"value_group_size must divide head_dim {head_dim(config)} (got {group})")
        # lossy layers hand every forward to zipkv attention (scoring, compression, decode path)
        super().__init__(config, layers, needs_attention=not self.settings.lossless)

    def checked_settings(self, config, settings: dict) -> CompressionConfig:
        return CompressionConfig(**settings)

    def build_layers(self, text_config, types: list[str]) -> list:
        return [ZipCacheLayer(self.settings, i) if kind == "full_attention"
                else window_layer(self.settings, text_config, kind, i) for i, kind in enumerate(types)]

    def check_static(self) -> None:
        if self.settings.lossless:
            raise ValueError("a lossless ZipCache has nothing to compress; use transformers' StaticCache for graphs")
