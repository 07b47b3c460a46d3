"""The compiled static decode step: torch.compile(fullgraph=True) over a whole model step.

A static decode step (graph_decode.StaticDecoder over a cache after `to_static()`) is a fixed
sequence of kernels, but on an H200 it ran at ~2x its roofline because of ~1300 small launches
per step (norms, rotary, casts, appends) between the big GEMMs (experiments/NOTES.md). With
zipkv's kernels as custom ops (kernels/ops.py) dynamo traces the whole step without a graph
break, inductor fuses the small ops around the kernels, and StaticDecoder then captures the
compiled step as a CUDA graph as before.

`compile=` of StaticDecoder / greedy_decode: False (eager), True (inductor), a backend name
("aot_eager", "inductor", ...: what the CPU tests use) or a torch.compile backend callable.
"""

from __future__ import annotations

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


__all__ = ["check_compile", "compiled_step"]
