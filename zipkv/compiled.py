"""The compiled static decode step: torch.compile(fullgraph=True) over a whole model step.

A static decode step (graph_decode.StaticDecoder over a cache after `to_static()`) is a fixed
sequence of kernels, but on an H200 it ran at ~2x its roofline because of ~1300 small launches
per step (norms, rotary, casts, appends) between the big GEMMs (experiments/NOTES.md). With
zipkv's kernels as custom ops (kernels/ops.py) dynamo traces the whole step without a graph
break, inductor fuses the small ops around the kernels, and StaticDecoder then captures the
compiled step as a CUDA graph as before.

`compile=` of StaticDecoder / greedy_decode: False (eager), True (inductor), a backend name
("aot_eager", "inductor", ...: what the CPU tests use) or a torch.compile backend callable.

generate(): `cache.static_for_generate(max_new_tokens)` (ZipkvCache) makes a new cache report
`is_compileable`, so `model.generate(**inputs, cache=cache, max_new_tokens=N)` compiles the
decode step by transformers' own mechanism (torch.compile of the model call, CUDA graphs with
mode "reduce-overhead" on CUDA; on the CPU only with a CompileConfig whose
`_compile_all_devices` is set). The capacity is the argument: transformers does not hand the
cache its max_length. The prompt runs eagerly; `between_steps` (below) runs at the first
model's forward pre-hook before every decode step, outside the compiled graphs: it moves the cache into its
static form the first time (with the padding counts the prompt's mask gave,
`prompt_padding_counts`), then mirrors each step on the host and quantizes the blocks that are
due, as StaticDecoder does between replays.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch


def check_compile(compile) -> object:
    """The backend `compile` names (None: do not compile), or a ValueError naming it."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return "inductor"
    if isinstance(compile, str):
        names = torch._dynamo.list_backends(exclude_tags=())
        if compile not in names:
            raise ValueError(f"compile must be True, False, a torch.compile backend callable or one of {sorted(names)} "
                             f"(got {compile!r})")
        return compile
    if callable(compile):
        return compile
    raise ValueError(f"compile must be True, False, a torch.compile backend name or callable (got {compile!r})")


def compiled_step(step: Callable, compile) -> Callable:
    """`step` itself, or torch.compile(step, fullgraph=True, dynamic=False) with the backend
    `compile` names. fullgraph: a graph break would silently split the step into pieces with
    Python between them, which is what compiling is for removing; dynamic=False: every step has
    the same shapes, so one graph serves all of them (a recompile would be a bug)."""
    backend = check_compile(compile)
    if backend is None:
        return step
    return torch.compile(step, backend=backend, fullgraph=True, dynamic=False)


def prompt_padding_counts(attention_mask, batch: int) -> torch.Tensor | None:
    """Padding tokens per row of a first prompt forward, from the model's mask ([B, 1, Tq, Tk],
    bool keep or additive float; None: no padding): a real key is seen by at least its own query
    row (causal and sliding masks alike), a padding key by none."""
    if attention_mask is None or attention_mask.dim() != 4:
        return None
    mask = attention_mask[:, 0]
    seen = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    counts = mask.shape[-1] - seen.any(dim=1).sum(dim=1)
    return counts.expand(batch) if counts.shape[0] == 1 else counts


def between_steps_hook(cache):
    """A forward pre-hook for the model (static_for_generate registers it): between_steps
    before each one-token forward with `cache` (found in the call's keyword arguments; a
    forward with another cache, or after `cache` is gone, is left alone). The hook is where
    the compiled call breaks its graph, once, before the model's forward: a break inside the
    layers' loop would compile each layer's frame on its own."""
    ref = weakref.ref(cache)

    @torch._dynamo.disable
    def hook(module, args, kwargs):
        target = ref()
        given = kwargs.get("cache", kwargs.get("past_key_values"))
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        tokens = (ids if ids is not None else embeds).shape[1] if (ids is not None or embeds is not None) else 0
        if target is not None and given is target and tokens == 1 and target.static_after_prompt is not None:
            between_steps(target)
        return None

    return hook


def between_steps(cache) -> None:
    """Host work before a decode step of a cache made by static_for_generate (a graph break in a
    compiled step: the compiled graphs before and after it read only device state). The first
    time: to_static() with the capacity asked for; later: the previous step mirrored on the
    host and the due blocks quantized (graph_decode.mirror_step); always: a clear error when
    the buffers are full (more tokens than static_for_generate was given)."""
    if not cache.is_static:
        cache.to_static(cache.static_after_prompt, cache.prompt_padding)
        cache.prompt_padding, cache.static_steps = None, 0  # held no longer (stats() counts the layers)
    else:
        cache.sync_step()
        from .graph_decode import flush_due

        flush_due([layer for layer in cache.layers if layer.flush_due()])
    cache.static_steps += 1
    full = [layer.layer_idx for layer in cache.layers if not layer.has_room()]
    if full or cache.static_steps > cache.static_after_prompt:
        raise RuntimeError(f"the static buffers are full: the cache was made for "
                           f"{cache.static_after_prompt} new tokens (static_for_generate)")
    cache.step_pending = True


__all__ = ["between_steps", "between_steps_hook", "check_compile", "compiled_step", "prompt_padding_counts"]
