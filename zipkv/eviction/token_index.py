"""`TokenIndex`: which tokens of each (batch row, KV head) a tier holds.

One layout serves both cases:
- uniform budgets (every (b, h) keeps n tokens): `dense()` gives a [B, H, n] index tensor
  for `torch.gather` into rectangular storage;
- ragged budgets (AdaKV head-wise, per-sequence budgets): the flat varlen layout,
  `indices` [N] plus `offsets` [B*H + 1] (cu_seqlens style), so dropped tokens are not
  stored at all instead of being masked.

Positions inside each (b, h) run are ascending: the logical order of the sequence, which
keeps causal order and lets positions be recovered from order alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenIndex:
    indices: Tensor  # int64 [N]: token positions, one ascending run per (b, h), b-major
    offsets: Tensor  # int64 [B*H + 1]: run of (b, h) is indices[offsets[b*H+h]:offsets[b*H+h+1]]
    batch_size: int
    num_heads: int
    seq_len: int  # length T of the axis the positions index

    @classmethod
    def from_mask(cls, mask: Tensor) -> "TokenIndex":
        """Index of the True entries of a [B, H, T] mask (ascending positions per run)."""
        _check_mask(mask)
        b, h, t = mask.shape
        flat = mask.reshape(b * h, t)
        # nonzero walks row-major, so positions come out ascending inside each (b, h) row
        indices = flat.nonzero(as_tuple=True)[1]
        counts = flat.sum(dim=-1)
        offsets = torch.zeros(b * h + 1, dtype=torch.int64, device=mask.device)
        offsets[1:] = counts.cumsum(0)
        return cls(indices, offsets, b, h, t)

    @classmethod
    def from_mask_counted(cls, mask: Tensor) -> "TokenIndex":
        """from_mask for a caller that asks is_uniform / max_length next: the run lengths are
        read first (one device read, kept as host_lengths), and a uniform mask is indexed
        without nonzero (a second read)."""
        _check_mask(mask)
        lengths = tuple(mask.sum(-1).reshape(-1).tolist())
        if lengths and min(lengths) == max(lengths):
            return cls.from_uniform_mask(mask, lengths[0])
        index = cls.from_mask(mask)
        index.__dict__["host_lengths"] = lengths
        return index

    @classmethod
    def from_uniform_mask(cls, mask: Tensor, count: int) -> "TokenIndex":
        """Index of a [B, H, T] mask whose every (b, h) row holds exactly `count` True
        entries, a number the caller knows on the host: no device read (from_mask's nonzero
        waits for the GPU's queue to drain). Each True entry's slot in its run is its prefix
        count; the False entries scatter into one spill column past the end."""
        b, h, t = mask.shape
        slots = torch.where(mask, mask.cumsum(-1, dtype=torch.int64) - 1, count)
        dense = torch.empty(b, h, count + 1, dtype=torch.int64, device=mask.device)
        dense.scatter_(-1, slots, torch.arange(t, device=mask.device).expand(b, h, t))
        index = dense[..., :count]
        offsets = torch.arange(b * h + 1, device=mask.device, dtype=torch.int64) * count
        out = cls(index.reshape(-1), offsets, b, h, t)
        out.__dict__["host_lengths"] = (count,) * (b * h)  # known: no read to fill the cache
        return out

    @classmethod
    def from_dense(cls, index: Tensor, seq_len: int) -> "TokenIndex":
        """From a [B, H, n] index tensor (any order, no repeats); runs come out sorted."""
        if index.dim() != 3:
            raise ValueError(f"index must be [B, H, n], got {tuple(index.shape)}")
        b, h, n = index.shape
        if n and (int(index.min()) < 0 or int(index.max()) >= seq_len):
            raise ValueError(f"index positions must lie in [0, {seq_len - 1}]")
        indices = index.sort(dim=-1).values.reshape(-1).to(torch.int64)
        offsets = torch.arange(b * h + 1, device=index.device, dtype=torch.int64) * n
        return cls(indices, offsets, b, h, seq_len)

    @property
    def lengths(self) -> Tensor:
        """int64 [B, H]: tokens held per (batch row, head)."""
        return (self.offsets[1:] - self.offsets[:-1]).reshape(self.batch_size, self.num_heads)

    @property
    def total(self) -> int:
        return int(self.indices.numel())

    @cached_property
    def host_lengths(self) -> tuple[int, ...]:
        """The (b, h) run lengths on the host, copied once (one device sync for is_uniform,
        max_length and every later question; on a GPU each sync stalls the prefill's queue)."""
        return tuple((self.offsets[1:] - self.offsets[:-1]).tolist())

    @property
    def is_uniform(self) -> bool:
        lengths = self.host_lengths
        return not lengths or min(lengths) == max(lengths)

    @property
    def max_length(self) -> int:
        return max(self.host_lengths, default=0)

    def dense(self) -> Tensor:
        """int64 [B, H, n] positions; only when every (b, h) holds the same number n."""
        if not self.is_uniform:
            raise ValueError(
                "TokenIndex is ragged (lengths differ across batch rows / heads); "
                "use the flat layout (indices, offsets) or gather()"
            )
        n = self.max_length
        return self.indices.reshape(self.batch_size, self.num_heads, n)

    def segment_ids(self) -> Tensor:
        """int64 [N]: the run (b*H + h) each flat entry belongs to."""
        runs = torch.arange(self.batch_size * self.num_heads, device=self.indices.device)
        return runs.repeat_interleave(self.lengths.reshape(-1))

    def gather(self, x: Tensor) -> Tensor:
        """The held tokens of x [B, H, T, *rest] in the flat layout: [N, *rest]."""
        self._check_source(x)
        rest = x.shape[3:]
        flat = x.reshape(self.batch_size * self.num_heads * self.seq_len, *rest)
        return flat[self.segment_ids() * self.seq_len + self.indices]

    def gather_dense(self, x: Tensor) -> Tensor:
        """The held tokens of x [B, H, T, *rest] as [B, H, n, *rest] (uniform only)."""
        self._check_source(x)
        index = self.dense()
        expand = index.reshape(*index.shape, *([1] * (x.dim() - 3))).expand(*index.shape, *x.shape[3:])
        return x.gather(2, expand)

    def to_mask(self) -> Tensor:
        """bool [B, H, T], True where a token is held."""
        mask = torch.zeros(self.batch_size * self.num_heads * self.seq_len, dtype=torch.bool,
                           device=self.indices.device)
        mask[self.segment_ids() * self.seq_len + self.indices] = True
        return mask.reshape(self.batch_size, self.num_heads, self.seq_len)

    def _check_source(self, x: Tensor) -> None:
        if x.dim() < 3 or tuple(x.shape[:3]) != (self.batch_size, self.num_heads, self.seq_len):
            raise ValueError(
                f"tensor to gather must be [B={self.batch_size}, H={self.num_heads}, "
                f"T={self.seq_len}, ...], got {tuple(x.shape)}"
            )


def _check_mask(mask: Tensor) -> None:
    if mask.dim() != 3 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor [B, H, T], got {tuple(mask.shape)} {mask.dtype}")
