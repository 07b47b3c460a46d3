"""The kept parts of a tiered evicting layer in preallocated buffers (static_tiered_layer.py).

An eager tiered layer holds each part as a `PackedStore` (one `PackedTier` per batch row: rows
of a left-padded batch, and every decoded block, keep their own counts) or an `Fp16Store`.
The decode kernel reads one tier per part, so the rows share one buffer here:
- `AlignedPackedPart`: a `StaticTier`'s buffers. Every row's tokens are quantized exactly as the
  eager store quantizes them (each row's block alone, through a `PackedTier`), then written into
  slots aligned across rows: key groups (and value chunks) of the rows sit at the same group
  (chunk) index, so the tier's one `token_group` / `token_chunk` index serves every row. Each
  aligned group is as wide as the widest row's group there; a row's tokens are right-aligned in
  it and the slots before them are holes, hidden by the layer's bool mask. Attention is
  permutation-invariant over keys once RoPE is applied: where a token sits does not matter.
- `AlignedFp16Part`: a region at the front of the layer's fp16 buffer (before the window); each
  append takes as many slots as its widest row, rows right-aligned, holes masked.
Both take `append(keys, values, keep)` as the eager stores do, so `TieredPolicy` splits a block
into them through its own code. Every KV head of a row must keep the same count (the tiered
policies assign counts per row); else a ValueError names the method.
"""

from __future__ import annotations

import torch

from ..eviction.token_index import TokenIndex
from .eviction_store import PackedStore
from .static_tier import StaticTier
from .tier import PackedTier


def row_counts(keep: torch.Tensor, method: str) -> list[int]:
    """Tokens each row of keep [B, H, T] keeps, the same in every KV head (else a ValueError)."""
    counts = keep.sum(-1)
    if not bool((counts == counts[:, :1]).all()):
        raise ValueError(f"method {method!r}: the KV heads of a row keep different token counts in a tiered part, "
                         "which its static form does not take")
    return counts[:, 0].tolist()


def gather_row(x: torch.Tensor, keep: torch.Tensor, b: int) -> torch.Tensor:
    """Row b's kept tokens [1, H, n, D] of x [B, H, T, D], in logical order (as PackedStore)."""
    index = TokenIndex.from_mask(keep[b:b + 1]).dense()
    return x[b:b + 1].gather(2, index.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


def group_runs(tier: PackedTier | None, channel_separable: bool) -> list[list[tuple[int, int, int]]]:
    """A row tier's chunks (one per append with channel factors, else one), each a list of its
    key groups as (group index, first token, tokens)."""
    if tier is None or tier.num_tokens == 0:
        return []
    ends = tier.group_ends.tolist()
    starts = [0] + ends[:-1]
    groups = [(g, a, e - a) for g, (a, e) in enumerate(zip(starts, ends))]
    if not channel_separable:
        return [groups]
    chunk_ends = tier.chunk_ends.tolist()
    bounds = list(zip([0] + chunk_ends[:-1], chunk_ends))
    return [[g for g in groups if lo <= g[1] < hi] for lo, hi in bounds]


def aligned_layout(rows: list[list[list[tuple[int, int, int]]]]):
    """Where each row's groups go when the rows share group and chunk indices: (placements per
    row [(src token, tokens, dst slot, aligned group, src group, aligned chunk, src chunk)],
    token_group [slots], token_chunk [slots], chunks). Chunks are right-aligned across rows,
    groups inside a chunk too, a row's tokens inside its group's slots too."""
    placements = [[] for _ in rows]
    token_group, token_chunk = [], []
    n_chunks = max((len(r) for r in rows), default=0)
    group = 0
    for j in range(n_chunks):
        chunks = [(r[j - (n_chunks - len(r))], j - (n_chunks - len(r))) if j >= n_chunks - len(r) else ([], None)
                  for r in rows]
        n_groups = max(len(c) for c, _ in chunks)
        for k in range(n_groups):
            width = max(c[k - (n_groups - len(c))][2] for c, _ in chunks if k >= n_groups - len(c))
            for b, (c, src_chunk) in enumerate(chunks):
                if k >= n_groups - len(c):
                    g, start, n = c[k - (n_groups - len(c))]
                    placements[b].append((start, n, len(token_group) + width - n, group, g, j, src_chunk))
            token_group += [group] * width
            token_chunk += [j] * width
            group += 1
    return placements, token_group, token_chunk, n_chunks


class AlignedPackedPart:
    """A tiered layer's packed part (module docstring): `tier` is a StaticTier whose host counts
    say how many slots, groups and chunks are written; `mask` (the layer's pad mask, shared)
    marks the slots that hold tokens, from `offset` on."""

    def __init__(self, store: PackedStore, template: torch.Tensor, method: str, extra_slots: int,
                 extra_groups: int, extra_chunks: int):
        if any(len(tiers) != 1 for tiers in store.rows):
            raise ValueError(f"method {method!r}: the KV heads of a row hold different token counts in a "
                             f"{store.bits}-bit part, which its static form does not take")
        self.method = method
        proto = store.rows[0][0]
        self.block_args = (proto.bits, proto.key_group_size, proto.value_group_size, proto.channel_separable,
                           proto.value_bits)
        self.bits = proto.bits
        self.layout = aligned_layout([group_runs(tiers[0], proto.channel_separable) for tiers in store.rows])
        _, token_group, _, n_chunks = self.layout
        groups = token_group[-1] + 1 if token_group else 0
        self.tier = StaticTier(PackedTier(*self.block_args), template, len(token_group) + extra_slots, groups + extra_groups,
                               n_chunks + extra_chunks)
        self.rows = store.rows  # written into the buffers by attach(), then dropped
        self.mask = self.offset = None

    @property
    def capacity(self) -> int:
        return self.tier.capacity

    def attach(self, mask: torch.Tensor, offset: int, lengths: torch.Tensor, index: int) -> None:
        """Share the layer's mask (this part's slots from `offset` on) and device count
        lengths[index], then write the eager store's tokens."""
        self.mask, self.offset = mask, offset
        self.tier.count_in(lengths, index)
        self._write([tiers[0] for tiers in self.rows], self.layout)
        self.rows = self.layout = None

    def append(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> None:
        """PackedStore.append: each row's `keep` [B, H, T] tokens quantized alone (one block per
        row; a row that keeps none adds nothing), then written at aligned slots."""
        blocks = []
        for b, n in enumerate(row_counts(keep, self.method)):
            block = None
            if n:
                block = PackedTier(*self.block_args)
                block.append(gather_row(keys, keep, b), gather_row(values, keep, b))
            blocks.append(block)
        channel_separable = self.block_args[3]
        self._write(blocks, aligned_layout([group_runs(t, channel_separable) for t in blocks]))

    def _write(self, rows: list[PackedTier | None], layout) -> None:
        placements, token_group, token_chunk, n_chunks = layout
        tier = self.tier
        at, group_at, chunk_at = tier.num_tokens, tier.num_groups, tier.num_chunks
        slots, groups = len(token_group), (token_group[-1] + 1 if token_group else 0)
        chunks = n_chunks if tier.v_channel is not None else 0
        if at + slots > tier.capacity or group_at + groups > tier.k_scale.shape[2] or (
                tier.v_channel is not None and chunk_at + chunks > tier.v_channel.shape[2]):
            raise RuntimeError(f"method {self.method!r}: the static {self.bits}-bit part is full ({at} + {slots} "
                               f"slots of {tier.capacity})")
        if not slots:
            return
        dev = tier.k_codes.device
        tier.token_group[at:at + slots] = torch.tensor(token_group, dtype=torch.int32, device=dev) + group_at
        if tier.token_chunk is not None:
            tier.token_chunk[at:at + slots] = torch.tensor(token_chunk, dtype=torch.int32, device=dev) + chunk_at
        for b, (row, places) in enumerate(zip(rows, placements)):
            for start, n, dst, group, src_group, chunk, src_chunk in places:
                src, to = slice(start, start + n), slice(at + dst, at + dst + n)
                for name in ("k_codes", "v_codes", "v_scale", "v_min"):
                    getattr(tier, name)[b, :, to] = getattr(row, name)[0, :, src]
                tier.k_scale[b, :, group_at + group] = row.k_scale[0, :, src_group]
                tier.k_min[b, :, group_at + group] = row.k_min[0, :, src_group]
                if tier.v_channel is not None:
                    tier.v_channel[b, :, chunk_at + chunk] = row.v_channel[0, :, src_chunk]
                self.mask[b, self.offset + at + dst:self.offset + at + dst + n] = True
        tier.num_tokens, tier.num_groups, tier.num_chunks = at + slots, group_at + groups, chunk_at + chunks
        tier.device_groups.fill_(tier.num_groups)
        tier.device_chunks.fill_(tier.num_chunks)
        tier.lengths[tier.length_index].fill_(tier.num_tokens)

    def has_room(self, tokens: int) -> bool:
        """Whether a block of `tokens` per row fits, however its rows split it."""
        tier, g = self.tier, self.block_args[1]
        groups = 1 if g is None else -(-tokens // g)
        slots = tokens if g is None else groups * g
        chunks = tier.v_channel is None or tier.num_chunks + 1 <= tier.v_channel.shape[2]
        return tier.num_tokens + slots <= tier.capacity and tier.num_groups + groups <= tier.k_scale.shape[2] and chunks

    def tensors(self) -> list[torch.Tensor]:
        return self.tier.tensors()


class AlignedFp16Part:
    """A tiered layer's fp16 part (MiKV's high tier): slots [0, capacity) of the layer's fp16
    buffers (shared, with the window after them), `filled` of them written."""

    bits = 16

    def __init__(self, store, dtype: torch.dtype, method: str, extra_slots: int):
        self.method = method
        self.keys, self.values, valid = store.padded(dtype)  # right-aligned rows, holes first
        if not bool((valid == valid[:, :1]).all()):
            raise ValueError(f"method {method!r}: the KV heads of a row hold different token counts in a 16-bit part, "
                             "which its static form does not take")
        self.valid = valid[:, 0]
        self.filled = valid.shape[2]
        self.capacity = self.filled + extra_slots
        self.k_buf = self.v_buf = self.mask = None

    def attach(self, k_buf: torch.Tensor, v_buf: torch.Tensor, mask: torch.Tensor, offset: int) -> None:
        """Share the layer's fp16 buffers (this part at their front) and mask (from `offset` on),
        then write the eager store's tokens."""
        self.k_buf, self.v_buf, self.mask, self.offset = k_buf, v_buf, mask, offset
        w = self.filled
        k_buf[:, :, :w], v_buf[:, :, :w] = self.keys, self.values
        mask[:, offset:offset + w] = self.valid
        self.keys = self.values = self.valid = None

    def append(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> None:
        """Fp16Store.append: the `keep` [B, H, T] tokens after the held ones, rows right-aligned
        in the slots of their widest row."""
        counts = row_counts(keep, self.method)
        width = max(counts)
        if self.filled + width > self.capacity:
            raise RuntimeError(f"method {self.method!r}: the static 16-bit part is full ({self.filled} + {width} "
                               f"slots of {self.capacity})")
        for b, n in enumerate(counts):
            if n:
                to = slice(self.filled + width - n, self.filled + width)
                self.k_buf[b, :, to] = gather_row(keys, keep, b)[0].to(self.k_buf.dtype)
                self.v_buf[b, :, to] = gather_row(values, keep, b)[0].to(self.v_buf.dtype)
                self.mask[b, self.offset + to.start:self.offset + to.stop] = True
        self.filled += width

    def has_room(self, tokens: int) -> bool:
        return self.filled + tokens <= self.capacity

    def tensors(self) -> list[torch.Tensor]:
        return []  # the layer's fp16 buffers, counted by the layer


__all__ = ["AlignedFp16Part", "AlignedPackedPart", "aligned_layout"]
