"""`StaticFlashLayer`: the static (CUDA-graph) form of the baselines' layers (`full`, `fp8`,
`int4`): capacity buffers per token-head (cache/token_head_tier.py `TokenHeadBuffers`), each
batch row with its exact valid count on the device, read by flash-decoding
(kernels/flash_decode.py) over those counts: no mask, no token past a row's length read.

At to_static() each row's left padding is dropped (its real tokens move to the front of its
row; attention is permutation-invariant once RoPE is applied, and padding is never attended),
so lengths[b] = the row's real tokens. A step (captured) writes the new token at lengths[b]
(quantized on the device for fp8 / int4), advances the counts and attends; nothing is ever
flushed between steps. Bytes: the buffers' capacity (prompt + the steps asked for), the
scales / zeros, the int32 counts and the NaN/inf flag.
"""

from __future__ import annotations

import torch

from ..attention import hand_queries_to
from ..kernels.flash_decode import FlashSegment, flash_decode
from .baseline_cache import LosslessLayer
from .layer_base import ZipkvLayer
from .static_base import StaticLayerBase, check_holds_prompt
from .static_evicting_layer import check_static_kwargs
from .token_head_tier import TokenHeadBuffers

# impl of the decode and append kernels ("auto": Triton on CUDA, the reference elsewhere); tests
# set "triton" to decode a tiny model through the kernels under Triton's interpreter
FLASH_IMPL = "auto"


def eager_segment(layer) -> FlashSegment:
    """What an eager baseline layer holds, as a FlashSegment [B, H, N, .]."""
    if isinstance(layer, LosslessLayer):
        return FlashSegment("dense", layer.keys, layer.values)
    return layer.tier.segment()


def check_flash_form(layer, index: int) -> None:
    """to_static()'s check of a baseline layer: it holds a prompt (a lossless one in its fp16
    part only: its tiers stay empty)."""
    check_holds_prompt(layer, index)
    if isinstance(layer, LosslessLayer) and (layer.low.num_tokens or layer.high.num_tokens):
        raise ValueError(f"layer {index}: a lossless layer holds quantized tiers")


class StaticFlashLayer(StaticLayerBase, ZipkvLayer):
    """The static form of a TokenQuantLayer or LosslessLayer (module docstring); follows
    graph_decode.StaticLayer."""

    def __init__(self, layer, extra_tokens: int, prompt_padding: torch.Tensor | None):
        """layer: the eager layer holding the prompt; prompt_padding: [B] left-padding counts
        (None: none)."""
        ZipkvLayer.__init__(self)
        held = eager_segment(layer)
        b, h, n = held.k.shape[:3]
        self.layer_idx, self.owner = layer.layer_idx, layer.owner
        self.dtype, self.device = layer.dtype, layer.device
        self.batch_size, self.num_heads, self.head_dim = b, h, held.head_dim
        self.seq_length = layer.get_seq_length()
        pads = torch.zeros(b, dtype=torch.int64) if prompt_padding is None else torch.as_tensor(prompt_padding)
        self.store = TokenHeadBuffers(held, pads, extra_tokens)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self.is_initialized, self.awaiting_queries = True, False

    def missing_attention_error(self) -> RuntimeError:
        return RuntimeError(f"zipkv attention never ran for layer {self.layer_idx}: a static baseline cache needs "
                            "the model to run the 'zipkv' attention implementation")

    def lazy_initialization(self, key_states, value_states):
        raise RuntimeError("a static layer is built from a filled eager layer (to_static), never lazily")

    # -- one decode step (captured) ---------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        self.begin_step(key_states)
        # NaN/inf are recorded on the device (check_finite raises between steps), in the append's launch
        self.store.append(key_states.detach(), value_states.detach(), self.nonfinite, impl=FLASH_IMPL)
        self.awaiting_queries = True
        hand_queries_to(self)
        return key_states, value_states

    def attend(self, module, query, key, value, attention_mask, scaling, **kwargs):
        """The model's mask is not read: each row attends to its first lengths[b] tokens."""
        check_static_kwargs(kwargs)
        output = flash_decode(query, self.store.segment(), self.store.lengths, scaling, impl=FLASH_IMPL)
        self.awaiting_queries = False
        return output.transpose(1, 2).contiguous(), None

    # -- between steps: nothing to quantize -------------------------------------------------------
    def has_room(self) -> bool:
        return self.store.filled < self.store.capacity

    def advance(self) -> None:
        """The host's mirror of a step: one more position, one more token in every row."""
        self.seq_length += 1
        self.store.advance()

    def decode_inputs(self):
        """(no packed segments, a [B, Hkv, 0, D] stand-in: the shapes graph_decode checks)."""
        return [], self.nonfinite.new_empty((self.batch_size, self.num_heads, 0, self.head_dim), dtype=self.dtype)

    def held_tensors(self) -> list[torch.Tensor]:
        return self.store.tensors() + [self.nonfinite]

    # -- the rest of the layer interface ----------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.seq_length  # positions, padding included (as the eager layer)

    def state_shape(self) -> tuple[int, int, int, int]:
        return self.batch_size, self.num_heads, self.seq_length, self.head_dim

    def batch_rows(self) -> int:
        return self.batch_size


__all__ = ["StaticFlashLayer", "check_flash_form", "eager_segment"]
