"""What every zipkv per-layer cache shares: transformers' layer interface around two methods.

A subclass implements `get_seq_length()`, `batch_rows()` and `_select_batch(index)` (keep the
batch rows `index`, in that order); beam search reordering, batch selection and repetition,
the mask sizes of an append-only layer and the "no maximum length" answers follow from them.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from .backref import BackReference
from .limits import check_positions


def storage_dtype(model_dtype: torch.dtype, keep_model_dtype: bool) -> torch.dtype:
    """The dtype a layer keeps its unquantized states in: fp16 for fp32 models (bf16 stays
    bf16), unless the cache must equal DynamicCache exactly and so keeps the model's dtype."""
    return torch.float16 if model_dtype == torch.float32 and not keep_model_dtype else model_dtype


def to_store_dtype(states: torch.Tensor, dtype: torch.dtype, name: str, layer_idx: int) -> torch.Tensor:
    """`states` in the cache's storage dtype; NaN/inf, or values the cast overflows, raise."""
    if states.dtype == dtype:
        return states
    stored = states.to(dtype)
    if not torch.isfinite(stored).all():
        what = "NaN/inf" if not torch.isfinite(states).all() else "values beyond the fp16 range"
        raise ValueError(f"{name} of layer {layer_idx} contain {what}")
    return stored


def query_length_of(query_length) -> int:
    """transformers >= 5.4 passes the query length, older versions the cache_position tensor."""
    return query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)


class ZipkvLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = False
    owner = BackReference()  # the cache holding this layer, held weakly (no reference cycle)

    def __init__(self):
        super().__init__()
        self.state_signature = None  # what the first update brought (check_states); reset() clears it

    def check_has_tokens(self, key_states: torch.Tensor) -> None:
        if key_states.shape[2] == 0:
            raise ValueError(f"layer {self.layer_idx}: key_states hold no tokens (an empty prompt?)")

    def begin_update(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """The door of a compressing layer's update(): the checks before anything is stored
        (states, the model's context limit), lazy initialization, and a previous forward
        whose attention never came (the model does not run zipkv attention)."""
        self.check_states(key_states)
        check_positions(self, key_states.shape[2])
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.awaiting_queries:
            raise self.missing_attention_error()

    def check_states(self, key_states: torch.Tensor) -> None:
        """What an update checks before it touches the layer: tokens and batch rows to add and,
        once the layer holds states, that they come from the same model and batch (KV heads,
        head_dim, dtype, device, rows). A cache reused for another model would otherwise fail
        deep in a torch.cat or in attention, or attend in the first model's dtype."""
        self.check_has_tokens(key_states)
        b, heads, _, dim = key_states.shape
        if b == 0:
            raise ValueError(f"layer {self.layer_idx}: key_states hold no batch rows (batch size 0)")
        got = dict(kv_heads=heads, head_dim=dim, dtype=key_states.dtype, device=key_states.device)
        held = getattr(self, "state_signature", None)
        if held is None:  # a fresh (or reset) layer takes what comes
            self.state_signature = got
            return
        got["batch_rows"], held = b, dict(held, batch_rows=self.batch_rows())
        changed = [f"{name} {held[name]} -> {got[name]}" for name in got if got[name] != held[name]]
        if changed:
            raise ValueError(
                f"layer {self.layer_idx} holds states of another model or batch ({', '.join(changed)}): a cache "
                "serves one model and one batch; build a new cache for this one, or call cache.reset() first"
            )

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        """(kv_length, kv_offset) for the model's mask: every held token plus the new ones."""
        return self.get_seq_length() + query_length_of(query_length), 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # abstract in transformers < 5.3
        return -1

    def batch_rows(self) -> int:
        raise NotImplementedError

    def _select_batch(self, index: torch.Tensor) -> None:
        raise NotImplementedError

    def reorder_cache(self, beam_idx):
        self._select_batch(beam_idx)

    def batch_select_indices(self, indices):
        self._select_batch(indices)

    def batch_repeat_interleave(self, repeats: int):
        if self.is_initialized:
            self._select_batch(torch.arange(self.batch_rows(), device=self.device).repeat_interleave(repeats))


__all__ = ["ZipkvLayer", "query_length_of", "storage_dtype", "to_store_dtype"]
