"""zipkv's decode-step kernels as torch custom ops, so `torch.compile(fullgraph=True)` traces a
whole static decode step (zipkv/compiled.py, graph_decode.StaticDecoder(compile=True)).

Dynamo cannot look inside a Triton launch, an NVRTC launch (mma_decode.py) or the reference
paths that read counts on the host (`valid_parts`: `.tolist()`): each would be a graph break.
As a custom op each is one opaque node with a fake (meta) implementation that gives the
output's shape and dtype, and the buffers it writes declared in `mutates_args`, so inductor
orders it correctly and fuses the small ops around it (norms, rotary, casts).

The wrappers in decode_attention.py, window_step.py and token_append.py call these ops only while dynamo traces
(`tracing()`); eager calls (and CUDA-graph captures of an eager step) take the wrappers' own
code, unchanged. The op's real implementation is that same code, so compiled and eager steps
run the same kernels on the same buffers.

A new kernel of a static layer plugs in the same way: a `torch.library.custom_op` here whose
body calls the wrapper's eager path, a `register_fake` (`mutating_op` below for an op that only
writes its arguments), and a `tracing()` branch at the top of the wrapper. Ops take flat tensors: a PackedSegment travels as SEGMENT_FIELDS tensors (None
for the optional ones) plus its two bit widths.
"""

from __future__ import annotations

from typing import Optional

import torch

from .packed import PackedSegment

SEGMENT_FIELDS = ("k_codes", "k_scale", "k_min", "token_group", "v_codes", "v_scale", "v_min", "v_channel",
                  "token_chunk")


def tracing() -> bool:
    """Whether dynamo is tracing this call (the wrappers then emit the custom op)."""
    return torch.compiler.is_compiling()


def flatten_segments(segments) -> tuple[list, list[int]]:
    """(tensors, bits): SEGMENT_FIELDS of each segment in order, [bits, value_bits] of each."""
    tensors, bits = [], []
    for seg in segments:
        tensors.extend(getattr(seg, name) for name in SEGMENT_FIELDS)
        bits.extend((int(seg.bits), int(seg.value_bits)))
    return tensors, bits


def unflatten_segments(tensors, bits) -> list[PackedSegment]:
    n = len(SEGMENT_FIELDS)
    return [PackedSegment(bits=bits[2 * i], value_bits=bits[2 * i + 1],
                          **dict(zip(SEGMENT_FIELDS, tensors[n * i:n * (i + 1)])))
            for i in range(len(bits) // 2)]


def mutating_op(name: str, mutates: tuple[str, ...]):
    """`fn` as the custom op `name` that writes the arguments `mutates` in place and returns
    nothing, so its fake implementation has nothing to make (window steps, appends, the h2o
    bookkeeping of attention_mass.py)."""
    def register(fn):
        op = torch.library.custom_op(name, mutates_args=mutates)(fn)
        op.register_fake(lambda *args, **kwargs: None)
        return op

    return register


# -- decode attention over capacity buffers (lengths on the device) -----------------------------
@torch.library.custom_op("zipkv::decode_attention", mutates_args=())
def decode_attention_op(query: torch.Tensor, segment_tensors: list[Optional[torch.Tensor]], segment_bits: list[int],
                        k_fp: torch.Tensor, v_fp: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
                        lengths: torch.Tensor, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """decode_attention(query, segments, k_fp, v_fp, mask, scale, lengths=lengths, return_lse=...);
    without return_lse the second output is an empty float32 tensor (an op returns fixed types)."""
    from .decode_attention import decode_attention

    segments = unflatten_segments(segment_tensors, segment_bits)
    out = decode_attention(query, segments, k_fp, v_fp, mask=mask, scale=scale, lengths=lengths,
                           return_lse=return_lse)
    if return_lse:
        return out
    return out, query.new_empty(0, dtype=torch.float32)


@decode_attention_op.register_fake
def _(query, segment_tensors, segment_bits, k_fp, v_fp, mask, scale, lengths, return_lse):
    b, hq, tq, _ = query.shape
    lse = query.new_empty((b, hq, tq) if return_lse else (0,), dtype=torch.float32)
    return torch.empty_like(query, memory_format=torch.contiguous_format), lse


@torch.library.custom_op("zipkv::decode_attention_scores", mutates_args=("scores",))
def decode_attention_scores_op(query: torch.Tensor, segment_tensors: list[Optional[torch.Tensor]],
                               segment_bits: list[int], k_fp: torch.Tensor, v_fp: torch.Tensor,
                               mask: Optional[torch.Tensor], scale: float, lengths: torch.Tensor,
                               scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """decode_attention(..., return_lse=True, scores_out=scores): the output, the lse and the fp16
    part's scores written into `scores` (h2o's static step)."""
    from .decode_attention import decode_attention

    segments = unflatten_segments(segment_tensors, segment_bits)
    return decode_attention(query, segments, k_fp, v_fp, mask=mask, scale=scale, lengths=lengths,
                            return_lse=True, scores_out=scores)


@decode_attention_scores_op.register_fake
def _(query, segment_tensors, segment_bits, k_fp, v_fp, mask, scale, lengths, scores):
    b, hq, tq, _ = query.shape
    return (torch.empty_like(query, memory_format=torch.contiguous_format),
            query.new_empty((b, hq, tq), dtype=torch.float32))


# -- the window steps: the new token in, the window's saliency --------------------------------
@mutating_op("zipkv::window_append", ("k_win", "v_win", "nonfinite"))
def window_append_op(keys: torch.Tensor, values: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor,
                     lengths: torch.Tensor, nonfinite: torch.Tensor) -> None:
    from .window_step import window_append

    window_append(keys, values, k_win, v_win, lengths, nonfinite)


@mutating_op("zipkv::write_slots", ("k_buf", "v_buf", "nonfinite"))
def write_slots_op(keys: torch.Tensor, values: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                   slot: torch.Tensor, nonfinite: torch.Tensor) -> None:
    """write_slots: compiled, inductor copied the whole K/V buffers for the functionalized
    scatter_ (streaming_llm at 8 x 32K: 14.3 ms a step compiled, 10.2 eager, H200)."""
    from .window_step import write_slots

    write_slots(keys, values, k_buf, v_buf, slot, nonfinite)


@mutating_op("zipkv::window_scores", ("score_sum", "score_count"))
def window_scores_op(query: torch.Tensor, k_win: torch.Tensor, lengths: torch.Tensor, real_win: torch.Tensor,
                     score_sum: torch.Tensor, score_count: torch.Tensor, scaling: float) -> None:
    from .window_step import window_scores

    window_scores(query, k_win, lengths, real_win, score_sum, score_count, scaling)


# -- flash-decoding over a static baseline layer's exact lengths (flash_decode.py) ---------------
@torch.library.custom_op("zipkv::flash_decode", mutates_args=())
def flash_decode_op(query: torch.Tensor, form: str, k: torch.Tensor, v: torch.Tensor, k_scale: Optional[torch.Tensor],
                    v_scale: Optional[torch.Tensor], k_zero: Optional[torch.Tensor], v_zero: Optional[torch.Tensor],
                    lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """flash_decode(query, FlashSegment(form, k, v, ...), lengths, scale)."""
    from .flash_decode import FlashSegment, flash_decode

    return flash_decode(query, FlashSegment(form, k, v, k_scale, v_scale, k_zero, v_zero), lengths, scale)


@flash_decode_op.register_fake
def _(query, form, k, v, k_scale, v_scale, k_zero, v_zero, lengths, scale):
    return torch.empty_like(query, memory_format=torch.contiguous_format)


# -- a static baseline layer's append (token_append.py): the token at lengths[b], lengths += 1 ---
@mutating_op("zipkv::token_append", ("k", "v", "k_scale", "v_scale", "k_zero", "v_zero", "lengths", "nonfinite"))
def token_append_op(keys: torch.Tensor, values: torch.Tensor, form: str, k: torch.Tensor, v: torch.Tensor,
                    k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor], k_zero: Optional[torch.Tensor],
                    v_zero: Optional[torch.Tensor], lengths: torch.Tensor, nonfinite: torch.Tensor) -> None:
    """token_append(keys, values, FlashSegment(form, k, v, ...), lengths, nonfinite)."""
    from .flash_decode import FlashSegment
    from .token_append import token_append

    token_append(keys, values, FlashSegment(form, k, v, k_scale, v_scale, k_zero, v_zero), lengths, nonfinite)


__all__ = ["SEGMENT_FIELDS", "decode_attention_op", "flash_decode_op", "flatten_segments", "mutating_op", "token_append_op", "tracing",
           "unflatten_segments", "window_append_op", "window_scores_op", "write_slots_op"]
