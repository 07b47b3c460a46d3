"""`ZipkvCache`: what every zipkv cache (ZipCache, EvictionCache, MiniCache, VisualZipCache) does
the same way, once: the layers' back references, the switch to zipkv attention, stats() and
the move to static (CUDA-graph) form. A subclass builds its layers and keeps what is its own."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from ..attention import enable_zipkv_attention
from .fixed_layers import FixedLayers
from .layer_base import ZipkvLayer
from .limits import PositionLimit
from .stats import CacheStats


class ZipkvCache(FixedLayers, Cache):
    """A transformers Cache over `layers` built for `config` (model.config).

    needs_attention: False, or why the cache needs zipkv attention (the model's config is
    switched to it here: True for the plain reason, or a phrase for the error message, as
    `enable_zipkv_attention(needs=...)` takes it)."""

    def __init__(self, config, layers: list, *, needs_attention: bool | str = False):
        super().__init__(layers=layers)
        self.position_limit = PositionLimit(config)  # prompt + new tokens vs max_position_embeddings
        self.adopt_layers()
        if needs_attention is True:
            enable_zipkv_attention(config)
        elif needs_attention:
            enable_zipkv_attention(config, needs=needs_attention)

    def adopt_layers(self) -> None:
        """Each zipkv layer's owner (a weak back reference: BackReference) is this cache; it lets
        zipkv attention tell this cache's notes from others'. transformers' layers get none."""
        for layer in self.layers:
            if isinstance(layer, ZipkvLayer):
                layer.owner = self

    # -- stats -----------------------------------------------------------------------------------
    def empty_stats(self) -> CacheStats:
        """The stats object each layer is added to (a subclass returns its own kind)."""
        return CacheStats()

    def stats(self) -> CacheStats:
        """What the cache holds, per layer (stats.layer_report), counted from the tensors."""
        stats = self.empty_stats()
        for layer in self.layers:
            stats.add_layer(layer)
        return stats

    # -- static (CUDA-graph) form ----------------------------------------------------------------
    def check_static(self) -> None:
        """A cache-level refusal of to_static() (a ValueError), before any layer is looked at."""

    def to_static(self, extra_tokens: int, prompt_padding=None) -> None:
        """Move every layer into preallocated buffers with room for `extra_tokens` more tokens,
        so that a decode step can be captured in a CUDA graph (zipkv.greedy_decode does this
        after the prompt; static_forms.py lists each layer kind's static form). prompt_padding:
        padding tokens per row of the prompt ([B] ints, or the prompt's 2-D attention_mask);
        needed when the batch is padded. Every layer is checked before any moves: a refusal (a
        ValueError naming what has no static form) leaves the cache as it was."""
        from .static_forms import STATIC_LAYERS, static_form  # the static layers build on the eager ones

        if not isinstance(extra_tokens, int) or isinstance(extra_tokens, bool) or extra_tokens < 1:
            raise ValueError(f"extra_tokens must be an integer >= 1 (got {extra_tokens!r})")
        self.check_static()
        if isinstance(prompt_padding, torch.Tensor) and prompt_padding.dim() == 2:
            prompt_padding = (prompt_padding == 0).sum(dim=1)
        forms = {}
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, STATIC_LAYERS):
                forms[i] = static_form(self, i, layer)
                forms[i].check(self, i, layer)
        # one layer at a time, each eager layer released as its copy is made: the peak is the
        # cache plus one layer, not two caches
        for i, form in forms.items():
            layer = self.layers[i]
            self.layers[i] = form.build(self, i, layer, extra_tokens, prompt_padding)
            del layer
        self.adopt_layers()

    @property
    def is_static(self) -> bool:
        from .static_forms import STATIC_LAYERS

        return all(isinstance(layer, STATIC_LAYERS) for layer in self.layers)


__all__ = ["ZipkvCache"]
