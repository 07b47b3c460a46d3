"""The compiled static decode step: torch.compile over each decoder layer of a model step.

A static decode step (graph_decode.StaticDecoder over a cache after `to_static()`) is a fixed
sequence of kernels, but on an H200 it ran at ~2x its roofline because of ~1300 small launches
per step (norms, rotary, casts, appends) between the big GEMMs (experiments/NOTES.md). With
zipkv's kernels as custom ops (kernels/ops.py) dynamo traces a decoder layer without a graph
break, inductor fuses the small ops around the kernels, and StaticDecoder then captures the
compiled step as a CUDA graph as before.

Each decoder layer is compiled on its own (fullgraph=True, static shapes), not the whole step:
the layers are the same code over different weights and cache buffers, so their graphs are
identical and inductor compiles one and reuses it (its FX graph cache) for the others, where a
whole-step graph is one 32-layer trace per method and shape (about a minute each for an 8B
model). A model whose decoder layers cannot be found (decoder_layers) has its whole step
compiled instead. The layers run through one compiled call with a code object of its own
(private_call): dynamo keeps its compiled entries on the code object of the frame, one per
layer here (each layer's module is guarded), and a call shared with other code would pass
torch._dynamo.config.recompile_limit (8 per code object; LayerwiseStep raises it for its own
call to 8 per layer), after which dynamo silently runs the frame eagerly. A later decoder over
the same model and shapes finds its entries and compiles nothing.

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

import contextlib
import functools
import gc
import types
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


def private_call() -> Callable:
    """`call(target, *args, **kwargs) = target(*args, **kwargs)` with a code object no other
    function shares (see the module docstring: dynamo's compiled entries live on the code
    object of the frame, and this one's are zipkv's alone)."""
    def call(target, *args, **kwargs):
        return target(*args, **kwargs)

    code = call.__code__.replace()  # a new code object, equal to the old one but not it
    return types.FunctionType(code, call.__globals__, call.__name__)


# backend -> the compiled call every decoder layer runs through (one dynamo entry per layer and
# shape on it; a later decoder over the same model and shapes reuses them, compiling nothing)
_LAYER_CALLS: dict = {}
ENTRIES_PER_LAYER = 8  # shapes (batch, capacity, cache layout) per layer before dynamo gives up on one


def layer_call(backend) -> Callable:
    if backend not in _LAYER_CALLS:
        _LAYER_CALLS[backend] = torch.compile(private_call(), backend=backend, fullgraph=True, dynamic=False)
    return _LAYER_CALLS[backend]


def decoder_layers(model) -> list | None:
    """The text decoder's layers of a transformers model (the ModuleList of
    num_hidden_layers modules whose attention knows its layer_idx), or None."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    count = config.get_text_config(decoder=True).num_hidden_layers
    for name, module in model.named_modules():
        if (isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers" and len(module) == count
                and count and hasattr(getattr(module[0], "self_attn", None), "layer_idx")):
            return list(module)
    return None


class LayerwiseStep:
    """`step(decoder)` with each decoder layer of `model` compiled on its own: each layer's
    forward, routed through one compiled call (layer_call), is installed on the layer (an
    instance attribute) for the duration of a call and removed after it, so the model outside
    the step (the prompt's forward, the user's own calls) runs as it did. Under CUDA graphs
    only the warm-up and the capture call it."""

    def __init__(self, step: Callable, layers: list, backend):
        self.step, self.layers = step, layers
        self.call = layer_call(backend)
        # each layer's forward as it is now (an instance attribute such as accelerate's hook, or the method)
        self.forwards = [functools.partial(self.call, layer.forward) for layer in layers]
        # one entry per layer and shape on the shared call: dynamo's default limit (8) is per code object
        self.limit = max(torch._dynamo.config.recompile_limit, ENTRIES_PER_LAYER * len(layers))
        self.collected = False

    @contextlib.contextmanager
    def installed(self):
        saved = [layer.__dict__.get("forward") for layer in self.layers]
        for layer, forward in zip(self.layers, self.forwards):
            layer.forward = forward
        try:
            with torch._dynamo.config.patch(recompile_limit=self.limit):
                yield
        finally:
            for layer, before in zip(self.layers, saved):
                if before is None:
                    del layer.forward
                else:
                    layer.forward = before

    def __call__(self, decoder) -> None:
        with self.installed():
            self.step(decoder)
        if not self.collected:
            # dynamo's tracing leaves reference cycles behind that hold what it traced (the
            # cache among them) until the cyclic collector runs: collected once, after the
            # call that compiled, the cache is freed when its last reference goes
            self.collected = True
            gc.collect()


def compiled_step(step: Callable, compile, model=None) -> Callable:
    """`step` itself, or `step` compiled with the backend `compile` names: per decoder layer of
    `model` (LayerwiseStep), or as a whole when the layers cannot be found. fullgraph: a graph
    break would silently split a layer into pieces with Python between them, which is what
    compiling is for removing; dynamic=False: every step has the same shapes, so one graph
    serves all of them (a recompile would be a bug)."""
    backend = check_compile(compile)
    if backend is None:
        return step
    layers = decoder_layers(model) if model is not None else None
    if layers:
        return LayerwiseStep(step, layers, backend)
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


__all__ = ["LayerwiseStep", "between_steps", "between_steps_hook", "check_compile", "compiled_step", "decoder_layers",
           "layer_call", "private_call", "prompt_padding_counts"]
