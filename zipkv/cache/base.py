"""`ZipkvCache`: what every zipkv cache (ZipCache, EvictionCache, MiniCache, VisualZipCache) does
the same way, once: the layers' back references, the switch to zipkv attention, stats() and
the move to static (CUDA-graph) form. A subclass builds its layers and keeps what is its own."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from ..attention import enable_zipkv_attention
from .fixed_layers import FixedLayers
from .layer_base import ZipkvLayer, query_length_of
from .limits import PositionLimit
from .stats import CacheStats


class ZipkvCache(FixedLayers, Cache):
    """A transformers Cache over `layers` built for `config` (model.config).

    needs_attention: False, or why the cache needs zipkv attention (the model's config is
    switched to it here: True for the plain reason, or a phrase for the error message, as
    `enable_zipkv_attention(needs=...)` takes it)."""

    # Set by to_static(): the fixed key length the model's masks are built for. The static
    # layers read their own masks (pad_mask, lengths on the device), never the model's; a fixed
    # size keeps one compiled graph for every step (a size that grows would recompile it).
    static_mask_length: int | None = None
    static_extra_tokens: int = 0
    # static_for_generate(): the new tokens the static form makes room for after the prompt,
    # the prompt's padding counts (from its mask), whether a step ran that the host has not
    # mirrored yet (compiled.between_steps)
    static_after_prompt: int | None = None
    prompt_padding: torch.Tensor | None = None
    step_pending: bool = False
    static_steps: int = 0

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
        self.sync_step()
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
        """The mask size of a static cache, and every held tensor marked as a
        static address: a compiled step with CUDA graphs (transformers' generate, mode
        "reduce-overhead") then reads the buffers in place instead of copying them in as inputs."""
        if self.static_mask_length is None:
            self.static_mask_length, self.static_extra_tokens = length + extra_tokens, extra_tokens
        for layer in self.layers:
            # a step sets and clears this flag: an instance attribute from the start, so that a
            # compiled step's guards see the same layer __dict__ at every step (no recompile)
            layer.awaiting_queries = bool(getattr(layer, "awaiting_queries", False))
            for tensor in [*layer.held_tensors(), layer.nonfinite]:
                torch._dynamo.mark_static_address(tensor)

    # -- transformers' generate() on the compiled path (compiled.py) -----------------------------
    def static_for_generate(self, model, max_new_tokens: int):
        """Make this new cache compileable for `model.generate(..., max_new_tokens=N)`, N <=
        max_new_tokens: the prompt runs eagerly, then the cache moves into its static form with
        room for max_new_tokens (at the first decode step) and generate() compiles the decode
        step (CUDA graphs on CUDA). `model` gets a forward pre-hook (compiled.between_steps_hook)
        that does the host work before each decode step with this cache. Returns the cache."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1 (got {max_new_tokens!r})")
        if self.get_seq_length() != 0:
            raise ValueError("static_for_generate() needs a new, empty cache (it converts after the prompt)")
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be the torch.nn.Module that generate() runs (got {type(model).__name__})")
        from ..compiled import between_steps_hook

        self.check_static()
        self.static_after_prompt = max_new_tokens
        self.step_hook = model.register_forward_pre_hook(between_steps_hook(self), with_kwargs=True)
        return self

    @property
    def is_compileable(self) -> bool:
        """transformers compiles generate()'s decode step for a cache that says so: a cache made
        by static_for_generate (a static cache that greedy_decode drives does its own steps)."""
        return self.static_after_prompt is not None

    def note_prompt_mask(self, attention_mask, batch: int) -> None:
        """zipkv attention hands a compressing layer's prompt mask here (the first one counts):
        to_static() needs each row's padding."""
        if self.static_after_prompt is not None and self.prompt_padding is None and not self.is_static:
            from ..compiled import prompt_padding_counts

            counts = prompt_padding_counts(attention_mask, batch)
            self.prompt_padding = torch.zeros(batch, dtype=torch.long) if counts is None else counts.cpu()

    def sync_step(self) -> None:
        """Mirror on the host a decode step that generate() ran (compiled.between_steps)."""
        if self.step_pending:
            from ..graph_decode import mirror_step

            self.step_pending = False
            mirror_step(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self.step_pending and not torch.compiler.is_compiling():
            self.sync_step()
        return super().get_seq_length(layer_idx)

    def get_query_offset(self, layer_idx: int = 0):
        """transformers >= 5.2x asks this for the model's mask. Inside a compiled step of a static
        cache a host length that changes every step would recompile the step: there a constant
        (the first decode step's offset) in a tensor, as transformers' StaticLayer returns one;
        the static layers never read the mask it shapes (static_mask_length)."""
        if self.static_mask_length is not None and torch.compiler.is_compiling():
            return torch.tensor(self.static_mask_length - self.static_extra_tokens)
        return super().get_query_offset(layer_idx)

    def get_mask_sizes(self, query_length, *args, **kwargs):
        if self.static_mask_length is not None:
            return self.static_mask_length, 0
        if self.static_after_prompt is not None and query_length_of(query_length) == 1 and self.get_seq_length():
            # generate()'s first decode step, before between_steps converts: the static size already
            return self.get_seq_length() + self.static_after_prompt, 0
        return super().get_mask_sizes(query_length, *args, **kwargs)

    @property
    def is_static(self) -> bool:
        from .static_forms import STATIC_LAYERS

        return all(isinstance(layer, STATIC_LAYERS) for layer in self.layers)


__all__ = ["ZipkvCache"]
