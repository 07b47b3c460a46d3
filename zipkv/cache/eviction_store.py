"""Where an evicting cache keeps the tokens it did not drop.

Two stores, one interface. Each holds, for every (batch row b, KV head h), a run of tokens
in logical order; runs may differ in length (AdaKV head budgets, per-sequence budgets,
ZipVL's per-sequence important counts), and an evicted token takes no space at all:
- `Fp16Store`: tokens in the cache's storage dtype. Dense `[B, H, n, D]` when every run has
  the same length n; otherwise the flat varlen layout `keys [N, D]`, `values [N, D]`,
  `offsets [B*H + 1]` (cu_seqlens style, the layout of `zipkv.eviction.TokenIndex`).
  Optional per-token bookkeeping (`extras`, e.g. H2O's running totals) follows the same layout.
- `PackedStore`: tokens quantized in `PackedTier`s (docs/DESIGN.md layout). One tier per
  batch row `[1, H, n, D]` when the row's heads hold the same count, else one tier per
  (row, head) `[1, 1, n, D]`. Splitting a tier by head is exact: every code and parameter
  tensor of a tier is per (row, head), only the group boundaries are shared.

`padded(dtype)` gives attention a rectangle `[B, H, w, D]` plus `valid [B, H, w]`, each run
right-aligned (holes first), so a store followed by newer tokens reads like a left-padded
sequence in logical order. The holes exist only in that transient rectangle.
"""

from __future__ import annotations

import copy

import torch

from ..eviction.token_index import TokenIndex
from .stats import tensor_bytes
from .tier import PackedTier, refuse_nonfinite


def right_aligned_slots(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """int64 [N]: for the flat entries of runs with `lengths` [B, H], their index in a
    `[B*H*width]` rectangle where each run ends at the row's right edge."""
    flat_lengths = lengths.reshape(-1)
    runs = torch.arange(flat_lengths.numel(), device=lengths.device)
    run_of_entry = runs.repeat_interleave(flat_lengths)
    starts = torch.cumsum(flat_lengths, 0) - flat_lengths
    rank = torch.arange(int(flat_lengths.sum()), device=lengths.device) - starts[run_of_entry]
    return run_of_entry * width + (width - flat_lengths[run_of_entry]) + rank


def _pad_flat(flat: torch.Tensor, lengths: torch.Tensor, width: int, fill=0.0) -> torch.Tensor:
    """Flat [N, *rest] runs -> right-aligned rectangle [B, H, width, *rest]."""
    b, h = lengths.shape
    out = flat.new_full((b * h * width, *flat.shape[1:]), fill)
    out[right_aligned_slots(lengths, width)] = flat
    return out.reshape(b, h, width, *flat.shape[1:])


def valid_rectangle(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """bool [B, H, width]: True at the held slots of right-aligned runs."""
    positions = torch.arange(width, device=lengths.device)
    return positions >= (width - lengths)[..., None]


class Fp16Store:
    """Kept tokens unquantized (storage dtype), dense or flat varlen."""

    bits = 16

    def __init__(self, keys, values, lengths: torch.Tensor, offsets=None, extras=None):
        self.keys, self.values = keys, values
        self.offsets = offsets  # int64 [B*H + 1], only in the flat layout (held, counted)
        self.shape = tuple(lengths.shape)  # (B, H); lengths are derived, not held
        self.extras = extras or {}

    @classmethod
    def select(cls, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, extras=None) -> "Fp16Store":
        """The `keep` [B, H, T] tokens of keys/values [B, H, T, D] (and of every extras
        tensor [B, H, T]), in logical order."""
        index = TokenIndex.from_mask_counted(keep)
        extras = extras or {}
        if index.is_uniform:
            take = index.gather_dense
            return cls(take(keys), take(values), index.lengths, None, {k: take(v) for k, v in extras.items()})
        return cls(index.gather(keys), index.gather(values), index.lengths, index.offsets,
                   {k: index.gather(v) for k, v in extras.items()})

    @property
    def is_flat(self) -> bool:
        return self.offsets is not None

    @property
    def lengths(self) -> torch.Tensor:
        """int64 [B, H]: tokens held per (row, head)."""
        if self.is_flat:
            return (self.offsets[1:] - self.offsets[:-1]).reshape(self.shape)
        return torch.full(self.shape, self.keys.shape[2], dtype=torch.int64, device=self.keys.device)

    @property
    def width(self) -> int:
        if not self.is_flat:
            return self.keys.shape[2]
        lengths = self.lengths
        return int(lengths.max()) if lengths.numel() else 0

    def padded(self, dtype=None):
        """(keys, values) [B, H, w, D] in `dtype` (default: storage), valid [B, H, w]."""
        width, lengths = self.width, self.lengths
        if self.is_flat:
            keys = _pad_flat(self.keys, lengths, width)
            values = _pad_flat(self.values, lengths, width)
        else:
            keys, values = self.keys, self.values
        if dtype is not None:
            keys, values = keys.to(dtype), values.to(dtype)
        return keys, values, valid_rectangle(lengths, width)

    def padded_extra(self, name: str, fill: float = 0.0) -> torch.Tensor:
        """An extras tensor as the [B, H, w] rectangle matching padded()."""
        extra = self.extras[name]
        return _pad_flat(extra, self.lengths, self.width, fill) if self.is_flat else extra

    def append(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> None:
        """Add the `keep` [B, H, T] tokens of keys/values [B, H, T, D] after the held ones
        (rebuilds the layout: O(held) copy; extras are not carried)."""
        old_keys, old_values, old_valid = self.padded()
        keys, values = keys.to(old_keys.dtype), values.to(old_values.dtype)
        new = Fp16Store.select(torch.cat([old_keys, keys], 2), torch.cat([old_values, values], 2),
                               torch.cat([old_valid, keep], 2))
        self.__dict__.update(new.__dict__)

    def drop_extras(self) -> None:
        self.extras = {}

    def tensors(self) -> list[torch.Tensor]:
        held = [self.keys, self.values, self.offsets, *self.extras.values()]
        return [t for t in held if t is not None]

    def nbytes(self) -> int:
        return tensor_bytes(self.tensors())

    def token_bytes(self) -> int:
        """Bytes of the kept tokens themselves (keys + values), without layout or bookkeeping."""
        return tensor_bytes([self.keys, self.values])

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep / reorder / repeat batch rows (beam search, generate's expansion)."""
        keys, values, valid = self.padded()
        keep = valid[index]
        extras = {k: self.padded_extra(k)[index] for k in self.extras}
        new = Fp16Store.select(keys[index], values[index], keep, extras)
        self.__dict__.update(new.__dict__)


class PackedStore:
    """Kept tokens quantized at `bits`, one PackedTier per row (or per row and head)."""

    def __init__(self, bits: int, key_group_size, value_group_size, channel_separable: bool,
                 batch_size: int, num_heads: int):
        self.bits = bits
        self._tier_args = (bits, key_group_size, value_group_size, channel_separable)
        self.num_heads = num_heads
        # rows[b]: [tier over all heads] or [one tier per head]
        self.rows: list[list[PackedTier]] = [[PackedTier(*self._tier_args)] for _ in range(batch_size)]

    def _split_row(self, b: int) -> None:
        """Turn row b's all-heads tier into one tier per head (exact: slices, no requantization)."""
        (tier,) = self.rows[b]
        self.rows[b] = [_head_slice(tier, h, self._tier_args) for h in range(self.num_heads)]

    def append(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> None:
        """Quantize and append the `keep` [B, H, T] tokens of keys/values [B, H, T, D]; each
        append is one quantization group per run (no token is ever re-quantized)."""
        # one device read for the whole batch: the kept counts of every (b, h) and whether the
        # kept keys and values are finite (each read stalls a GPU's queue)
        finite = torch.stack([(torch.isfinite(x).all(-1) | ~keep).all() for x in (keys, values)])
        *flat, keys_ok, values_ok = torch.cat([keep.sum(-1).reshape(-1), finite.to(torch.int64)]).tolist()
        refuse_nonfinite(keys_ok, values_ok)
        heads = keep.shape[1]
        for b in range(keep.shape[0]):
            counts = flat[b * heads : (b + 1) * heads]
            if sum(counts) == 0:
                continue
            uniform = min(counts) == max(counts)
            if uniform and len(self.rows[b]) == 1:
                index = TokenIndex.from_uniform_mask(keep[b : b + 1], counts[0]).dense()
                self.rows[b][0].append(_gather(keys[b : b + 1], index), _gather(values[b : b + 1], index), checked=True)
                continue
            if len(self.rows[b]) == 1:
                self._split_row(b)
            for h in range(self.num_heads):
                index = TokenIndex.from_uniform_mask(keep[b : b + 1, h : h + 1], counts[h]).dense()
                k, v = keys[b : b + 1, h : h + 1], values[b : b + 1, h : h + 1]
                self.rows[b][h].append(_gather(k, index), _gather(v, index), checked=True)

    @property
    def lengths(self) -> torch.Tensor:
        rows = []
        for tiers in self.rows:
            if len(tiers) == 1:
                rows.append([tiers[0].num_tokens] * self.num_heads)
            else:
                rows.append([t.num_tokens for t in tiers])
        return torch.tensor(rows, dtype=torch.int64)

    @property
    def width(self) -> int:
        lengths = self.lengths
        return int(lengths.max()) if lengths.numel() else 0

    def padded(self, dtype):
        lengths = self.lengths
        width = self.width
        tiers = [t for row in self.rows for t in row if t.num_tokens]
        ref = tiers[0].k_codes if tiers else None
        b = len(self.rows)
        if ref is None:
            return None, None, torch.zeros(b, self.num_heads, 0, dtype=torch.bool)
        d = ref.shape[-1] * 8 // self.bits
        keys = torch.zeros(b, self.num_heads, width, d, dtype=dtype, device=ref.device)
        values = torch.zeros_like(keys)
        for row, row_tiers in enumerate(self.rows):
            for head, tier in enumerate(row_tiers):
                if not tier.num_tokens:
                    continue
                k, v = tier.dequantize(dtype)
                heads = slice(None) if len(row_tiers) == 1 else slice(head, head + 1)
                keys[row, heads, width - tier.num_tokens :] = k[0]
                values[row, heads, width - tier.num_tokens :] = v[0]
        return keys, values, valid_rectangle(lengths.to(keys.device), width)

    def tiers(self) -> list[PackedTier]:
        return [t for row in self.rows for t in row]

    def tensors(self) -> list[torch.Tensor]:
        return [t for tier in self.tiers() for t in tier.tensors()]

    def nbytes(self) -> int:
        return tensor_bytes(self.tensors())

    def token_bytes(self) -> int:
        return self.nbytes()

    def select_batch(self, index: torch.Tensor) -> None:
        # copy.copy: a repeated row gets its own tier objects (appends reassign attributes)
        self.rows = [[copy.copy(t) for t in self.rows[i]] for i in index.tolist()]


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D], index [B, H, n] -> [B, H, n, D]."""
    return x.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


def _head_slice(tier: PackedTier, head: int, tier_args) -> PackedTier:
    part = PackedTier(*tier_args)
    for name in ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min", "v_channel"):
        tensor = getattr(tier, name)
        if tensor is not None:
            setattr(part, name, tensor[:, head : head + 1].clone())
    for name in ("group_ends", "chunk_ends"):
        tensor = getattr(tier, name)
        if tensor is not None:
            setattr(part, name, tensor.clone())
    return part


def make_store(bits: int, settings, batch_size: int, num_heads: int):
    """An empty PackedStore for bits in {2, 4, 8}; None for 16 (Fp16Store is built by select)."""
    if bits == 16:
        return None
    return PackedStore(bits, settings.key_group_size, settings.value_group_size, settings.channel_separable,
                       batch_size, num_heads)
