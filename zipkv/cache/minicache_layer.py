"""`MiniCacheLayer`: one full-attention layer of a MiniCache.

A layer outside any merged pair holds its tokens plainly (`keys`, `values`). A layer of a
pair hands its prefill (the tokens of its first forward) to the pair's `MergedPair` and
holds plainly only the tokens that come after (decoding, a question): MiniCache merges the
prefill cache. Attention then sees [restored prefill | later tokens], in logical order, so
lengths and masks are those of DynamicCache: nothing is evicted, no queries are needed, and
the model keeps its own attention implementation.

Storage dtype: fp16 for fp32 models (bf16 / fp16 models keep theirs), except in a cache that
merges nothing (lossless by design), which keeps the model's dtype and equals DynamicCache.
"""

from __future__ import annotations

import torch
from .layer_base import ZipkvLayer, storage_dtype, to_store_dtype

from .merged_pair import MergedPair


class MiniCacheLayer(ZipkvLayer):

    def __init__(
        self, layer_idx: int, keep_model_dtype: bool = False, pair: MergedPair | None = None, side: str | None = None
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.keep_model_dtype = keep_model_dtype
        self.pair, self.side = pair, side  # side "a" (the pair's first layer) or "b"
        self.prefill_length = 0  # tokens held by the pair (0 outside a pair)
        self.forwards = 0

    # -- transformers layer interface -------------------------------------------------------
    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.store_dtype = storage_dtype(self.dtype, self.keep_model_dtype)
        self.keys = key_states.detach()[:, :, :0].to(self.store_dtype)  # detached: see update()
        self.values = value_states.detach()[:, :, :0].to(self.store_dtype)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        self.check_states(key_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # Detached at the door: merging is not differentiable, and a held tensor that requires
        # grad would keep the forward's whole autograd graph alive with the cache.
        keys = to_store_dtype(key_states.detach(), self.store_dtype, "key_states", self.layer_idx)
        values = to_store_dtype(value_states.detach(), self.store_dtype, "value_states", self.layer_idx)
        first = self.forwards == 0
        self.forwards += 1
        if first and self.pair is not None:
            self.prefill_length = keys.shape[2]
            # layer b's prefill merges the pair now: this forward's attention reads the exact
            # states returned below, and layer a's attention has already run
            self.pair.add_prefill(self.side, keys, values)
        else:
            self.keys = torch.cat([self.keys, keys], dim=2)
            self.values = torch.cat([self.values, values], dim=2)
        if first:  # the prefill attends to the states exactly as the model made them
            return key_states, value_states
        return self.attention_inputs()

    def attention_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[prefill (restored from the pair) | later tokens] keys and values, model dtype."""
        keys, values = self.keys.to(self.dtype), self.values.to(self.dtype)
        if not self.prefill_length:
            return keys, values
        prefill_keys, prefill_values = self.pair.restore(self.side, self.dtype)
        return torch.cat([prefill_keys, keys], dim=2), torch.cat([prefill_values, values], dim=2)

    def get_seq_length(self) -> int:
        return self.prefill_length + self.keys.shape[2] if self.is_initialized else 0

    def reset(self) -> None:
        if self.pair is not None:
            self.pair.reset()  # idempotent: both layers of the pair may call it
        self.__init__(self.layer_idx, self.keep_model_dtype, self.pair, self.side)

    # The pair is shared: its first layer selects it, the second only its own tokens.
    # (transformers' Cache applies batch operations to every layer in turn.)
    def _select_batch(self, index):
        if not self.is_initialized:
            return
        index = index.to(self.device)
        self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)
        if self.pair is not None and self.side == "a":
            self.pair.select_batch(index)

    def batch_rows(self) -> int:
        return self.keys.shape[0]

    def crop(self, tokens_to_remove: int):
        raise NotImplementedError("MiniCache cannot be cropped (merged tokens are not re-materialized)")

    # -- accounting -------------------------------------------------------------------------
    def held_tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer keeps between forwards; the pair's, by its first layer only."""
        if not self.is_initialized:
            return []
        own = [self.keys, self.values]
        return own + (self.pair.tensors() if self.pair is not None and self.side == "a" else [])
