"""What every static (CUDA-graph) layer shares, whatever it stores.

Its batch rows and buffers are fixed (a captured graph reads them at fixed addresses), so it
cannot select rows or be reset; NaN/inf that a captured step met are recorded on the device
(`nonfinite`) and raised between steps; a layer with nothing to quantize between replays
never asks for a flush. Layers override what they do differently (StaticZipLayer flushes
blocks, StaticSlidingLayer fills ring slots); `graph_decode.StaticLayer` is the whole protocol.
"""

from __future__ import annotations


def check_holds_prompt(layer, index: int | None = None) -> None:
    """What to_static() checks of every layer first: it holds a prompt, and no forward still
    waits for this layer's attention (the model does not run zipkv attention). index: the
    layer's position, for layers that do not know it (transformers' window layers)."""
    keys = getattr(layer, "keys", None)
    if not layer.is_initialized or (keys is not None and keys.dim() != 4):
        index = layer.layer_idx if index is None else index
        raise ValueError(f"layer {index}: to_static() needs a cache that holds the prompt")
    if getattr(layer, "awaiting_queries", False):
        raise layer.missing_attention_error()


class StaticLayerBase:
    def begin_step(self, key_states) -> None:
        """The door of a static step's update(): one new token, and the last step's attention came."""
        if key_states.shape[2] != 1:
            raise ValueError(f"a static (CUDA-graph) cache decodes one token per step (got {key_states.shape[2]})")
        if self.awaiting_queries:
            raise self.missing_attention_error()

    def flush_due(self) -> bool:
        return False  # nothing is quantized or moved between steps

    def can_flush_on_device(self) -> bool:
        return False

    def flush(self, check_finite: bool = True) -> None:
        if check_finite:
            self.check_finite()

    def check_finite(self) -> None:
        if bool(self.nonfinite):
            raise ValueError(f"key_states/value_states of layer {self.layer_idx} contained NaN/inf while decoding")

    def _select_batch(self, index):
        raise NotImplementedError("a static (CUDA-graph) cache keeps its batch rows; select rows before to_static()")

    def reset(self) -> None:
        raise NotImplementedError("a static cache cannot be reset; build a new cache")


__all__ = ["StaticLayerBase", "check_holds_prompt"]
