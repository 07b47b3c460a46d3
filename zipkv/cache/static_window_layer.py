"""`StaticWindowLayer`: transformers' own (exact, uncompressed) window layer in static form, for
the caches that keep one (the evicting caches on Gemma 3's sliding layers or Llama 4's chunks).

An fp16 ring of `window` slots (the window layer's dtype): the token at position p sits in slot
p mod window, so the step's token overwrites the one the step's query can no longer see (a
window of w tokens includes the query's own). Each slot's position is kept on the device
(int32, EMPTY before a slot is first written), and the step's mask is computed there from the
positions, the step's position (a device counter) and each row's left padding
(`window_visible`, as StaticSlidingLayer): nothing is read on the host while decoding, and
nothing is ever flushed. Bytes: window slots of keys and values per batch row and KV head,
plus window int32 positions.
"""

from __future__ import annotations

import torch

from ..attention import hand_queries_to
from ..kernels.decode_attention import decode_attention
from ..kernels.window_step import window_append
from .layer_base import ZipkvLayer, query_length_of
from .static_base import StaticLayerBase, check_holds_prompt
from .static_sliding_layer import EMPTY, padding_counts, window_visible


class StaticWindowLayer(StaticLayerBase, ZipkvLayer):
    """A window layer (transformers' DynamicSlidingWindowLayer) as an fp16 ring (module
    docstring); follows graph_decode.StaticLayer."""

    is_sliding = True  # the model sizes its window / chunk mask from this layer (and this layer ignores it)

    @classmethod
    def from_layer(cls, layer, layer_idx: int, kind: str, prompt_padding: torch.Tensor | None):
        """layer: the eager window layer holding the prompt's newest window - 1 tokens (or fewer);
        kind: 'sliding_attention' or 'chunked_attention'; prompt_padding: the prompt's 2-D mask or
        [B] padding counts (None: none)."""
        check_holds_prompt(layer, layer_idx)
        self = cls.__new__(cls)
        self.layer_idx, self.kind, self.sliding_window = layer_idx, kind, layer.sliding_window
        self.cumulative_length = layer.cumulative_length
        b, h, n, d = layer.keys.shape
        w, dev = self.sliding_window, layer.keys.device
        if n >= w + 1:
            raise ValueError(f"layer {layer_idx}: a window layer of {w} holds {n} tokens (a cache that recorded its past?)")
        self.k_ring, self.v_ring = layer.keys.new_zeros(b, h, w, d), layer.values.new_zeros(b, h, w, d)
        self.positions = torch.full((w,), EMPTY, dtype=torch.int32, device=dev)
        held = torch.arange(self.cumulative_length - n, self.cumulative_length, device=dev)
        slots = held % w
        self.k_ring[:, :, slots], self.v_ring[:, :, slots] = layer.keys.detach(), layer.values.detach()
        self.positions[slots] = held.to(torch.int32)
        self.pads = padding_counts(prompt_padding, b).to(device=dev, dtype=torch.int32)
        self.step_pos = torch.tensor([self.cumulative_length], dtype=torch.int32, device=dev)
        self.write_at = torch.tensor([self.cumulative_length % w], dtype=torch.int32, device=dev)  # step_pos mod w
        self.lengths = torch.tensor([w], dtype=torch.int32, device=dev)  # the kernel reads every slot (masked)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=dev)
        self.awaiting_queries = False
        self.is_initialized, self.device = True, dev
        return self

    def lazy_initialization(self, key_states, value_states) -> None:
        raise RuntimeError("a static window layer is built from a layer holding the prompt (from_layer)")

    @property
    def keys(self) -> torch.Tensor:  # shapes for stats()
        return self.k_ring

    @property
    def values(self) -> torch.Tensor:
        return self.v_ring

    def missing_attention_error(self) -> RuntimeError:
        return RuntimeError(f"zipkv attention never ran for window layer {self.layer_idx}: a static cache needs the "
                            "model to run the 'zipkv' attention implementation")

    # -- one decode step (captured) ---------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        if key_states.shape[2] != 1:
            raise ValueError(f"a static (CUDA-graph) cache decodes one token per step (got {key_states.shape[2]})")
        if self.awaiting_queries:
            raise self.missing_attention_error()
        # window_append writes at its counts' last entry: here the slot, step_pos mod window
        window_append(key_states.detach(), value_states.detach(), self.k_ring, self.v_ring, self.write_at,
                      self.nonfinite)
        self.positions.index_copy_(0, self.write_at.long(), self.step_pos)
        self.awaiting_queries = True
        hand_queries_to(self)
        return key_states, value_states

    def attend(self, module, query, key, value, attention_mask, scaling, **kwargs):
        """The model's mask (built once per graph) is not read: this step's comes from the positions."""
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        mask = window_visible(self.kind, self.sliding_window, self.positions[None, :], self.step_pos, self.pads)
        output = decode_attention(query, [], self.k_ring, self.v_ring, mask=mask, scale=scaling, lengths=self.lengths)
        self.step_pos += 1
        self.write_at.add_(1).remainder_(self.sliding_window)
        self.awaiting_queries = False
        return output.transpose(1, 2).contiguous(), None

    # -- between steps: nothing to quantize -------------------------------------------------------
    def advance(self) -> None:
        self.cumulative_length += 1

    def has_room(self) -> bool:
        return True  # a ring

    def decode_inputs(self):
        return [], self.k_ring

    def held_tensors(self) -> list[torch.Tensor]:
        return [self.k_ring, self.v_ring, self.positions, self.pads, self.step_pos, self.write_at, self.lengths,
                self.nonfinite]

    # -- the rest of the layer interface ----------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        """As transformers' window layer: the newest window - 1 positions and the new ones."""
        held = min(self.cumulative_length, self.sliding_window - 1)
        return held + query_length_of(query_length), self.cumulative_length - held

    def batch_rows(self) -> int:
        return self.k_ring.shape[0]



__all__ = ["StaticWindowLayer"]
