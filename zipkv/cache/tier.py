"""`PackedTier`: the packed codes and parameters of one precision tier of one layer.

Append-only: every quantization event (the prompt, then one block every stream_interval
decoded tokens) appends its tokens with their own parameters, so no token is ever
re-quantized from dequantized values. The layout is the one in docs/DESIGN.md, which the
kernels read directly.
"""

from __future__ import annotations

import torch

from ..quant.schemes import (
    dequantize_keys_channelwise,
    dequantize_values_tokenwise,
    quantize_keys_channelwise,
    quantize_values_tokenwise,
)
from ..kernels.quantize_pack import quantize_pack_keys, quantize_pack_values


def finite_flags(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """bool [2] on the device: keys all finite, values all finite; a caller stacks it with what
    else it reads, so that one device read serves all (each read stalls a GPU's queue)."""
    return torch.stack([torch.isfinite(keys).all(), torch.isfinite(values).all()])


def refuse_nonfinite(keys_ok, values_ok) -> None:
    """ValueError naming keys or values when their flag (read from finite_flags) is false."""
    for name, ok in (("keys", keys_ok), ("values", values_ok)):
        if not ok:
            raise ValueError(f"cannot quantize {name} that contain NaN or inf")


def check_finite(keys: torch.Tensor, values: torch.Tensor) -> None:
    """ValueError naming keys or values when they hold NaN/inf: both checked in one device read
    (a prefill on a GPU stalls its queue at each read)."""
    refuse_nonfinite(*finite_flags(keys, values).tolist())


class PackedTier:
    def __init__(
        self, bits: int, key_group_size: int | None, value_group_size: int | None, channel_separable: bool,
        value_bits: int | None = None, front_partial_group: bool = True,
    ):
        self.bits = bits  # of the keys
        # An append's partial key group goes first: groups then end at the same distances
        # from the newest token in every row, so a left-padded row's real tokens fall in the
        # same groups as when the row runs alone (its padding, overwritten with a real token
        # of the block, widens no range), and in a ring over a window
        # (zipkv.cache.sliding_layer) the short group is the oldest, the first to expire.
        self.front_partial_group = front_partial_group
        self.value_bits = value_bits or bits
        self.key_group_size = key_group_size
        self.value_group_size = value_group_size
        self.channel_separable = channel_separable
        self.k_codes = self.k_scale = self.k_min = self.group_ends = None
        self.v_codes = self.v_scale = self.v_min = self.v_channel = self.chunk_ends = None

    def _quantize_keys(self, keys, out_dtype):
        """quant.schemes' channelwise keys; with the parameters' default dtype through the fused
        kernel (kernels/quantize_pack.py: one launch on CUDA, the reference elsewhere)."""
        if out_dtype is None:
            return quantize_pack_keys(keys, self.bits, self.key_group_size, check_finite=False)
        return quantize_keys_channelwise(keys, self.bits, self.key_group_size, check_finite=False, out_dtype=out_dtype)

    def _quantize_values(self, values, out_dtype):
        if out_dtype is None:
            return quantize_pack_values(values, self.value_bits, self.value_group_size, self.channel_separable,
                                        check_finite=False)
        return quantize_values_tokenwise(values, self.value_bits, self.value_group_size, self.channel_separable,
                                         check_finite=False, out_dtype=out_dtype)

    @property
    def num_tokens(self) -> int:
        return 0 if self.k_codes is None else self.k_codes.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor, param_dtypes=(None, None), checked: bool = False) -> None:
        """Quantize and append tokens [B, H, n, D] (n may be 0). param_dtypes: the (keys',
        values') parameter dtypes; None: chosen from the states (`param_dtype`). checked: the
        caller has refused NaN/inf itself (in a device read it makes anyway)."""
        n = keys.shape[2]
        if n == 0:
            return
        group = self.key_group_size or n
        front = n % group if self.front_partial_group else 0
        parts = [(0, front), (front, n)] if front else [(0, n)]
        if not checked:
            check_finite(keys, values)
        keys_q = [self._quantize_keys(keys[:, :, a:b], param_dtypes[0]) for a, b in parts]
        k_codes, k_scale, k_min = (torch.cat([q[i] for q in keys_q], 2) if front else keys_q[0][i] for i in range(3))
        v_codes, v_scale, v_min, v_channel = self._quantize_values(values, param_dtypes[1])
        start = self.num_tokens
        ends = [start + a + min((i + 1) * group, b - a) for (a, b), q in zip(parts, keys_q) for i in range(q[3])]
        ends = torch.tensor(ends, dtype=torch.int32)

        def cat(old, new, dim):
            return new if old is None else torch.cat([old, new], dim=dim)

        self.k_codes = cat(self.k_codes, k_codes, 2)
        self.k_scale = cat(self.k_scale, k_scale, 2)
        self.k_min = cat(self.k_min, k_min, 2)
        self.group_ends = cat(self.group_ends, ends.to(keys.device), 0)
        self.v_codes = cat(self.v_codes, v_codes, 2)
        self.v_scale = cat(self.v_scale, v_scale, 2)
        self.v_min = cat(self.v_min, v_min, 2)
        if v_channel is not None:
            self.v_channel = cat(self.v_channel, v_channel, 2)
            self.chunk_ends = cat(self.chunk_ends, torch.tensor([start + n], dtype=torch.int32, device=keys.device), 0)

    # A token's key group and value chunk are derived from the few boundaries held (one int32
    # per group / chunk), not stored per token: at 3 KV heads of width 64 a per-token index
    # would cost 5% of the packed bytes.
    @property
    def token_group(self) -> torch.Tensor:
        return owner_of_each_token(self.group_ends, self.num_tokens)

    @property
    def token_chunk(self) -> torch.Tensor | None:
        return None if self.chunk_ends is None else owner_of_each_token(self.chunk_ends, self.num_tokens)

    def dequantize(self, dtype: torch.dtype):
        """Reference path: the tier's keys and values as [B, H, N, D] in `dtype`."""
        keys = dequantize_keys_channelwise(self.k_codes, self.k_scale, self.k_min, self.token_group, self.bits, dtype)
        values = dequantize_values_tokenwise(
            self.v_codes, self.v_scale, self.v_min, self.v_channel, self.token_chunk, self.value_bits, dtype
        )
        return keys, values

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this tier holds on its device (what `nbytes` counts)."""
        names = ("k_codes", "k_scale", "k_min", "group_ends", "v_codes", "v_scale", "v_min", "v_channel", "chunk_ends")
        return [t for t in (getattr(self, name) for name in names) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def drop_front_groups(self, n: int) -> int:
        """Drop the n oldest key groups with their tokens (a windowed layer's expired tokens);
        returns how many tokens went. Value chunks lying wholly inside them go too; the one a
        dropped group cuts keeps its channel factors. The rest keep their codes and parameters
        (nothing is re-quantized), so the tier stays in logical order."""
        groups = 0 if self.group_ends is None else self.group_ends.shape[0]
        if not isinstance(n, int) or not 0 <= n <= groups:
            raise ValueError(f"n must be an integer in [0, {groups}] (the tier's key groups; got {n!r})")
        if n == 0:
            return 0
        dropped = int(self.group_ends[n - 1])
        if n == groups:
            self.__init__(self.bits, self.key_group_size, self.value_group_size, self.channel_separable, self.value_bits,
                          self.front_partial_group)
            return dropped
        # clone(): a slice would keep the whole old buffer alive (and stats would not see it)
        for name in ("k_codes", "v_codes", "v_scale", "v_min"):
            setattr(self, name, getattr(self, name)[:, :, dropped:].clone())
        self.k_scale, self.k_min = self.k_scale[:, :, n:].clone(), self.k_min[:, :, n:].clone()
        self.group_ends = self.group_ends[n:] - dropped
        if self.chunk_ends is not None:
            chunks = int((self.chunk_ends <= dropped).sum())
            self.v_channel = self.v_channel[:, :, chunks:].clone()
            self.chunk_ends = self.chunk_ends[chunks:] - dropped
        return dropped

    def select_batch(self, index: torch.Tensor) -> None:
        for name in ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min", "v_channel"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, index.to(tensor.device)))


def owner_of_each_token(ends: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """int32 [num_tokens]: index of the group (given by its cumulative end offsets) of each token."""
    positions = torch.arange(num_tokens, device=ends.device, dtype=torch.int32)
    return torch.searchsorted(ends, positions, right=True).to(torch.int32)
