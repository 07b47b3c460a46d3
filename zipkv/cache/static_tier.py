"""`StaticTier`: a `PackedTier` in preallocated buffers, for CUDA-graph decoding.

The same codes and parameters as `PackedTier` (each appended block is quantized by a
`PackedTier` of its own, so both store identical bytes), written into buffers sized once for
the whole generation. The buffers never move, so a captured graph can read them; the number
of valid tokens lives in the owning layer's `lengths` tensor on the device, and here on the
host as `num_tokens`. Appending happens outside the graph, between replays.
"""

from __future__ import annotations

import torch

from ..kernels.packed import PackedSegment
from ..quant.schemes import quantize_keys_channelwise, quantize_values_tokenwise
from .tier import PackedTier


class StaticTier:
    def __init__(self, tier: PackedTier, template: torch.Tensor, extra_tokens: int, extra_groups: int,
                 extra_chunks: int):
        """A copy of `tier` with room for `extra_tokens` more tokens, `extra_groups` more key
        groups and `extra_chunks` more value chunks. `template` [B, H, 1, D] (any values, in the
        dtype of the states the tier quantizes) gives the buffers' shapes and dtypes when the
        tier holds nothing yet."""
        self.bits, self.value_bits = tier.bits, tier.value_bits
        self.key_group_size, self.value_group_size = tier.key_group_size, tier.value_group_size
        self.channel_separable = tier.channel_separable
        self.num_tokens = tier.num_tokens
        self.num_groups = 0 if tier.group_ends is None else tier.group_ends.numel()
        self.num_chunks = 0 if tier.chunk_ends is None else tier.chunk_ends.numel()
        self.capacity = self.num_tokens + extra_tokens
        like = tier
        if not tier.num_tokens:
            like = self._new_block()
            like.append(template, template)
        self._allocate(like, self.num_groups + extra_groups, self.num_chunks + extra_chunks)
        # Every later block is quantized with the parameter dtypes the buffers hold, fixed here:
        # its codes are chosen against exactly the parameters stored, and no block reads its
        # range on the host to pick them (param_dtype of float32 states, e.g. a rotated
        # layer's, is a sync, which the device flush's CUDA graph cannot hold). The eager tier
        # picks per block: the same dtype unless a block's range crosses fp16's (param_dtype).
        self.param_dtypes = (self.k_scale.dtype, self.v_scale.dtype)
        if tier.num_tokens:
            self.write_block(tier, 0, 0, 0)
        # Device copies of the counts, for appends inside a CUDA graph (append_on_device). The
        # token count is the owning layer's entry of its `lengths` (count_in() says which).
        self.lengths, self.length_index = None, None
        self.device_groups = torch.tensor([self.num_groups], device=self.k_codes.device)
        self.device_chunks = torch.tensor([self.num_chunks], device=self.k_codes.device)

    def _new_block(self) -> PackedTier:
        return PackedTier(self.bits, self.key_group_size, self.value_group_size, self.channel_separable,
                          self.value_bits)

    # -- buffers -----------------------------------------------------------------------------
    def _allocate(self, like: PackedTier, groups: int, chunks: int) -> None:
        """Buffers shaped after `like`'s tensors, token axes at capacity."""
        dev = like.k_codes.device

        def zeros(t, size, dim):
            shape = list(t.shape)
            shape[dim] = size
            return torch.zeros(shape, dtype=t.dtype, device=dev)

        self.k_codes = zeros(like.k_codes, self.capacity, 2)
        self.v_codes = zeros(like.v_codes, self.capacity, 2)
        self.v_scale = zeros(like.v_scale, self.capacity, 2)
        self.v_min = zeros(like.v_min, self.capacity, 2)
        self.k_scale = zeros(like.k_scale, groups, 2)
        self.k_min = zeros(like.k_min, groups, 2)
        self.token_group = torch.zeros(self.capacity, dtype=torch.int32, device=dev)
        self.v_channel = self.token_chunk = None
        if like.v_channel is not None:
            self.v_channel = zeros(like.v_channel, chunks, 2) + 1
            self.token_chunk = torch.zeros(self.capacity, dtype=torch.int32, device=dev)

    def write_block(self, block: PackedTier, at: int, group_at: int, chunk_at: int) -> None:
        """Copy a quantized block (a PackedTier or PackedSegment) into the buffers: its tokens at
        `at`, its key groups at `group_at`, its value chunks at `chunk_at` (a window layer's
        ring writes each key group into a slot it reuses: cache/static_sliding_layer.py)."""
        n = block.num_tokens
        if at + n > self.capacity:
            raise RuntimeError(f"static tier full: {at} + {n} tokens > capacity {self.capacity}")
        groups = block.k_scale.shape[2]
        if group_at + groups > self.k_scale.shape[2]:
            raise RuntimeError(f"static tier: no room for {groups} more key groups")
        self.k_codes[:, :, at:at + n] = block.k_codes
        self.v_codes[:, :, at:at + n] = block.v_codes
        self.v_scale[:, :, at:at + n] = block.v_scale
        self.v_min[:, :, at:at + n] = block.v_min
        self.k_scale[:, :, group_at:group_at + groups] = block.k_scale
        self.k_min[:, :, group_at:group_at + groups] = block.k_min
        self.token_group[at:at + n] = block.token_group + group_at
        if block.v_channel is not None:
            chunks = block.v_channel.shape[2]
            if chunk_at + chunks > self.v_channel.shape[2]:
                raise RuntimeError(f"static tier: no room for {chunks} more value chunks")
            self.v_channel[:, :, chunk_at:chunk_at + chunks] = block.v_channel
            self.token_chunk[at:at + n] = block.token_chunk + chunk_at

    # -- the PackedTier interface the layer's policy uses ------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Quantize and append tokens [B, H, n, D], exactly as PackedTier would."""
        if keys.shape[2] == 0:
            return
        block = self._new_block()
        block.append(keys, values, self.param_dtypes)
        self.write_block(block, self.num_tokens, self.num_groups, self.num_chunks)
        self.num_tokens += block.num_tokens
        self.num_groups += block.k_scale.shape[2]
        self.num_chunks += 0 if block.v_channel is None else block.v_channel.shape[2]
        self.device_groups.fill_(self.num_groups)
        self.device_chunks.fill_(self.num_chunks)

    def count_in(self, lengths: torch.Tensor, index: int) -> None:
        """The device-side token count of this tier is lengths[index] (the owning layer's)."""
        self.lengths, self.length_index = lengths, index

    @property
    def device_tokens(self) -> torch.Tensor:
        return self.lengths[self.length_index:self.length_index + 1]

    def append_on_device(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """append() with the write offsets read on the device: no host wait and the same
        launches every time, so a CUDA graph can hold it. The same codes and parameters as
        append(); the caller has checked the states are finite, and mirrors the counts on the
        host afterwards (mirror_append)."""
        n = keys.shape[2]
        g = self.key_group_size or n
        front = n % g  # PackedTier's layout: the partial key group first
        parts = [keys[:, :, :front], keys[:, :, front:]] if front else [keys]
        k_dtype, v_dtype = self.param_dtypes
        quantized = [quantize_keys_channelwise(part, self.bits, self.key_group_size, check_finite=False,
                                               out_dtype=k_dtype) for part in parts]
        k_codes, k_scale, k_min = (torch.cat([q[i] for q in quantized], 2) for i in range(3))
        groups = sum(q[3] for q in quantized)
        v_codes, v_scale, v_min, v_channel = quantize_values_tokenwise(
            values, self.value_bits, self.value_group_size, self.channel_separable, check_finite=False,
            out_dtype=v_dtype)
        steps = torch.arange(n, device=keys.device)
        at = self.device_tokens.long() + steps
        for buffer, new in ((self.k_codes, k_codes), (self.v_codes, v_codes), (self.v_scale, v_scale),
                            (self.v_min, v_min)):
            buffer.index_copy_(2, at, new)
        group_at = self.device_groups + torch.arange(groups, device=keys.device)
        self.k_scale.index_copy_(2, group_at, k_scale)
        self.k_min.index_copy_(2, group_at, k_min)
        shift = (g - front) % g  # with a partial first group, token i is in group (i + shift) // g
        self.token_group.index_copy_(0, at, ((steps + shift) // g + self.device_groups).int())
        if v_channel is not None:
            self.v_channel.index_copy_(2, self.device_chunks, v_channel)
            self.token_chunk.index_copy_(0, at, self.device_chunks.expand(n).int())
            self.device_chunks += 1
        self.device_groups += groups
        self.lengths[self.length_index:self.length_index + 1] += n

    def has_room(self, n: int) -> bool:
        """Whether a block of n more tokens fits (tokens, key groups, value chunks)."""
        groups = -(-n // (self.key_group_size or n))
        chunks = self.num_chunks + 1 <= self.v_channel.shape[2] if self.v_channel is not None else True
        return self.num_tokens + n <= self.capacity and self.num_groups + groups <= self.k_scale.shape[2] and chunks

    def mirror_append(self, n: int) -> None:
        """The host counts after append_on_device of n tokens."""
        self.num_tokens += n
        self.num_groups += -(-n // (self.key_group_size or n))
        self.num_chunks += int(self.channel_separable)

    def segment(self) -> PackedSegment:
        """The whole buffers (capacity tokens) as the kernels' segment; valid: num_tokens."""
        return PackedSegment(self.bits, self.k_codes, self.k_scale, self.k_min, self.token_group, self.v_codes,
                             self.v_scale, self.v_min, self.v_channel, self.token_chunk, self.value_bits)

    def valid_segment(self) -> PackedSegment:
        """The valid tokens only (what the reference path and the eager code read)."""
        n = self.num_tokens
        return PackedSegment(self.bits, self.k_codes[:, :, :n], self.k_scale[:, :, :self.num_groups],
                             self.k_min[:, :, :self.num_groups], self.token_group[:n], self.v_codes[:, :, :n],
                             self.v_scale[:, :, :n], self.v_min[:, :, :n],
                             None if self.v_channel is None else self.v_channel[:, :, :self.num_chunks],
                             None if self.token_chunk is None else self.token_chunk[:n], self.value_bits)

    def dequantize(self, dtype: torch.dtype):
        from ..kernels.packed import dequantize_segment

        keys, values = dequantize_segment(self.valid_segment())
        return keys.to(dtype), values.to(dtype)

    def tensors(self) -> list[torch.Tensor]:
        """Every buffer held (capacity included: that is what the device holds)."""
        names = ("k_codes", "k_scale", "k_min", "token_group", "v_codes", "v_scale", "v_min", "v_channel", "token_chunk",
                 "device_groups", "device_chunks")
        return [t for t in (getattr(self, name) for name in names) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def select_batch(self, index: torch.Tensor) -> None:
        raise NotImplementedError("a static (CUDA-graph) cache keeps its batch rows; select rows before to_static()")
