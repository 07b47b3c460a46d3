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

    # Set by to_static(): the logical length as a device counter (what the model's mask reads
    # inside a compiled step: a host int that changes every step would recompile it), and the
    # fixed key length the model's masks are built for (the static layers read their own
    # masks; a fixed size keeps one graph for every step). None: not static.
    device_length: torch.Tensor | None = None
    static_mask_length: int | None = None

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
        length = self.get_seq_length()
        for i, form in forms.items():
            layer = self.layers[i]
            self.layers[i] = form.build(self, i, layer, extra_tokens, prompt_padding)
            del layer
        self.adopt_layers()
        self.mark_static(length, extra_tokens)

    def mark_static(self, length: int, extra_tokens: int) -> None:
        """The device counter and mask size of a static cache, and every held tensor marked as a
        static address: a compiled step with CUDA graphs (transformers' generate, mode
        "reduce-overhead") then reads the buffers in place instead of copying them in as inputs."""
        if self.device_length is None:
            self.device_length = torch.tensor(length, device=self.layers[0].held_tensors()[0].device)
            self.static_mask_length = length + extra_tokens
        for layer in self.layers:
            # a step sets and clears this flag: an instance attribute from the start, so that a
            # compiled step's guards see the same layer __dict__ at every step (no recompile)
            layer.awaiting_queries = bool(getattr(layer, "awaiting_queries", False))
            for tensor in [*layer.held_tensors(), layer.nonfinite]:
                torch._dynamo.mark_static_address(tensor)
        torch._dynamo.mark_static_address(self.device_length)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == 0 and self.device_length is not None:
            self.device_length += key_states.shape[-2]
        return out

    def get_query_offset(self, layer_idx: int = 0):
        """transformers >= 5.2x asks this for the model's mask: inside a compiled step of a static
        cache the device counter (as transformers' StaticLayer does), else the host length."""
        if self.device_length is not None and torch.compiler.is_compiling():
            return self.device_length
        return super().get_query_offset(layer_idx)

    def get_mask_sizes(self, *args, **kwargs):
        if self.static_mask_length is not None:
            return self.static_mask_length, 0
        return super().get_mask_sizes(*args, **kwargs)

    @property
    def is_static(self) -> bool:
        from .static_forms import STATIC_LAYERS

        return all(isinstance(layer, STATIC_LAYERS) for layer in self.layers)


__all__ = ["ZipkvCache"]
