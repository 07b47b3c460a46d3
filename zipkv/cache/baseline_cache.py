"""The baselines a user would pick, in zipkv's engine: `full` (the model's dtype), `fp8` and `int4`.

- `TokenQuantCache` ("fp8", "int4"): every full-attention layer a `TokenQuantLayer`, which
  quantizes each token per token-head when it is appended (fp8 e4m3 codes + a float32 scale,
  as vLLM's fp8 KV cache; int4 codes + a 16-bit scale and zero). The first forward (the
  prompt) attends to its exact states; every later forward to the dequantized cache, its own
  tokens as stored, which is what the static form's kernel reads. Window layers (Gemma 3's
  local layers) are kept exact, as the eviction caches keep them. No queries are needed:
  the model's own attention runs (SDPA), over the dequantized states.
- `FullCache` (`full`): the lossless ZipCache (equals DynamicCache), whose full-attention
  layers are `LosslessLayer`s so that they have a static form.

Both move to the static form of cache/static_flash_layer.py (flash-decoding over each row's
exact length) in `to_static()`, which also switches the model to zipkv attention (the static
layers attend through it); the eager forms leave the model's attention alone.
"""

from __future__ import annotations

import torch

from ..attention import enable_zipkv_attention
from ..quant.token_head import check_form
from .base import ZipkvCache
from .cache import ZipCache, checked_layer_types, require_full_attention, sliding_layer, window_layer
from .layer import ZipCacheLayer
from .layer_base import ZipkvLayer
from .tier import finite_flags


class TokenQuantLayer(ZipkvLayer):
    """One full-attention layer of a TokenQuantCache (module docstring)."""

    awaiting_queries = False  # the model's own attention reads what update() returns

    def __init__(self, form: str, layer_idx: int):
        super().__init__()
        from .token_head_tier import TokenHeadTier

        self.form, self.layer_idx = check_form(form), layer_idx
        self.tier = TokenHeadTier(form)
        self.seq_length = 0

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads, _, self.head_dim = key_states.shape
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        self.begin_update(key_states, value_states)
        # NaN/inf raise before anything is stored (a quantized NaN would poison its token
        # silently); both checked in one device read
        for name, ok in zip(("key_states", "value_states"), finite_flags(key_states, value_states).tolist()):
            if not ok:
                raise ValueError(f"{name} of layer {self.layer_idx} contain NaN/inf")
        first = self.tier.num_tokens == 0
        self.tier.append(key_states.detach(), value_states.detach())
        self.seq_length += key_states.shape[2]
        if first:  # the prompt attends to its exact states
            return key_states, value_states
        return self.tier.dequantize(self.dtype)

    def get_seq_length(self) -> int:
        return self.seq_length

    def state_shape(self) -> tuple[int, int, int, int]:
        """[B, H, T, D] of the states held (stats' fp16-equivalent bytes)."""
        return self.batch_size, self.num_heads, self.seq_length, self.head_dim

    def batch_rows(self) -> int:
        return self.batch_size

    def _select_batch(self, index):
        if self.is_initialized:
            self.tier.select_batch(index)
            self.batch_size = int(index.numel())

    def held_tensors(self) -> list[torch.Tensor]:
        return self.tier.tensors()

    def reset(self) -> None:
        owner = self.owner
        self.__init__(self.form, self.layer_idx)
        self.owner = owner

    def crop(self, tokens_to_remove: int):
        raise NotImplementedError("a quantized baseline cache cannot be cropped")

    def missing_attention_error(self) -> RuntimeError:  # never raised: no queries awaited
        return RuntimeError(f"layer {self.layer_idx} awaits no queries")


class LosslessLayer(ZipCacheLayer):
    """A lossless ZipCacheLayer (the `full` method) whose static form is the flash layer."""


class SwitchesAttentionWhenStatic:
    """to_static() then switches the model (its text config) to zipkv attention, which the
    static layers attend through; the eager layers needed none."""

    def to_static(self, extra_tokens: int, prompt_padding=None) -> None:
        super().to_static(extra_tokens, prompt_padding)
        enable_zipkv_attention(self.text_config, needs="the static form of a baseline cache needs")


class TokenQuantCache(SwitchesAttentionWhenStatic, ZipkvCache):
    """A cache of per token-head quantized tokens: form "fp8" or "int4" (module docstring)."""

    def __init__(self, config, form: str = "fp8", method: str | None = None):
        self.form = check_form(form)
        self.method = method or form
        text_config, types = checked_layer_types(config)
        require_full_attention(text_config, types, self.method)
        self.text_config = text_config
        layers = [TokenQuantLayer(form, i) if kind == "full_attention" else sliding_layer(text_config, kind)
                  for i, kind in enumerate(types)]
        super().__init__(config, layers)


class FullCache(SwitchesAttentionWhenStatic, ZipCache):
    """The lossless ZipCache of the `full` method, with a static form."""

    def __init__(self, config, **settings):
        self.text_config = config.get_text_config(decoder=True) if config is not None else None
        super().__init__(config, **settings)
        if not self.settings.lossless:
            raise ValueError("FullCache is lossless: high_bits and low_bits must be 16")

    def build_layers(self, text_config, types: list[str]) -> list:
        return [LosslessLayer(self.settings, i) if kind == "full_attention"
                else window_layer(self.settings, text_config, kind, i) for i, kind in enumerate(types)]

    def check_static(self) -> None:
        """Lossless: nothing to compress, but a static form (flash-decoding over the exact states)."""


__all__ = ["FullCache", "LosslessLayer", "TokenQuantCache", "TokenQuantLayer"]
