"""A paged store of packed tokens: what a serving engine's paged KV memory holds for zipkv.

One pool of `num_pages` fixed-size pages, shared by every sequence; a sequence owns the pages
its row of the block table [B, max_pages] names (int32, -1 = none), in logical order, any
pages of the pool in any order. Format (zipkv's 4-bit keys / 2-bit values, or any 2/4/8 pair):
- keys channelwise, one (scale, min) per page, KV head and channel: the page IS the key group
  (`k_scale`, `k_min` [P, H, D]), codes `k_codes` uint8 [P, H, S, D * key_bits / 8];
- values tokenwise, one (scale, min) per token, head and value group (`v_scale`, `v_min`
  [P, H, S, D / value_group]), codes `v_codes` uint8 [P, H, S, D * value_bits / 8];
- plane bit layout as PackedTier (docs/DESIGN.md), so a page's codes are byte for byte what
  `PackedTier(key_group_size=S, front_partial_group=False, channel_separable=False)` holds for
  the same tokens: the contiguous store the tests compare against.
A sequence's last page may be partial (a prompt's tail); it is sealed: its key scales cover
its tokens only, so appending to it would change them. zipkv feeds pages from its fp16 window
a full page at a time (the window holds the rest), which is how a serving engine would too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant.packing import packed_width
from ..quant.quantizer import check_bits
from ..quant.schemes import dequantize_keys_channelwise, dequantize_values_tokenwise, quantize_keys_channelwise, \
    quantize_values_tokenwise


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1 (got {value!r})")
    return value


@dataclass(frozen=True)
class PagedStats:
    """bytes_held: every pool, block-table and length tensor (what the store allocated);
    bytes_used: the pages sequences own (+ the table and lengths); tokens: tokens held;
    pages_used / pages_free; fragmentation: the share of owned page slots holding no token
    (partial last pages)."""

    bytes_held: int
    bytes_used: int
    tokens: int
    pages_used: int
    pages_free: int
    fragmentation: float


class PagedStore:
    """Fixed-size pages of packed K/V in one pool; see the module docstring for the layout."""

    def __init__(self, num_pages: int, page_size: int, num_heads: int, head_dim: int, *, max_seqs: int,
                 max_pages_per_seq: int, key_bits: int = 4, value_bits: int = 2, value_group: int | None = None,
                 dtype: torch.dtype = torch.float16, device="cpu"):
        self.num_pages = _positive_int("num_pages", num_pages)
        self.page_size = _positive_int("page_size", page_size)
        self.num_heads = _positive_int("num_heads", num_heads)
        self.head_dim = _positive_int("head_dim", head_dim)
        self.max_seqs = _positive_int("max_seqs", max_seqs)
        self.max_pages_per_seq = _positive_int("max_pages_per_seq", max_pages_per_seq)
        self.key_bits, self.value_bits = check_bits(key_bits, "key_bits"), check_bits(value_bits, "value_bits")
        self.value_group = head_dim if value_group is None else _positive_int("value_group", value_group)
        if head_dim % self.value_group:
            raise ValueError(f"value_group must divide head_dim {head_dim} (got {value_group})")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32 (got {dtype})")
        p, h, s, d = num_pages, num_heads, page_size, head_dim
        kw, vw = packed_width(d, key_bits), packed_width(d, value_bits)
        new = dict(device=device)
        self.k_codes = torch.zeros(p, h, s, kw, dtype=torch.uint8, **new)
        self.k_scale = torch.zeros(p, h, d, dtype=dtype, **new)
        self.k_min = torch.zeros(p, h, d, dtype=dtype, **new)
        self.v_codes = torch.zeros(p, h, s, vw, dtype=torch.uint8, **new)
        self.v_scale = torch.zeros(p, h, s, d // self.value_group, dtype=dtype, **new)
        self.v_min = torch.zeros(p, h, s, d // self.value_group, dtype=dtype, **new)
        self.block_table = torch.full((max_seqs, max_pages_per_seq), -1, dtype=torch.int32, **new)
        self.lengths = torch.zeros(max_seqs, dtype=torch.int32, **new)
        self.free_pages = list(range(num_pages))  # host-side free list (the engine's allocator)
        self._pages: list[list[int]] = [[] for _ in range(max_seqs)]

    # -- allocation --------------------------------------------------------------------------
    def _check_seq(self, seq: int) -> int:
        if not isinstance(seq, int) or not 0 <= seq < self.max_seqs:
            raise ValueError(f"seq must be an integer in [0, {self.max_seqs - 1}] (got {seq!r})")
        return seq

    def pages_of(self, seq: int) -> list[int]:
        return list(self._pages[self._check_seq(seq)])

    def allocate(self, seq: int, n_pages: int, pages: list[int] | None = None) -> list[int]:
        """Give `seq` n_pages more pages: from the free list, or exactly `pages` (which must be free)."""
        self._check_seq(seq)
        _positive_int("n_pages", n_pages)
        if len(self._pages[seq]) + n_pages > self.max_pages_per_seq:
            raise ValueError(f"seq {seq} would own {len(self._pages[seq]) + n_pages} pages; "
                             f"max_pages_per_seq is {self.max_pages_per_seq}")
        if pages is None:
            if n_pages > len(self.free_pages):
                raise ValueError(f"{n_pages} pages asked, {len(self.free_pages)} free of num_pages={self.num_pages}")
            pages = self.free_pages[:n_pages]
        elif len(pages) != n_pages or len(set(pages)) != n_pages or not set(pages) <= set(self.free_pages):
            raise ValueError(f"pages {pages} must be {n_pages} distinct free pages")
        taken = set(pages)
        self.free_pages = [p for p in self.free_pages if p not in taken]
        start = len(self._pages[seq])
        self._pages[seq] += list(pages)
        self.block_table[seq, start : start + n_pages] = torch.tensor(pages, dtype=torch.int32)
        return list(pages)

    def free(self, seq: int) -> None:
        """Return every page of `seq` to the free list; its length becomes 0."""
        self._check_seq(seq)
        self.free_pages += self._pages[seq]
        self._pages[seq] = []
        self.block_table[seq] = -1
        self.lengths[seq] = 0

    # -- append ------------------------------------------------------------------------------
    def append(self, seq: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Quantize tokens keys / values [H, n, D] into `seq`'s next pages (allocated if missing).
        The sequence's held length must be a multiple of page_size (a partial page is sealed)."""
        self._check_seq(seq)
        h, n, d = keys.shape
        if (h, d) != (self.num_heads, self.head_dim) or values.shape != keys.shape:
            raise ValueError(f"keys and values must be [H={self.num_heads}, n, D={self.head_dim}] "
                             f"(got {tuple(keys.shape)}, {tuple(values.shape)})")
        length = int(self.lengths[seq])
        if length % self.page_size:
            raise ValueError(f"seq {seq} ends in a partial page ({length} tokens, page_size={self.page_size}): "
                             "its key scales are sealed; append whole pages before the tail")
        if n == 0:
            return
        first, count = length // self.page_size, -(-n // self.page_size)
        missing = first + count - len(self._pages[seq])
        if missing > 0:
            self.allocate(seq, missing)
        pages = torch.tensor(self._pages[seq][first : first + count], dtype=torch.long, device=self.k_codes.device)
        k_codes, k_scale, k_min, _ = quantize_keys_channelwise(keys[None], self.key_bits, self.page_size)
        v_codes, v_scale, v_min, _ = quantize_values_tokenwise(values[None], self.value_bits, self.value_group, False)
        pad = count * self.page_size - n

        def paged(x):  # [1, H, n, W] -> [count, H, S, W]
            x = torch.nn.functional.pad(x[0], (0, 0, 0, pad))
            return x.reshape(h, count, self.page_size, x.shape[-1]).transpose(0, 1)

        self.k_codes[pages] = paged(k_codes)
        self.v_codes[pages] = paged(v_codes)
        self.v_scale[pages] = paged(v_scale).to(self.v_scale.dtype)
        self.v_min[pages] = paged(v_min).to(self.v_min.dtype)
        self.k_scale[pages] = k_scale[0].transpose(0, 1).to(self.k_scale.dtype)
        self.k_min[pages] = k_min[0].transpose(0, 1).to(self.k_min.dtype)
        self.lengths[seq] = length + n

    # -- reading -----------------------------------------------------------------------------
    def dequantize(self, seq: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) [H, L, D] of `seq` (the reference the kernel is checked against)."""
        self._check_seq(seq)
        length = int(self.lengths[seq])
        n_pages = -(-length // self.page_size)
        pages = torch.tensor(self._pages[seq][:n_pages], dtype=torch.long, device=self.k_codes.device)
        h, s = self.num_heads, self.page_size

        def flat(x):  # [count, H, S, W] -> [1, H, count * S, W], cut to the length
            return x[pages].transpose(0, 1).reshape(1, h, n_pages * s, x.shape[-1])[:, :, :length]

        token_page = torch.arange(length, device=pages.device) // s
        k_scale, k_min = (x[pages].transpose(0, 1)[None] for x in (self.k_scale, self.k_min))  # [1, H, count, D]
        keys = dequantize_keys_channelwise(flat(self.k_codes), k_scale, k_min, token_page, self.key_bits, dtype)
        values = dequantize_values_tokenwise(flat(self.v_codes), flat(self.v_scale), flat(self.v_min), None, None,
                                             self.value_bits, dtype)
        return keys[0], values[0]

    def tensors(self) -> list[torch.Tensor]:
        return [self.k_codes, self.k_scale, self.k_min, self.v_codes, self.v_scale, self.v_min, self.block_table,
                self.lengths]

    def page_bytes(self) -> int:
        """Bytes of one page of the pool (codes and scales of every head)."""
        pool = self.tensors()[:6]
        return sum(t.numel() * t.element_size() for t in pool) // self.num_pages

    def stats(self) -> PagedStats:
        held = sum(t.numel() * t.element_size() for t in self.tensors())
        table = sum(t.numel() * t.element_size() for t in (self.block_table, self.lengths))
        used = sum(len(p) for p in self._pages)
        tokens = int(self.lengths.sum())
        return PagedStats(bytes_held=held, bytes_used=used * self.page_bytes() + table, tokens=tokens,
                          pages_used=used, pages_free=len(self.free_pages),
                          fragmentation=1.0 - tokens / (used * self.page_size) if used else 0.0)


__all__ = ["PagedStats", "PagedStore"]
