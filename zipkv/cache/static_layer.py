"""`StaticZipLayer`: a `ZipCacheLayer` in preallocated buffers, so one decode step is a
fixed sequence of kernels that a CUDA graph can capture and replay.

What changes against `ZipCacheLayer` (the policy is the same code):
- The tiers are `StaticTier`s and the fp16 part is a window buffer of
  sink_tokens + residual_length + stream_interval tokens: nothing is reallocated while decoding.
- The valid-token counts live on the device (`lengths`: one per attended tier, then the
  window) and advance there; the decode kernel reads them (`decode_attention(lengths=...)`).
- A step appends one token and attends (and, for saliency, scores the window): no host
  synchronization, no shape that depends on the step. Quantizing a block (every
  stream_interval tokens) runs outside the graph, between replays: `flush_due()` says when,
  from host-side counts that mirror the device ones, and `flush()` runs ZipCacheLayer's own
  `compress_due()` over views of the buffers, then writes the result back.
- Padding (left-padded prompts) is a boolean mask over the buffers' fixed layout
  [low tier | high tier | window]: padding sits at the front of the low tier (it is quantized
  first, never salient) and of the window, whose part of the mask is `is_real` itself.
"""

from __future__ import annotations

import torch

from ..attention import hand_queries_to
from ..kernels.window_step import window_append, window_scores
from .layer import ZipCacheLayer, gather_tokens, rotated_decode_attention, salient_count, salient_split
from .static_base import StaticLayerBase, check_holds_prompt
from .static_tier import StaticTier
from .tier import PackedTier

_STATIC_FORMS: dict[type, type] = {}  # eager layer class -> its static class (built once)


def _future_blocks(settings, n_fp: int, extra_tokens: int) -> int:
    """Upper bound on the blocks quantized while `extra_tokens` more tokens arrive."""
    s = settings
    return max(0, (n_fp + extra_tokens - s.residual_length) // s.stream_interval) + 1


def static_form_of(layer_class: type) -> type:
    """The static class of an eager ZipCacheLayer class: StaticZipLayer's buffers and decode
    step in front of the eager class's policy (a VLM layer keeps its four-tier block split), so
    a flush between replays quantizes exactly as the eager layer would."""
    if layer_class is ZipCacheLayer or issubclass(layer_class, StaticZipLayer):
        return StaticZipLayer if layer_class is ZipCacheLayer else layer_class
    if layer_class not in _STATIC_FORMS:
        # (__module__ named: through ABCMeta, type() would call the class's module 'abc')
        _STATIC_FORMS[layer_class] = type(f"Static{layer_class.__name__}", (StaticZipLayer, layer_class),
                                          {"__module__": layer_class.__module__})
    return _STATIC_FORMS[layer_class]


def append_decode_token(layer, key_states, value_states) -> None:
    """The captured part of a static layer's update() (StaticZipLayer, StaticSlidingLayer): the
    one new token into the window buffers at layer.lengths[-1] (one launch on CUDA, the slot
    read on the device), that count advanced there, the queries asked for. NaN/inf are recorded
    in layer.nonfinite and raised at the next flush: a check now would stop the graph.
    Detached: a buffer written in place from a tensor that requires grad would join (and keep)
    the autograd graph."""
    if key_states.shape[2] != 1:
        raise ValueError(f"a static (CUDA-graph) cache decodes one token per step (got {key_states.shape[2]})")
    if layer.awaiting_queries:
        raise layer.missing_attention_error()
    window_append(key_states.detach(), value_states.detach(), layer.k_win, layer.v_win, layer.lengths, layer.nonfinite)
    layer.lengths[-1:] += 1
    layer.awaiting_queries = True
    hand_queries_to(layer)


def tier_attributes(layer) -> list[tuple[str, object]]:
    """(attribute name, tier) of every tier of `layer`, in attention order."""
    names = {id(value): name for name, value in vars(layer).items()}
    return [(names[id(tier)], tier) for tier in layer.tiers()]


def check_static_form(layer: ZipCacheLayer) -> None:
    """A ValueError when `layer` cannot move to its static form (StaticZipLayer.from_layer):
    it must hold a prompt, not be mid-forward, and keep only tiers the decode kernel reads."""
    check_holds_prompt(layer)
    for name, tier in tier_attributes(layer):
        # low and high receive every decoded block; other tiers (visual) what the window holds
        # now: a tier the static form cannot attend must neither hold nor be able to receive
        # tokens (they would silently leave attention and get_seq_length)
        if not isinstance(tier, PackedTier) and (name in ("low", "high") or tier.num_tokens or layer.keys.shape[2]):
            raise ValueError(
                f"layer {layer.layer_idx}: static (CUDA-graph) decoding reads packed tiers; the {name!r} tier is a "
                f"{type(tier).__name__} ({getattr(tier, 'bits', '?')} bits), which the decode kernel cannot read "
                "(16-bit and VidKV tiers are not supported): decode with model.generate() instead")


class StaticZipLayer(StaticLayerBase, ZipCacheLayer):
    @classmethod
    def from_layer(cls, layer: ZipCacheLayer, extra_tokens: int, prompt_padding: torch.Tensor | None):
        """A static copy of an eager layer that holds a prompt, with room for `extra_tokens`
        more tokens. prompt_padding: [B] padding tokens of each row's prompt (None: none).
        Every tier of the layer is copied (a VLM layer's visual tiers too), so the static
        form holds every token the eager one did."""
        s = layer.settings
        check_static_form(layer)
        tiers = tier_attributes(layer)
        self = static_form_of(type(layer)).__new__(static_form_of(type(layer)))
        self.__dict__.update(vars(layer))  # the policy's own state (settings, sinks, VLM tags and counts)
        self.prompt_done = True

        b, h, n_fp, d = layer.keys.shape
        blocks = _future_blocks(s, n_fp, extra_tokens)
        block_tokens = blocks * s.stream_interval
        groups = blocks * (1 if s.key_group_size is None else -(-s.stream_interval // s.key_group_size))
        # (in the tiers' basis: a rotating layer quantizes float32 rotated states, so an empty
        # tier's parameters get the dtype the eager tier picks for them, not the window's)
        template = self.to_tier_basis(*[layer.keys.new_zeros(b, h, 1, d)] * 2)[0]
        # Decoded blocks go to low, and to high when salient tokens are split off (mixed
        # precision); other tiers (visual) can only receive what the window holds now.
        window_groups = 1 if s.key_group_size is None else -(-n_fp // s.key_group_size)
        room = {"low": (block_tokens, groups, blocks)}
        room["high"] = (block_tokens, groups, blocks) if s.mixed_precision else (0, 0, 0)
        for name, tier in tiers:
            extra = room.get(name, (n_fp, window_groups, 1) if n_fp else (0, 0, 0))
            setattr(self, name, StaticTier(tier, template, *extra) if isinstance(tier, PackedTier) else tier)
        self.attended = [t for t in self.tiers() if isinstance(t, StaticTier) and t.capacity > 0]
        if self.attended[0] is not self.low:
            raise RuntimeError(f"layer {self.layer_idx}: the low tier must come first (padding sits at its front)")

        # The window: sinks, the recent residual tokens and at most one block waiting.
        w = s.sink_tokens + s.residual_length + s.stream_interval
        if n_fp > w:
            raise RuntimeError(f"layer {self.layer_idx}: {n_fp} fp16 tokens exceed the window of {w}")
        dev = self.device
        self.k_win = layer.keys.new_zeros(b, h, w, d)
        self.v_win = layer.values.new_zeros(b, h, w, d)
        track = s.needs_queries
        self.score_win = torch.zeros((b, h if track else 0, w if track else 0), dtype=torch.float32, device=dev)
        self.count_win = torch.zeros((b, int(track), w if track else 0), dtype=torch.float32, device=dev)
        self.sink_win = torch.zeros((b, w), dtype=torch.bool, device=dev)
        # the policy's other per-token flags of the fp16 part (a VLM layer's is_visual)
        self.flag_win = {name: torch.zeros((b, w), dtype=torch.bool, device=dev) for name in layer.fp16_token_flags()}
        offset = sum(t.capacity for t in self.attended)
        self.pad_mask = torch.ones((b, offset + w), dtype=torch.bool, device=dev)
        self.window_offset = offset
        self.lengths = torch.zeros(len(self.attended) + 1, dtype=torch.int32, device=dev)
        for i, tier in enumerate(self.attended):
            tier.count_in(self.lengths, i)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=dev)
        self.n_fp = 0
        self._store_window(layer.keys, layer.values, layer.score_sum, layer.score_count, layer.is_real, layer.is_sink,
                           layer.fp16_token_flags())

        pads_in_window = (~layer.is_real).sum(dim=1)
        pads = pads_in_window if prompt_padding is None else prompt_padding.to(dev)
        if bool((pads < pads_in_window).any()):
            raise ValueError("prompt_padding counts fewer padding tokens than the cache's fp16 part holds")
        self.pads_low = pads - pads_in_window
        self.padded = bool((pads > 0).any())
        self.window_padded = bool((pads_in_window > 0).any())
        self._write_low_mask()
        self.keys, self.values = self.k_win, self.v_win  # shapes for stats(); the policy gets views in flush()
        self._drop_fp16_part_views()
        return self

    def _drop_fp16_part_views(self) -> None:
        """Between flushes the policy's fp16-part tensors live only in the window buffers."""
        self.score_sum = self.score_count = self.is_real = self.is_sink = None
        for name in self.flag_win:
            setattr(self, name, None)

    @property
    def real_win(self) -> torch.Tensor:
        """The window's part of the padding mask (a view): which window slots are real tokens."""
        return self.pad_mask[:, self.window_offset:]

    # -- host-side bookkeeping between replays ---------------------------------------------------
    def _store_window(self, keys, values, score_sum, score_count, is_real, is_sink, flags) -> None:
        """Put the eager fp16 part (compact tensors of n tokens) at the window's front, reset
        the slots after it, and publish the counts to the device."""
        n = keys.shape[2]
        self.k_win[:, :, :n] = keys
        self.v_win[:, :, :n] = values
        if self.settings.needs_queries:
            self.score_win.zero_()
            self.count_win.zero_()
            self.score_win[:, :, :n] = score_sum
            self.count_win[:, :, :n] = score_count
        self.real_win.fill_(True)
        self.real_win[:, :n] = is_real
        self.sink_win.zero_()
        self.sink_win[:, :n] = is_sink
        for name, flag in flags.items():
            self.flag_win[name].zero_()
            self.flag_win[name][:, :n] = flag
        self.n_fp = n
        # one fill per count (a host scalar in the launch): no copy from pageable memory, no wait
        for i, count in enumerate([t.num_tokens for t in self.attended] + [n]):
            self.lengths[i].fill_(count)

    def _write_low_mask(self) -> None:
        if self.padded:
            cap = self.low.capacity
            self.pad_mask[:, :cap] = torch.arange(cap, device=self.device)[None, :] >= self.pads_low[:, None]

    def advance(self) -> None:
        """The host's mirror of one decoded token (the device counts advanced in the step)."""
        self.n_fp += 1

    def flush_due(self) -> bool:
        """Whether compress_due() would quantize or protect sinks now (host counts only)."""
        s = self.settings
        if not self.sinks_chosen and s.sink_tokens and self.n_fp > s.sink_tokens + s.residual_length:
            return True
        return self.n_fp - self.num_sinks - s.residual_length >= s.stream_interval

    def flush(self, check_finite: bool = True) -> None:
        """ZipCacheLayer's policy over views of the window, results written back (outside the
        graph). check_finite=False: the caller checked `nonfinite` (one wait for many layers)."""
        if check_finite:
            self.check_finite()
        n = self.n_fp
        self.keys, self.values = self.k_win[:, :, :n], self.v_win[:, :, :n]
        self.score_sum, self.score_count = self.score_win[:, :, :n], self.count_win[:, :, :n]
        self.is_real, self.is_sink = self.real_win[:, :n].clone(), self.sink_win[:, :n]
        for name, flag in self.flag_win.items():
            setattr(self, name, flag[:, :n])
        pads_before = (~self.is_real).sum(dim=1)
        self.compress_due()
        kept = [t.clone() for t in (self.keys, self.values, self.score_sum, self.score_count, self.is_real, self.is_sink)]
        self._store_window(*kept, {name: flag.clone() for name, flag in self.fp16_token_flags().items()})
        pads_after = (~self.is_real).sum(dim=1)
        self.pads_low = self.pads_low + pads_before - pads_after
        self.window_padded = bool((pads_after > 0).any())
        self._write_low_mask()
        # nothing but the buffers stays held (stats() counts held_tensors())
        self.keys, self.values = self.k_win, self.v_win
        self._drop_fp16_part_views()

    # -- the same block quantization with device-side offsets (capturable) -------------------------
    def can_flush_on_device(self) -> bool:
        """Whether the due block has the fixed shape flush_on_device() handles: the sinks are
        chosen (they sit at the window's front), no padding in the window, exactly one block
        due, and room for it."""
        s = self.settings
        if type(self).compress_due is not ZipCacheLayer.compress_due or type(self)._quantize_block is not ZipCacheLayer._quantize_block:
            return False  # another policy (a VLM layer's): flush() runs it on the host
        n_high = self._salient_count()
        # A block that does not fit goes to flush(), which says so (the device path would write
        # past the buffers' end).
        fits = self.low.has_room(s.stream_interval - n_high) and (not n_high or self.high.has_room(n_high))
        return ((self.sinks_chosen or not s.sink_tokens) and not self.window_padded and fits
                and self.n_fp == self.num_sinks + s.residual_length + s.stream_interval)

    def _salient_count(self) -> int:
        """The eager policy's count (salient_count) for a full block with no padding, the only
        kind flush_on_device() quantizes."""
        s = self.settings
        if s.mixed_precision and s.saliency != "none":
            return salient_count(s.salient_ratio, torch.ones(1, s.stream_interval, dtype=torch.bool))
        return 0

    def flush_on_device(self) -> None:
        """flush() for a block of fixed shape (can_flush_on_device) with every offset read on
        the device: the same launches each time, so one CUDA graph holds all layers' block
        quantization. The result equals flush()'s (same policy, same quantizer). The caller
        checked `nonfinite` and calls mirror_device_flush() on the host afterwards."""
        s = self.settings
        sinks, block, n = self.num_sinks, s.stream_interval, self.n_fp
        keys, values = self.k_win[:, :, sinks:sinks + block], self.v_win[:, :, sinks:sinks + block]
        n_high = self._salient_count()
        if n_high == 0:
            self.low.append_on_device(*self.to_tier_basis(keys, values))
        else:
            real = self.real_win[:, sinks:sinks + block]
            low_idx, high_idx = salient_split(self.score_win[:, :, sinks:sinks + block],
                                              self.count_win[:, :, sinks:sinks + block], real, n_high,
                                              s.saliency == "probe")
            # (rotation is per token: gathering before or after it gives the same states)
            self.low.append_on_device(*self.to_tier_basis(gather_tokens(keys, low_idx), gather_tokens(values, low_idx)))
            self.high.append_on_device(*self.to_tier_basis(gather_tokens(keys, high_idx),
                                                           gather_tokens(values, high_idx)))
        kept = n - sinks - block  # the residual window moves to just after the sinks
        for buffer in (self.k_win, self.v_win):
            buffer[:, :, sinks:sinks + kept] = buffer[:, :, sinks + block:n].clone()
        if s.needs_queries:
            for buffer in (self.score_win, self.count_win):
                buffer[:, :, sinks:sinks + kept] = buffer[:, :, sinks + block:n].clone()
                buffer[:, :, sinks + kept:] = 0
        self.lengths[-1:] -= block

    def mirror_device_flush(self) -> None:
        n_high = self._salient_count()
        self.low.mirror_append(self.settings.stream_interval - n_high)
        if n_high:
            self.high.mirror_append(n_high)
        self.n_fp -= self.settings.stream_interval

    # -- one decode step (captured) ---------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        append_decode_token(self, key_states, value_states)
        self.returned_fp16_only = True
        return key_states, value_states

    def attend(self, module, query, key, value, attention_mask, scaling, **kwargs):
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        segments = [t.segment() for t in self.attended]
        output = rotated_decode_attention(self.rotation, query, segments, self.k_win, self.v_win,
                                          mask=self.pad_mask if self.padded else None, scale=scaling, lengths=self.lengths)
        if self.settings.needs_queries:  # saliency of the window slots, one launch on CUDA
            window_scores(query.detach(), self.k_win, self.lengths, self.real_win, self.score_win, self.count_win, scaling)
        self.awaiting_queries = False
        return output.transpose(1, 2).contiguous(), None

    # -- the rest of the layer interface ----------------------------------------------------------
    def get_seq_length(self) -> int:
        return sum(t.num_tokens for t in self.attended) + self.n_fp

    def has_room(self) -> bool:
        return True  # the window never fills; a tier that does is refused by flush() ("static tier full")

    def decode_inputs(self):
        """(segments, fp16 window buffer) the decode kernel reads (graph_decode.StaticLayer)."""
        return [t.segment() for t in self.attended], self.k_win

    def held_tensors(self) -> list[torch.Tensor]:
        own = [self.k_win, self.v_win, self.score_win, self.count_win, self.sink_win, self.pad_mask,
               self.lengths, self.nonfinite, self.pads_low, *self.flag_win.values()]
        own += [] if self.rotation is None else self.rotation.tensors()
        return own + [t for tier in self.tiers() for t in tier.tensors()]



__all__ = ["StaticZipLayer", "check_static_form"]
