"""The two small steps a static (CUDA-graph) ZipCache layer takes per decoded token around the
decode kernel, each fused into one launch on CUDA (Triton), with its PyTorch reference:

- window_append: the new token's keys/values into the fp16 window at slot lengths[-1], and
  nonfinite |= any NaN/inf among them (the reference: ~10 tiny kernels).
- window_scores: ZipCache's saliency of the window tokens from this step's query: softmax of
  q.k over the visible window slots (slot < lengths[-1] and real), the mean over the query
  heads of each KV head added to score_sum [B, Hkv, W], visibility added to score_count
  [B, 1, W] (the reference: ~20 tiny kernels through zipkv.saliency.attention_scores).

At 8 x 32K on Llama-3-8B shapes the references were ~900 launches of 2-3 us per step
(experiments/NOTES.md, v9). Tests: tests/test_kernels_window.py (Triton interpreter).
"""

from __future__ import annotations

import torch

from ._runtime import use_triton


def window_append_reference(keys, values, k_win, v_win, lengths, nonfinite) -> None:
    slot = lengths[-1:].long()
    keys, values = keys.to(k_win.dtype), values.to(v_win.dtype)
    nonfinite |= ~(torch.isfinite(keys).all() & torch.isfinite(values).all())
    k_win.index_copy_(2, slot, keys)
    v_win.index_copy_(2, slot, values)


def write_slots_reference(keys, values, k_buf, v_buf, slot, nonfinite) -> None:
    keys, values = keys.to(k_buf.dtype), values.to(v_buf.dtype)
    index = slot[:, :, None, None].expand(-1, -1, 1, k_buf.shape[-1])
    k_buf.scatter_(2, index, keys)
    v_buf.scatter_(2, index, values)
    nonfinite |= ~(torch.isfinite(keys).all() & torch.isfinite(values).all())


def window_scores_reference(query, k_win, lengths, real_win, score_sum, score_count, scaling: float) -> None:
    from ..saliency import attention_scores

    slots = torch.arange(k_win.shape[2], device=k_win.device)
    visible = (slots[None, :] < lengths[-1]) & real_win
    _, summed, counts = attention_scores(query, k_win, visible[:, None, None, :], scaling)
    score_sum += summed
    score_count += counts


def _check_window(k_win, v_win=None):
    if k_win.dim() != 4 or (v_win is not None and v_win.shape != k_win.shape):
        raise ValueError(f"the window must be [B, H, W, D] keys and values of one shape (got {tuple(k_win.shape)})")


def _check_token(keys, values, k_buf, v_buf) -> None:
    """One token's keys / values [B, H, 1, D] for buffers [B, H, N, D] (window_append, write_slots)."""
    _check_window(k_buf, v_buf)
    b, h, _, d = k_buf.shape
    if keys.shape != (b, h, 1, d) or values.shape != (b, h, 1, d):
        raise ValueError(f"keys and values must be [B, H, 1, D] = {(b, h, 1, d)} (got {tuple(keys.shape)}, "
                         f"{tuple(values.shape)})")


def _token_kernel_takes(keys, values, k_buf, v_buf, impl: str) -> bool:
    """Whether the one-token write kernel runs: Triton here, unit last strides, a head dim it
    takes, states already of the buffers' dtype (the kernel copies, never casts)."""
    strides = (k_buf.stride(-1), v_buf.stride(-1), keys.stride(-1), values.stride(-1))
    same_dtype = keys.dtype == k_buf.dtype and values.dtype == v_buf.dtype
    return (use_triton(k_buf.device, impl) and strides == (1, 1, 1, 1) and k_buf.shape[-1] in (32, 64, 128, 256)
            and same_dtype)


def _route_token(keys, values, k_buf, v_buf, nonfinite, impl: str, lengths=None, slot=None) -> None:
    """The one-token writers' routing, at lengths[-1] (window_append) or at slot[b, h]
    (write_slots): their custom op while dynamo traces (impl auto), else the Triton kernel where
    it takes the states, else the reference."""
    where = lengths if slot is None else slot
    if impl == "auto":
        from . import ops

        if ops.tracing():  # torch.compile: one custom op (kernels/ops.py) instead of a graph break
            op = ops.window_append_op if slot is None else ops.write_slots_op
            return op(keys, values, k_buf, v_buf, where, nonfinite)
    if not _token_kernel_takes(keys, values, k_buf, v_buf, impl):
        reference = window_append_reference if slot is None else write_slots_reference
        return reference(keys, values, k_buf, v_buf, where, nonfinite)
    from ._triton_window import token_write_triton

    token_write_triton(keys, values, k_buf, v_buf, nonfinite, lengths=lengths, slot=slot)


def window_append(keys, values, k_win, v_win, lengths, nonfinite, impl: str = "auto") -> None:
    """keys/values [B, H, 1, D] -> k_win/v_win[:, :, lengths[-1]] (cast to the window's dtype: then
    by the reference; the kernel takes states of the window's dtype, the usual case);
    nonfinite (bool scalar tensor) |= any NaN/inf among them. lengths: int32 on the device
    (read there: nothing syncs, so a CUDA graph captures it)."""
    _check_token(keys, values, k_win, v_win)
    _route_token(keys, values, k_win, v_win, nonfinite, impl, lengths=lengths)


def write_slots(keys, values, k_buf, v_buf, slot, nonfinite, impl: str = "auto") -> None:
    """keys/values [B, H, 1, D] -> k_buf/v_buf[b, h, slot[b, h]] (slot int64 [B, H] on the
    device: nothing syncs), cast as window_append casts; nonfinite |= any NaN/inf among them.
    The token of a ring (streaming_llm) or of a freed slot (h2o): one launch, where the
    reference's two scatters and the finiteness check are seven."""
    _check_token(keys, values, k_buf, v_buf)
    b, h = k_buf.shape[:2]
    if slot.shape != (b, h) or slot.dtype != torch.int64:
        raise ValueError(f"slot must be int64 [B, H] = {(b, h)} (got {slot.dtype} {tuple(slot.shape)})")
    _route_token(keys, values, k_buf, v_buf, nonfinite, impl, slot=slot)


def window_scores(query, k_win, lengths, real_win, score_sum, score_count, scaling: float, impl: str = "auto") -> None:
    """query [B, Hq, 1, D] (this step's); k_win [B, Hkv, W, D]; real_win [B, W] bool; adds this
    step's saliency into score_sum [B, Hkv, W] and score_count [B, 1, W] (float32)."""
    _check_window(k_win)
    b, hkv, w, d = k_win.shape
    if query.dim() != 4 or query.shape[0] != b or query.shape[2] != 1 or query.shape[3] != d or query.shape[1] % hkv:
        raise ValueError(f"query must be [B, Hq, 1, D] with Hq a multiple of {hkv} (got {tuple(query.shape)})")
    if score_sum.shape != (b, hkv, w) or score_count.shape != (b, 1, w) or real_win.shape != (b, w):
        raise ValueError("score_sum [B, Hkv, W], score_count [B, 1, W] and real_win [B, W] must match the window")
    if impl == "auto":
        from . import ops

        if ops.tracing():  # torch.compile: one custom op (kernels/ops.py) instead of a graph break
            return ops.window_scores_op(query, k_win, lengths, real_win, score_sum, score_count, float(scaling))
    if (not use_triton(k_win.device, impl) or d not in (32, 64, 128, 256) or w > 1024
            or not (score_sum.is_contiguous() and score_count.is_contiguous())
            or query.stride(-1) != 1 or k_win.stride(-1) != 1 or real_win.stride(-1) != 1):
        return window_scores_reference(query, k_win, lengths, real_win, score_sum, score_count, scaling)
    from ._triton_window import window_scores_triton

    window_scores_triton(query, k_win, lengths, real_win, score_sum, score_count, scaling)


__all__ = ["window_append", "window_append_reference", "window_scores", "window_scores_reference", "write_slots",
           "write_slots_reference"]
