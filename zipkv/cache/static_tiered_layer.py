"""`StaticTieredLayer`: the static (CUDA-graph) form of a tiered evicting layer (ZipVL v1 / v2,
three_tier, MiKV: `TieredPolicy`), so that a decode step is a fixed sequence of kernels.

Storage: the layer's kept parts in preallocated buffers (static_aligned_parts.py): each packed
part one `StaticTier` (rows of different counts aligned by key group, holes masked), a 16-bit
part (MiKV's high tier) at the front of the fp16 buffer, then the window: stream_interval slots
for the tokens decoded since the last block. One bool mask `pad_mask [B, N]` over
[packed capacities | fp16 part | window] hides holes and unwritten slots; `lengths` (int32 on
the device: one count per packed part, then the fp16 buffer's) says what the kernel reads.

A step (captured): the new token into the window (`window_append` at lengths[-1]), attention
over everything with `decode_attention(..., lengths=lengths, return_lse=True)`, then the
attention each window token received from this query, exp(scale * q.k - lse) (the query heads
of a KV head averaged), added to the window's score sums and counts: the same numbers the eager
policy accumulates (`TieredPolicy._accumulate`), without a second pass over the cache.

Between steps (host): once the window holds stream_interval tokens, `flush()` hands views of it
to the eager policy's own block split (`TieredPolicy.split_block`), which appends each tier's
tokens to the static parts through the stores' `append` and empties the window
(`replace_all`): the same code path as the eager cache, so the same tokens go to the same tiers.
"""

from __future__ import annotations

import torch

from ..kernels.decode_attention import decode_attention
from ..kernels.window_step import window_append
from .eviction_layer import EvictingLayer
from .eviction_store import PackedStore
from .static_aligned_parts import AlignedFp16Part, AlignedPackedPart
from .static_evicting_layer import StaticEvictingLayer, check_static_kwargs
from .stats import tensor_bytes

TIER_NAMES = ("low", "high")  # TieredPolicy's stores, in attention order


def check_tiered(layer: EvictingLayer, method: str) -> None:
    """A ValueError naming `method` when a tiered layer's storage has no static form (checked
    before any layer moves, so a refusal leaves the cache as it was)."""
    stores = getattr(layer, "tier_stores", None) or {}
    fp16 = [name for name in TIER_NAMES if stores.get(name) is not None and not isinstance(stores[name], PackedStore)]
    if len(fp16) > 1:
        raise ValueError(f"method {method!r}: both tiers are 16-bit, which its static form does not take (one fp16 "
                         "part shares the buffer with the window)")
    for name in TIER_NAMES:
        store = stores.get(name)
        if isinstance(store, PackedStore) and any(len(tiers) != 1 for tiers in store.rows):
            raise ValueError(f"method {method!r}: the KV heads of a row hold different token counts in the {name} "
                             "tier, which its static form does not take")


class StaticTieredLayer(StaticEvictingLayer):
    """The static form of a tiered `EvictingLayer` (module docstring); follows the
    static-layer protocol of zipkv.graph_decode."""

    def __init__(self, layer: EvictingLayer, method: str, extra_tokens: int):
        check_tiered(layer, method)
        self.adopt(layer, method)
        self.policy = layer.policy  # shared by the cache's layers (held by them all)
        b, h, d = self.batch_size, self.num_heads, self.head_dim
        si = self.policy.stream_interval
        waiting = layer.recent_keys.shape[2]  # tokens since the last block (< stream_interval)
        blocks = (waiting + extra_tokens) // si  # blocks split while decoding extra_tokens
        group = self.policy.settings.key_group_size
        block_groups = 1 if group is None else -(-si // group)
        block_slots = si if group is None else block_groups * group
        template = layer.recent_keys.new_zeros(b, h, 1, d)
        self.parts, self.tier_stores, fp16 = [], {}, None
        for name in TIER_NAMES:
            store = layer.tier_stores.get(name)
            part = None
            if isinstance(store, PackedStore):
                part = AlignedPackedPart(store, template, method, blocks * block_slots, blocks * block_groups, blocks)
            elif store is not None:
                part = fp16 = AlignedFp16Part(store, self.store_dtype, method, blocks * si)
            self.tier_stores[name] = part
            if part is not None:
                self.parts.append(part)
        # a packed part with no room (no tokens, no block to come) is not attended
        self.packed = [p for p in self.parts if isinstance(p, AlignedPackedPart) and p.capacity]
        self.fp16_slots = 0 if fp16 is None else fp16.capacity
        offset = sum(p.capacity for p in self.packed)
        self.window_offset = offset + self.fp16_slots  # where the window starts in pad_mask
        # the fp16 buffer: [16-bit part | window of stream_interval slots]
        self.k_buf = layer.recent_keys.new_zeros(b, h, self.fp16_slots + si, d)
        self.v_buf = layer.recent_values.new_zeros(b, h, self.fp16_slots + si, d)
        self.pad_mask = torch.zeros(b, self.window_offset + si, dtype=torch.bool, device=self.device)
        self.lengths = torch.zeros(len(self.packed) + 1, dtype=torch.int32, device=self.device)
        at = 0
        for i, part in enumerate(self.packed):
            part.attach(self.pad_mask, at, self.lengths, i)
            at += part.capacity
        if fp16 is not None:
            fp16.attach(self.k_buf, self.v_buf, self.pad_mask, offset)
        self.score_sum = torch.zeros(b, h, si, dtype=torch.float32, device=self.device)
        self.score_count = torch.zeros(b, 1, si, dtype=torch.float32, device=self.device)
        self.recent_keys = self.recent_values = self.recent_real = None  # views of the window in flush()
        self.recent_unpadded = False  # the window's padding flags live on the device: read them
        self.recent_score_sum = self.recent_score_count = None
        self.replace_all(self.parts)  # an empty window
        c = self.fp16_slots
        self.k_buf[:, :, c:c + waiting], self.v_buf[:, :, c:c + waiting] = layer.recent_keys, layer.recent_values
        self.real_win[:, :waiting] = layer.recent_real
        self.score_sum[:, :, :waiting] = layer.recent_score_sum
        self.score_count[:, :, :waiting] = layer.recent_score_count
        self.n_win = waiting
        self.lengths[-1].fill_(c + waiting)

    @property
    def real_win(self) -> torch.Tensor:
        """The window's part of the mask (a view): which window slots are real tokens."""
        return self.pad_mask[:, self.window_offset:]

    # -- one decode step (captured) ---------------------------------------------------------------
    def write(self, keys, values) -> None:
        window_append(keys, values, self.k_buf, self.v_buf, self.lengths, self.nonfinite)
        self.lengths[-1:] += 1

    def attend(self, module, query, key, value, attention_mask, scaling, **kwargs):
        check_static_kwargs(kwargs)
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        segments = [part.tier.segment() for part in self.packed]
        output, lse = decode_attention(query, segments, self.k_buf, self.v_buf, mask=self.pad_mask, scale=scaling,
                                       lengths=self.lengths, return_lse=True)
        self.accumulate(query.detach(), lse, scaling)
        self.awaiting_queries = False
        return output.transpose(1, 2).contiguous(), None

    def accumulate(self, query, lse, scaling: float) -> None:
        """Add this query's attention on the window tokens to their scores, as the eager policy
        does: probabilities over everything held (float32), summed over the query tokens, the
        query heads of a KV head averaged; counts += 1 where a token is visible."""
        b, hq, tq, d = query.shape
        h = self.num_heads
        window = self.k_buf[:, :, self.fp16_slots:]
        logits = torch.einsum("bhgqd,bhkd->bhgqk", query.float().reshape(b, h, hq // h, tq, d), window.float())
        probs = torch.exp(logits * scaling - lse.reshape(b, h, hq // h, tq, 1))
        slots = torch.arange(window.shape[2], device=self.device)
        visible = (slots[None, :] < self.lengths[-1:] - self.fp16_slots) & self.real_win  # [B, W]
        probs = probs.masked_fill(~visible[:, None, None, None, :], 0.0)
        self.score_sum += probs.sum(dim=3).mean(dim=2)
        self.score_count += visible[:, None, :].float() * tq

    # -- host side between steps ------------------------------------------------------------------
    def advance(self) -> None:
        self.logical_length += 1
        self.n_win += 1

    def flush_due(self) -> bool:
        return self.n_win >= self.policy.stream_interval

    def flush(self, check_finite: bool = True) -> None:
        """The eager policy's block split over views of the window (outside the graph)."""
        if check_finite:
            self.check_finite()
        if not self.flush_due():
            return
        c, n = self.fp16_slots, self.n_win
        self.recent_keys, self.recent_values = self.k_buf[:, :, c:c + n], self.v_buf[:, :, c:c + n]
        self.recent_real = self.real_win[:, :n].clone()
        self.recent_score_sum, self.recent_score_count = self.score_sum[:, :, :n], self.score_count[:, :, :n]
        self.policy.split_block(self)  # appends to self.tier_stores, then replace_all()

    def replace_all(self, parts: list) -> None:
        """What the policy calls once a block is split: the parts are the static ones already
        (appended in place); the window empties."""
        self.recent_keys = self.recent_values = self.recent_real = None
        self.recent_score_sum = self.recent_score_count = None
        self.score_sum.zero_()
        self.score_count.zero_()
        self.real_win.fill_(True)
        self.n_win = 0
        self.lengths[-1].fill_(self.fp16_slots)

    def has_room(self) -> bool:
        """Whether one more step fits: a block the step completes must fit every part."""
        si = self.policy.stream_interval
        return self.n_win + 1 < si or all(part.has_room(si) for part in self.parts)

    # -- the accounting EvictionCache.stats() reads -----------------------------------------------
    def decode_inputs(self):
        return [part.tier.segment() for part in self.packed], self.k_buf

    def held_tensors(self) -> list[torch.Tensor]:
        own = [self.k_buf, self.v_buf, self.pad_mask, self.lengths, self.nonfinite, self.score_sum, self.score_count]
        return own + [t for part in self.parts for t in part.tensors()]

    def token_bytes(self) -> int:
        """The parts' buffers and the fp16 buffers, their capacity included."""
        return tensor_bytes([self.k_buf, self.v_buf] + [t for part in self.packed for t in part.tensors()])

    def held_slots(self) -> torch.Tensor:
        """bool [B, H, N] over the mask's layout: the slots that hold a kept token."""
        held = self.pad_mask.clone()
        held[:, self.window_offset + self.n_win:] = False
        return held[:, None, :].expand(-1, self.num_heads, -1)


__all__ = ["StaticTieredLayer", "check_tiered"]
