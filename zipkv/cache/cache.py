"""`ZipCache`: a transformers `Cache` whose full-attention layers are `ZipCacheLayer`s and whose
sliding-window / chunked-attention layers are `SlidingZipLayer`s (a packed ring over the window)."""

from __future__ import annotations

from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

from ..attention import enable_zipkv_attention
from .config import CompressionConfig
from .fixed_layers import FixedLayers
from .layer import ZipCacheLayer
from .sliding_layer import KINDS as SLIDING_KINDS, SlidingZipLayer
from .layer_base import ZipkvLayer
from .limits import PositionLimit
from .stats import CacheStats, fp16_equivalent, held_tensors_of, tensor_bytes


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


class ZipCache(FixedLayers, Cache):
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
        self.settings = CompressionConfig(**settings)
        text_config, types = checked_layer_types(config)
        layers = [self._new_layer(text_config, kind, i) for i, kind in enumerate(types)]
        group = self.settings.value_group_size
        if group is not None and head_dim(config) % group:
            raise ValueError(f"value_group_size must divide head_dim {head_dim(config)} (got {group})")
        super().__init__(layers=layers)
        self.position_limit = PositionLimit(config)  # prompt + new tokens vs max_position_embeddings
        for layer in layers:
            if isinstance(layer, ZipkvLayer):  # a weak back reference (BackReference); transformers' layers get none
                layer.owner = self
        if not self.settings.lossless:
            enable_zipkv_attention(config)

    def _new_layer(self, text_config, kind: str, layer_idx: int):
        if kind == "full_attention":
            return ZipCacheLayer(self.settings, layer_idx)
        if self.settings.lossless:  # transformers' exact window layer: "full" equals DynamicCache
            return sliding_layer(text_config, kind)
        return SlidingZipLayer(self.settings, layer_idx, window_of(text_config, kind), kind)

    def to_static(self, extra_tokens: int, prompt_padding=None) -> None:
        """Move every layer into preallocated buffers with room for `extra_tokens` more tokens,
        so that a decode step can be captured in a CUDA graph (zipkv.greedy_decode does this
        after the prompt). prompt_padding: padding tokens per row of the prompt ([B] ints, or
        the prompt's 2-D attention_mask); needed when the batch is padded."""
        from .static_layer import StaticZipLayer
        from .static_sliding_layer import StaticSlidingLayer

        if not isinstance(extra_tokens, int) or extra_tokens < 1:
            raise ValueError(f"extra_tokens must be an integer >= 1 (got {extra_tokens!r})")
        if self.settings.lossless:
            raise ValueError("a lossless ZipCache has nothing to compress; use transformers' StaticCache for graphs")
        if prompt_padding is not None and prompt_padding.dim() == 2:
            prompt_padding = (prompt_padding == 0).sum(dim=1)
        # One layer at a time, each eager layer released as its copy is made: the peak is the
        # cache plus one layer, not two caches. Window layers become rings with their own mask.
        for i, layer in enumerate(self.layers):
            if not self._is_static_layer(layer):
                static = StaticSlidingLayer if isinstance(layer, SlidingZipLayer) else StaticZipLayer
                self.layers[i] = static.from_layer(layer, extra_tokens, prompt_padding)
            del layer

    @staticmethod
    def _is_static_layer(layer) -> bool:
        from .static_layer import StaticZipLayer
        from .static_sliding_layer import StaticSlidingLayer

        return isinstance(layer, (StaticZipLayer, StaticSlidingLayer))

    @property
    def is_static(self) -> bool:
        return all(self._is_static_layer(layer) for layer in self.layers)

    def stats(self) -> CacheStats:
        stats = CacheStats()
        for layer in self.layers:
            if isinstance(layer, (ZipCacheLayer, SlidingZipLayer)):
                held = tensor_bytes(layer.held_tensors())
                # a window layer's get_seq_length() is the logical length; it holds fewer
                tokens = layer.held_tokens() if isinstance(layer, SlidingZipLayer) else layer.get_seq_length()
                shape = layer.keys.shape if layer.is_initialized else None
            else:
                held = tensor_bytes(held_tensors_of(layer))
                tokens = layer.keys.shape[2] if layer.is_initialized and layer.keys.dim() == 4 else 0
                shape = layer.keys.shape if tokens else None
            stats.tokens_per_layer.append(tokens)
            stats.bytes_per_layer.append(held)
            stats.fp16_bytes_per_layer.append(fp16_equivalent(tokens, shape[0], shape[1], shape[3]) if shape else 0)
        return stats


