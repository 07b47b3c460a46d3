"""`StaticSlidingLayer`: a `SlidingZipLayer` (a packed ring over a sliding window or an
attention chunk) in preallocated buffers, so a decode step can be captured in a CUDA graph.

The eager layer lets the model's own window mask hide expired tokens (`get_mask_sizes`
reports the oldest held position). A captured graph builds the model's mask once, so this
form masks on the device instead:
- `PackedRing`: the quantized tokens in `slots` fixed slots of `block` tokens (one key group
  and one value chunk each: a StaticTier's buffers), with the position of every slot token in
  `positions` (int32; EMPTY for a slot token that holds nothing). A new key group (a block
  quantized between replays) goes to a slot whose group has expired for every later query, so
  the buffers never grow: bytes do not depend on how many tokens are decoded.
- The fp16 part is a window buffer of residual_length + block slots, as in StaticZipLayer;
  its slot i holds position (step position + 1 - count + i), computed in the step.
- A step appends the token at `lengths[-1]`, computes the mask [B, ring | window] from the
  positions, the step's position (`step_pos`, a device counter) and each row's left padding
  (`window_visible`: inside the window, or in the query's chunk, and not padding), and runs
  `decode_attention(..., mask, lengths)`; no host wait, no shape that changes.
- Between replays (`flush`) the eager layer's own policy (`inner.compress_due()`) quantizes
  the due block from views of the window, into a PackedTier exactly like the eager ring's
  (`ring_tier`); its key groups are then written into free slots (`PackedRing.place`).

Slots: a group is live while one of its tokens is within the window of a later query; the
newest tokens, at least residual_length, are in the fp16 part, so at most
ceil((window - 1) / block) + 1 full groups are live at once (plus the short groups the eager
ring held, each counted once). Bytes per batch row and KV head: slots * block tokens of codes,
value parameters, key group index and position (4 bytes each), slots key groups of scale and
minimum (and value channel factors), and the fp16 window of residual_length + block tokens.
"""

from __future__ import annotations

import copy
from bisect import bisect_right

import torch

from ..kernels.decode_attention import decode_attention
from ..kernels.packed import PackedSegment
from .sliding_layer import SlidingZipLayer, ring_tier
from .static_base import StaticLayerBase, check_holds_prompt
from .static_layer import append_decode_token
from .static_tier import StaticTier
from .tier import PackedTier

EMPTY = -(2 ** 30)  # the position of a slot token that holds nothing: outside every window and chunk


def window_visible(kind: str, window: int, positions: torch.Tensor, query_position, pads: torch.Tensor) -> torch.Tensor:
    """Which keys at `positions` (int, broadcast against pads[:, None]) the query at
    `query_position` (an int or an int32 [1] tensor) sees, per row [B, ...]: the model's
    sliding-window mask (kv > q - window) or chunk mask (the same chunk, counted from the row's
    first real token, as transformers' chunked_overlay), and never the row's left padding.
    Causality is the caller's: every held key is at most the query's position."""
    pads = pads[:, None]
    if kind == "sliding_attention":
        return (positions > query_position - window) & (positions >= pads)
    relative = positions - pads
    return (relative >= 0) & (relative.div(window, rounding_mode="floor")
                              == (query_position - pads).div(window, rounding_mode="floor"))


def padding_counts(prompt_padding: torch.Tensor | None, batch: int) -> torch.Tensor:
    """int64 [B] on the CPU: left-padding tokens per row, from [B] counts or the prompt's 2-D
    attention mask (None: no padding)."""
    if prompt_padding is None:
        return torch.zeros(batch, dtype=torch.int64)
    pads = (prompt_padding == 0).sum(dim=1) if prompt_padding.dim() == 2 else prompt_padding
    pads = pads.long().cpu()
    if pads.shape != (batch,) or bool((pads < 0).any()):
        raise ValueError(f"prompt_padding must be the prompt's 2-D attention mask or one non-negative count per batch "
                         f"row ({batch}; got shape {tuple(prompt_padding.shape)})")
    return pads


def ring_slots(window: int, block: int, group_sizes: list[int]) -> int:
    """Slots a ring needs (module docstring): the full groups live at once, plus each short
    group of the eager ring (a prompt's partial group)."""
    short = sum(size < block for size in group_sizes)
    return -(-(window - 1) // block) + 1 + short


def group_spans(tier: PackedTier) -> list[tuple[int, int, int]]:
    """(first token, end, value chunk) of each key group of a tier (one host read)."""
    ends = tier.group_ends.tolist()
    chunk_ends = [] if tier.chunk_ends is None else tier.chunk_ends.tolist()
    starts = [0] + ends[:-1]
    return [(a, b, bisect_right(chunk_ends, a)) for a, b in zip(starts, ends)]


def group_piece(tier: PackedTier, group: int, start: int, end: int, chunk: int) -> PackedSegment:
    """Key group `group` of a tier (tokens start..end, in value chunk `chunk`) as a segment of
    one group and one chunk, what StaticTier.write_block copies into a slot."""
    index = torch.zeros(end - start, dtype=torch.int32, device=tier.k_codes.device)
    per_token = {name: getattr(tier, name)[:, :, start:end] for name in ("k_codes", "v_codes", "v_scale", "v_min")}
    return PackedSegment(tier.bits, k_scale=tier.k_scale[:, :, group:group + 1], k_min=tier.k_min[:, :, group:group + 1],
                         token_group=index, v_channel=None if tier.v_channel is None else tier.v_channel[:, :, chunk:chunk + 1],
                         token_chunk=None if tier.v_channel is None else index, value_bits=tier.value_bits, **per_token)


class PackedRing:
    """Key groups of a window layer in `slots` reusable slots of `block` tokens (module docstring)."""

    def __init__(self, like: PackedTier, template: torch.Tensor, slots: int, block: int):
        """like: an empty tier with the layer's settings; template [B, H, 1, D] the fp16 dtype."""
        self.block, self.slots = block, slots
        self.store = StaticTier(like, template, slots * block, slots, slots)
        self.positions = torch.full((slots * block,), EMPTY, dtype=torch.int32, device=template.device)
        self.newest = [None] * slots  # host: the newest position each slot holds (None: empty)
        self.held = [0] * slots  # host: tokens each slot holds

    def num_tokens(self) -> int:
        return sum(self.held)

    def used(self) -> int:
        """Slot tokens the decode kernel reads: up to the end of the last slot ever written."""
        written = [i for i, newest in enumerate(self.newest) if newest is not None]
        return (written[-1] + 1) * self.block if written else 0

    def place(self, tier: PackedTier, first_position: int, expired) -> None:
        """Write every key group of `tier` (its tokens at first_position, first_position + 1, ...)
        into a slot that is empty or whose newest position satisfies expired(position)."""
        if not tier.num_tokens:
            return
        for group, (start, end, chunk) in enumerate(group_spans(tier)):
            free = [i for i, newest in enumerate(self.newest) if newest is None or expired(newest)]
            if not free:
                raise RuntimeError(f"window ring: all {self.slots} slots hold tokens a later query still sees")
            slot = free[0]
            at = slot * self.block
            self.store.write_block(group_piece(tier, group, start, end, chunk), at, slot, slot)
            n = end - start
            self.positions[at:at + n] = torch.arange(first_position + start, first_position + end,
                                                     dtype=torch.int32, device=self.positions.device)
            self.positions[at + n:at + self.block] = EMPTY
            self.newest[slot], self.held[slot] = first_position + end - 1, n

    def segment(self) -> PackedSegment:
        return self.store.segment()

    def tensors(self) -> list[torch.Tensor]:
        return self.store.tensors() + [self.positions]


class StaticSlidingLayer(StaticLayerBase, SlidingZipLayer):
    """The static form of a SlidingZipLayer (module docstring); follows graph_decode.StaticLayer."""

    awaiting_queries = False  # its own flag (the eager class reads its inner layer's)
    tier = property(lambda layer: layer.ring, doc="The packed ring (PackedRing).")
    fp16_keys = keys = property(lambda layer: layer.k_win, doc="The fp16 window buffer [B, H, W, D].")
    fp16_values = values = property(lambda layer: layer.v_win)

    @classmethod
    def from_layer(cls, layer: SlidingZipLayer, extra_tokens: int, prompt_padding: torch.Tensor | None):
        """A static copy of an eager window layer that holds a prompt. extra_tokens is not
        needed (the ring reuses its slots); prompt_padding: [B] left-padding tokens of each row
        of the prompt (None: none)."""
        check_holds_prompt(layer)
        self = cls.__new__(cls)
        self.layer_idx, self.kind, self.sliding_window = layer.layer_idx, layer.kind, layer.sliding_window
        self.settings, self.block, self.cumulative_length = layer.settings, layer.block, layer.cumulative_length
        self._group_ends = []
        # the policy (a shallow copy: the eager layer keeps its own tensors); between flushes it
        # holds no tensor, the buffers below hold everything
        self.inner = copy.copy(layer.inner)
        b, h, n_fp, d = layer.fp16_keys.shape
        dev = layer.device
        pads = padding_counts(prompt_padding, b)
        self.pads_host = pads.tolist()  # for the host's expiry test (a list: held_tensors() lists every tensor)
        self.pads = pads.to(device=dev, dtype=torch.int32)

        template = layer.fp16_keys.new_zeros(b, h, 1, d)
        sizes = [end - start for start, end, _ in group_spans(layer.tier)] if layer.tier.num_tokens else []
        self.ring = PackedRing(ring_tier(self.settings), template, ring_slots(self.sliding_window, self.block, sizes),
                               self.block)
        self.ring.place(layer.tier, layer.offset, self.expired_for(self.cumulative_length))

        w = self.settings.residual_length + self.block
        self.k_win, self.v_win = layer.fp16_keys.new_zeros(b, h, w, d), layer.fp16_values.new_zeros(b, h, w, d)
        self.k_win[:, :, :n_fp], self.v_win[:, :, :n_fp] = layer.fp16_keys, layer.fp16_values
        self.n_fp = n_fp
        self.window_slots = torch.arange(w, dtype=torch.int32, device=dev)
        self.step_pos = torch.tensor([self.cumulative_length], dtype=torch.int32, device=dev)
        self.lengths = torch.zeros(2, dtype=torch.int32, device=dev)  # [ring slot tokens read, window count]
        self._publish_counts()
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=dev)
        self._release_policy_tensors()
        return self

    def _publish_counts(self) -> None:
        # one fill per count (a host scalar in the launch): no copy from pageable memory
        self.lengths[0].fill_(self.ring.used())
        self.lengths[1].fill_(self.n_fp)

    def _release_policy_tensors(self) -> None:
        inner = self.inner
        inner.keys = inner.values = inner.score_sum = inner.score_count = inner.is_real = inner.is_sink = None
        inner.low = None  # the ring holds the quantized tokens

    def visible(self, positions, query_position, pads) -> torch.Tensor:
        return window_visible(self.kind, self.sliding_window, positions, query_position, pads)

    def expired_for(self, query_position: int):
        """expired(position): whether no query from query_position on sees that position, in any row."""
        pads = torch.tensor(self.pads_host)
        return lambda position: not bool(self.visible(torch.tensor(position), query_position, pads).any())

    def held_tokens(self) -> int:
        return self.ring.num_tokens() + self.n_fp

    # -- one decode step (captured) ---------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        append_decode_token(self, key_states, value_states)
        return key_states, value_states

    def step_mask(self) -> torch.Tensor:
        """bool [B, ring slot tokens + window slots]: what this step's query sees (device only)."""
        window_positions = self.step_pos + 1 - self.lengths[-1:] + self.window_slots
        positions = torch.cat([self.ring.positions, window_positions])
        return self.visible(positions[None, :], self.step_pos, self.pads)

    def attend(self, module, query, key, value, attention_mask, scaling, **kwargs):
        """The model's mask (built once per graph) is not read: step_mask() is this step's."""
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        output = decode_attention(query, [self.ring.segment()], self.k_win, self.v_win, mask=self.step_mask(),
                                  scale=scaling, lengths=self.lengths)
        self.step_pos += 1
        self.awaiting_queries = False
        return output.transpose(1, 2).contiguous(), None

    # -- host-side bookkeeping between replays ---------------------------------------------------
    def advance(self) -> None:
        self.n_fp += 1
        self.cumulative_length += 1

    def flush_due(self) -> bool:
        return self.n_fp - self.settings.residual_length >= self.block

    def can_flush_on_device(self) -> bool:
        return False  # the slot a block goes to is chosen on the host

    def flush(self, check_finite: bool = True) -> None:
        """The eager policy over views of the window (as the eager layer after a step's
        attention), the quantized block written into free ring slots."""
        if check_finite:
            self.check_finite()
        inner, n, query = self.inner, self.n_fp, self.cumulative_length
        b = self.k_win.shape[0]
        inner.keys, inner.values = self.k_win[:, :, :n], self.v_win[:, :, :n]
        # what the eager layer's _mark_padding leaves: the tokens the last query saw
        positions = torch.arange(query - n, query, device=self.k_win.device)
        inner.is_real = self.visible(positions[None, :], query - 1, self.pads)
        inner.is_sink = torch.zeros_like(inner.is_real)
        inner.score_sum = inner.score_count = torch.zeros((b, 0, 0), device=self.k_win.device)  # no saliency
        inner.low = ring_tier(self.settings)
        inner.compress_due()
        self.ring.place(inner.low, query - n, self.expired_for(query))
        kept = inner.keys.shape[2]
        self.k_win[:, :, :kept], self.v_win[:, :, :kept] = inner.keys, inner.values
        self.n_fp = kept
        self._publish_counts()
        self._release_policy_tensors()

    # -- the rest of the layer interface ----------------------------------------------------------
    def has_room(self) -> bool:
        return True  # the ring reuses its slots and the window is flushed

    def decode_inputs(self):
        """(segments, fp16 window buffer) the decode kernel reads (graph_decode.StaticLayer)."""
        return [self.ring.segment()], self.k_win

    def held_tensors(self) -> list[torch.Tensor]:
        own = [self.k_win, self.v_win, self.window_slots, self.step_pos, self.lengths, self.pads, self.nonfinite]
        return own + self.ring.tensors()

    def batch_rows(self) -> int:
        return self.k_win.shape[0]



__all__ = ["PackedRing", "StaticSlidingLayer", "window_visible"]
