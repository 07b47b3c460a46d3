"""Greedy decoding over a static zipkv cache, each step one CUDA-graph replay.

An eager transformers decode step is host-bound: dozens of small launches per layer and
Python in between cost more than the bytes the step reads (experiments/NOTES.md). With the
cache in preallocated buffers whose counts live on the device (`ZipCache.to_static`), a
whole model step is a fixed sequence of kernels: it is captured once and replayed. Only the
quantization of a block, every `stream_interval` tokens, runs between replays.

    tokens = zipkv.greedy_decode(model, cache, input_ids, attention_mask, max_new_tokens=64)

`StaticDecoder` is the piece under it, for a cache already filled some other way (benchmarks).
Any cache with a `to_static(extra_tokens, prompt_padding)` whose layers then follow
`StaticLayer` (below) decodes this way: ZipCache (cache/static_layer.py) and the evicting
caches (cache/static_evicting_layer.py).
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

import torch

from .compiled import compiled_step
from .decode_positions import decode_positions, forget_rope_deltas
from .prefill import chunked_prefill, prompt_positions
from .transformers_support import cache_argument_name, cache_kwargs


@runtime_checkable
class StaticLayer(Protocol):
    """What StaticDecoder asks of each layer of a cache after `cache.to_static()`.

    A step (captured): `update(key_states, value_states)` writes the one new token into
    preallocated buffers (counts advance on the device; NaN/inf only set the bool tensor
    `nonfinite`) and hands the queries to `attend(module, query, key, value, attention_mask,
    scaling, **kwargs)`, which reads the buffers through `decode_attention(..., lengths=...)`.
    Between steps (host): `advance()` mirrors the step's counts; when `flush_due()`, the decoder
    checks `nonfinite` and runs `flush(check_finite=False)`, or `flush_on_device()` and then
    `mirror_device_flush()` for all due layers when every one `can_flush_on_device()`
    (a layer that never flushes returns False from flush_due and can_flush_on_device);
    `check_finite()` raises on NaN/inf; `has_room()`: whether one more step fits the buffers
    (asked once the steps asked for are done). `decode_inputs()`: (packed segments, fp16 buffer
    [B, Hkv, N, D]) the decode kernel reads (to check the shapes before a capture).
    Accounting: `held_tensors()` is every tensor held (stats() counts exactly these);
    `get_seq_length()` the logical length (positions continue from it).
    """

    nonfinite: torch.Tensor

    def update(self, key_states, value_states, *args, **kwargs): ...

    def attend(self, module, query, key, value, attention_mask, scaling, **kwargs): ...

    def advance(self) -> None: ...

    def flush_due(self) -> bool: ...

    def flush(self, check_finite: bool = True) -> None: ...

    def can_flush_on_device(self) -> bool: ...

    def check_finite(self) -> None: ...

    def has_room(self) -> bool: ...

    def decode_inputs(self) -> tuple: ...

    def held_tensors(self) -> list: ...

    def get_seq_length(self) -> int: ...


def capture(forward, after_warm_up=None) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `forward`: one real run first on a side stream (compiles the Triton
    kernels, creates the BLAS handles; capture requires the side stream), then
    `after_warm_up()`, then the capture, which records a run without executing it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        forward()
    torch.cuda.current_stream().wait_stream(side)
    if after_warm_up is not None:
        after_warm_up()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()
    return graph


class StaticDecoder:
    """Greedy decode steps over a zipkv cache that holds a prompt (a ZipCache or an
    EvictionCache: any cache with to_static() whose layers then follow StaticLayer).

    next_tokens [B, 1]: the tokens to feed first; next_positions [B]: their (text) positions; for
    an M-RoPE model (Qwen2-VL) the steps add the rope_deltas of the model's prompt forward.
    The cache is moved into static buffers with room for `max_steps` more tokens. On CUDA
    (cuda_graph=None or True) the first step runs eagerly (compiling the kernels) and the
    next ones replay a graph captured after it; cuda_graph=False runs every step eagerly
    (same buffers and kernels: how the CPU tests check the static path). device_flush (default:
    with graphs): blocks of the usual shape are quantized with device-side offsets, on CUDA by
    a second graph captured at the second such block.
    compile (compiled.py): False (default), True (inductor), or a torch.compile backend (a name
    such as "aot_eager", or a callable): each decoder layer of the step is compiled with
    fullgraph=True (zipkv's kernels are custom ops: kernels/ops.py), then the step is captured
    as a CUDA graph as the eager step.
    """

    def __init__(self, model, cache, next_tokens: torch.Tensor, next_positions: torch.Tensor,
                 max_steps: int, prompt_padding=None, cuda_graph: bool | None = None,
                 device_flush: bool | None = None, compile: bool | str | object = False):
        if not has_static_form(cache):
            raise ValueError(f"cache must be a zipkv cache with a static form, e.g. a ZipCache or an EvictionCache "
                             f"(got {type(cache).__name__})")
        if next_tokens.dim() != 2 or next_tokens.shape[1] != 1:
            raise ValueError(f"next_tokens must be [batch, 1] (got {tuple(next_tokens.shape)})")
        device = next_tokens.device
        if cuda_graph and device.type != "cuda":
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        self.model, self.cache = model, cache
        self.use_graph = device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
        if self.use_graph:  # a graph captures one device: a split or offloaded model is refused by name
            from .parallel.placement import check_one_device

            check_one_device(model)
        # the step function: eager, or compiled per decoder layer (compiled.py); the unbound
        # function, called with self: a bound method kept on self would be a reference cycle
        # that holds the decoder (and its cache) until the cyclic collector runs
        self.step_function = compiled_step(StaticDecoder._forward, compile, model)
        with torch.inference_mode():
            cache.to_static(max_steps, prompt_padding)
            odd = [type(layer).__name__ for layer in cache.layers if not isinstance(layer, StaticLayer)]
            if odd:
                raise ValueError(f"{type(cache).__name__}.to_static() left layers {sorted(set(odd))} that do not "
                                 "follow graph_decode.StaticLayer")
            if self.use_graph:
                _check_graph_kernel(model, cache)
            self.ids = next_tokens.clone()
            # [B, 1], or [3, B, 1] with the prompt's rope_deltas for M-RoPE models (Qwen2-VL)
            self.positions = decode_positions(model, next_positions)
            self.cache_position = torch.tensor([cache.get_seq_length()], device=device)
        self.graph = None
        # Blocks of the fixed shape are quantized with device-side offsets (one more graph on
        # CUDA, captured at the second such block: the first one warms it up).
        self.device_flush = self.use_graph if device_flush is None else bool(device_flush)
        self.flush_graph, self.flush_graph_layers, self.device_flushes = None, None, 0
        self.steps, self.max_steps = 0, max_steps
        self.flushes, self.flush_seconds = 0, 0.0  # blocks quantized between replays, host time spent
        # the forward's cache keyword, looked up once here: inside a compiled step dynamo cannot
        # trace the version lookup (it imports transformers' lazy module)
        self.cache_keyword = cache_argument_name()

    def _forward(self) -> None:
        out = self.model(input_ids=self.ids, position_ids=self.positions, cache_position=self.cache_position,
                         use_cache=True, **{self.cache_keyword: self.cache})
        self.ids.copy_(out.logits[:, -1:].argmax(-1))
        self.positions += 1
        self.cache_position += 1

    def _after_step(self) -> None:
        """The host's mirror of the step; a block is quantized when one is due (on the device,
        replaying a graph, when it has the usual shape; else by the host path)."""
        due = mirror_step(self.cache.layers)
        if due:
            if self.ids.device.type == "cuda":
                torch.cuda.synchronize()  # time the flush itself, not the replays queued before it
            start = time.perf_counter()
            if self.device_flush and all(layer.can_flush_on_device() for layer in due):
                check_due_finite(due)
                self._flush_on_device(due)
            else:
                flush_due(due)
            self.flushes += 1
            self.flush_seconds += time.perf_counter() - start
        self.steps += 1

    def _flush_on_device(self, due) -> None:
        ids = [layer.layer_idx for layer in due]
        if self.flush_graph is not None and self.flush_graph_layers == ids:
            self.flush_graph.replay()
        elif self.use_graph and self.device_flushes:
            self.flush_graph, self.flush_graph_layers = torch.cuda.CUDAGraph(), ids
            with torch.cuda.graph(self.flush_graph, pool=self.graph.pool() if self.graph is not None else None):
                for layer in due:
                    layer.flush_on_device()
            self.flush_graph.replay()
        else:  # eagerly: on the CPU, and the first time on CUDA (warm-up)
            for layer in due:
                layer.flush_on_device()
        for layer in due:
            layer.mirror_device_flush()
        self.device_flushes += 1

    def check_finite(self) -> None:
        """Raise if a step wrote NaN/inf states (one wait for all layers); a layer that never
        flushes would otherwise never say so."""
        if bool(torch.stack([layer.nonfinite for layer in self.cache.layers]).any()):
            for layer in self.cache.layers:
                layer.check_finite()

    def step(self) -> torch.Tensor:
        """Feed the current tokens, return the next ones ([B, 1], a buffer the next step overwrites)."""
        if self.steps >= self.max_steps:  # past the steps asked for: a write past a buffer's end is refused
            full = [layer.layer_idx for layer in self.cache.layers if not layer.has_room()]
            if full:
                raise RuntimeError(f"the static buffers of layers {full} are full (max_steps={self.max_steps})")
        with torch.inference_mode():
            if self.graph is None and self.use_graph:
                # the first step is the warm-up run; later steps replay the graph
                self.graph = capture(lambda: self.step_function(self), after_warm_up=self._after_step)
            else:
                if self.graph is not None:
                    self.graph.replay()
                else:
                    self.step_function(self)
                self._after_step()
        return self.ids


def mirror_step(layers) -> list:
    """Each layer's host mirror of one decoded step; the layers with a block due now."""
    for layer in layers:
        layer.advance()
    return [layer for layer in layers if layer.flush_due()]


def check_due_finite(due) -> None:
    """Raise if a due layer's steps wrote NaN/inf (one wait for all of them)."""
    if due and bool(torch.stack([layer.nonfinite for layer in due]).any()):
        for layer in due:
            layer.check_finite()


def flush_due(due) -> None:
    """The due blocks quantized by the host path (after one NaN/inf check for all)."""
    check_due_finite(due)
    for layer in due:
        layer.flush(check_finite=False)


def _check_graph_kernel(model, cache) -> None:
    """A captured step must attend with the Triton kernel (the reference path reads the counts
    on the host, which a graph cannot): refuse shapes the kernel does not take, clearly."""
    from .kernels._runtime import triton_installed

    if not triton_installed():
        raise ValueError("cuda_graph decoding needs triton (pip install zipkv[kernels]); use cuda_graph=False")
    from .kernels._triton_decode import supported

    segments, buffer = cache.layers[0].decode_inputs()
    text = model.config.get_text_config(decoder=True)
    batch, _, _, head_dim = buffer.shape
    query = buffer.new_empty(batch, text.num_attention_heads, 1, head_dim)
    reason = supported(query, segments)
    if reason is not None:
        raise ValueError(f"cuda_graph decoding needs the Triton decode kernel, which cannot run this cache: {reason}; "
                         "use cuda_graph=False")


def _stop_ids(model, eos_token_id):
    """(eos ids tensor or None, pad id) as generate() would use them."""
    config = getattr(model, "generation_config", None)
    if eos_token_id is None:
        eos_token_id = getattr(config, "eos_token_id", None)
    if eos_token_id is None or eos_token_id is False:
        return None, None
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    pad = getattr(config, "pad_token_id", None)
    return torch.tensor(eos), eos[0] if pad is None else pad


def finish_at_eos(tokens: torch.Tensor, eos: torch.Tensor, pad: int) -> torch.Tensor:
    """generate()'s output: after a row's first EOS, pad tokens; cut once every row has
    finished."""
    is_eos = torch.isin(tokens, eos.to(tokens.device))
    done_before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    tokens = tokens.masked_fill(done_before, pad)
    finished = is_eos.long().cumsum(dim=1) > 0
    all_done = finished.all(dim=0).nonzero()
    return tokens if all_done.numel() == 0 else tokens[:, : int(all_done[0]) + 1]


# Steps between checks whether every row has emitted EOS (each check waits for the GPU).
EOS_CHECK_EVERY = 32


def has_static_form(cache) -> bool:
    """Whether `cache` can move into static buffers (to_static) for StaticDecoder."""
    return callable(getattr(cache, "to_static", None)) and hasattr(cache, "layers")


def greedy_decode(model, cache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  max_new_tokens: int = 32, cuda_graph: bool | None = None, eos_token_id=None,
                  compile: bool | str | object = False, prefill_chunk: int | None = None) -> torch.Tensor:
    """Greedy new tokens [B, <= max_new_tokens] for a (left-)padded prompt batch, through a
    fresh zipkv cache (a ZipCache or an EvictionCache): the prompt in one eager forward, then
    static decode steps (CUDA graphs on CUDA). The same tokens as model.generate(...,
    do_sample=False) with this cache in its eager form (a ZipCache with decode_path="packed"):
    rows that emitted EOS (eos_token_id, default the
    model's generation config; False: never stop) continue with pad tokens, and decoding
    stops once every row has (checked every EOS_CHECK_EVERY steps; the output is cut there).
    compile: see StaticDecoder (the decode step through torch.compile, same tokens).
    prefill_chunk: the prompt in forwards of at most this many tokens (prefill.chunked_prefill:
    the peak memory of a chunk, not of the prompt); None: one forward.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, length] tensor (got {tuple(input_ids.shape)})")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1 (got {max_new_tokens!r})")
    if not has_static_form(cache) or cache.get_seq_length() != 0:
        raise ValueError("cache must be a new, empty ZipCache or EvictionCache (greedy_decode fills it from the "
                         "prompt)")
    # The whole decode is known here (the last token is never fed back): the context check of
    # cache.position_limit (warn or raise) before the prompt runs; static steps check nothing.
    cache.position_limit.check(input_ids.shape[1], max_new_tokens - 1)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    eos, pad = _stop_ids(model, eos_token_id)
    positions = prompt_positions(attention_mask)
    if prefill_chunk is not None:
        first = chunked_prefill(model, cache, input_ids, attention_mask, prefill_chunk).argmax(-1)
    else:
        forget_rope_deltas(model)  # text position_ids given: an M-RoPE model's deltas are zero
        with torch.inference_mode():
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                        use_cache=True, **cache_kwargs(cache))
            first = out.logits[:, -1:].argmax(-1)
            del out
    tokens = [first]
    if max_new_tokens > 1:
        decoder = StaticDecoder(model, cache, first, positions[:, -1] + 1, max_new_tokens - 1, attention_mask, cuda_graph,
                                compile=compile)
        for i in range(1, max_new_tokens):
            if i % EOS_CHECK_EVERY == 0:
                decoder.check_finite()  # waits for the GPU anyway, like the EOS check
                if eos is not None and bool(torch.isin(torch.cat(tokens, 1), eos.to(first.device)).any(dim=1).all()):
                    break
            tokens.append(decoder.step().clone())
        decoder.check_finite()
    tokens = torch.cat(tokens, dim=1)
    return tokens if eos is None else finish_at_eos(tokens, eos, pad)


__all__ = ["StaticDecoder", "StaticLayer", "greedy_decode", "has_static_form", "prompt_positions"]
