"""The storage protocols: what a layer's policy and the attention path may ask of a store.

A per-layer cache is a storage (how tokens are packed) plus a policy (which tokens go
where). Policies talk to stores only through these methods; kernels read a store only
through its segment. Each store class of zipkv satisfies one of the protocols below
(tests/test_protocol.py checks them all), so a new quantization scheme is one class that
satisfies `TierStore`, and every policy and path that takes a tier takes it.

- `TierStore`: an append-only run of tokens per (batch row, KV head), the same count in
  every row and head (a precision tier: `PackedTier` for every 2/4/8-bit scheme, `Fp16Tier`,
  VidKV's `VidKVTier`, and the preallocated `StaticTier`, which adds `capacity` and a
  device-side count so a CUDA graph can read it).
- `KeptStore`: the tokens an evicting policy kept, whose counts may differ per row and head
  (`Fp16Store`, `PackedStore` of eviction_store.py); attention reads them as a right-aligned
  rectangle plus a validity mask (`padded`).
- `StaticStore`: a `TierStore` in preallocated buffers: `capacity` tokens, `segment()`
  (the whole buffers, what the decode kernel reads with a device-side length) beside
  `valid_segment()` (the valid tokens, what the reference path reads).

Batch selection (`select_batch(index)`: keep rows `index`, in that order) is how beam
search, batch selection and repetition reach every store.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TierStore(Protocol):
    bits: int  # of the keys (16: kept as they are)

    @property
    def num_tokens(self) -> int: ...

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store tokens [B, H, n, D] after those held (quantizing them if the tier does)."""

    def dequantize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) [B, H, num_tokens, D] in `dtype`: the reference every kernel is checked against."""

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held (what stats() counts)."""

    def nbytes(self) -> int: ...

    def select_batch(self, index: torch.Tensor) -> None: ...


@runtime_checkable
class StaticStore(TierStore, Protocol):
    capacity: int

    def segment(self): ...

    def valid_segment(self): ...


@runtime_checkable
class KeptStore(Protocol):
    """Built by the policy from the tokens it keeps (`Fp16Store.select`, `PackedStore.append`)."""

    def padded(self, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values [B, H, w, D], valid [B, H, w]): each run right-aligned, holes first."""

    def tensors(self) -> list[torch.Tensor]: ...

    def nbytes(self) -> int: ...

    def select_batch(self, index: torch.Tensor) -> None: ...


__all__ = ["KeptStore", "StaticStore", "TierStore"]
