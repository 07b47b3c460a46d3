"""Memory that is given back: a zipkv cache is freed when its last reference goes (no
reference cycles, so no wait for the cyclic collector), and holds no tensor that requires
grad after forwards run WITH grad enabled (quantization is not differentiable; a tensor
that requires grad would keep the whole prefill's autograd graph alive with the cache).

Forwards here are direct model calls, not generate(): generate() runs under no_grad itself,
which would hide the grad half of the contract.
"""

import gc
import types
import weakref

import pytest
import torch
from tiny_models import padded_batch, tiny_model

import zipkv
from zipkv import cache_kwargs
from zipkv.eviction_cache import record_prefill
from zipkv.graph_decode import StaticDecoder, StaticLayer, prompt_positions

MINICACHE = "minicache"


def method_names() -> list[str]:
    """Every method name make_cache accepts."""
    return list(zipkv.METHODS)


# Small blocks and windows, so a 48-token prompt and 12 decoded tokens are compressed (the
# first prompt and at least one decoded block).
QUANT = dict(stream_interval=8, residual_length=4)
PARAMS = {
    "zipcache": QUANT,
    "kivi": dict(QUANT, key_group_size=8),
    "uniform": QUANT,
    "zipkv": QUANT,
    "streaming_llm": dict(ratio=0.5),
    "h2o": dict(ratio=0.5),
    "snapkv": dict(ratio=0.5, window=8),
    "pyramidkv": dict(ratio=0.5, window=8),
    "adakv": dict(ratio=0.5, window=8),
    "cake": dict(ratio=0.5, window=8),
    "defensive_kv": dict(ratio=0.5, window=8),
    "key_norm": dict(ratio=0.5),
    "zipvl": dict(stream_interval=8),
    "zipvl_v2": dict(ratio=0.5, stream_interval=8),
    "three_tier": dict(window=8, stream_interval=8),
    "mikv": dict(ratio=0.5, window=8, stream_interval=8),
    MINICACHE: dict(start_layer=0, retain_ratio=0.1),
}
LOSSLESS = {"full"}
NEW_TOKENS = 12


def strongly_reachable(root) -> list:
    """Every object reachable from root through strong references: instance dicts, containers,
    bound methods and closures; not through classes, modules, functions' globals or weak
    references. Tensors are leaves."""
    seen, stack, found = set(), [root], []
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        found.append(obj)
        if isinstance(obj, (torch.Tensor, type, types.ModuleType, weakref.ReferenceType)):
            continue
        if isinstance(obj, types.FunctionType):
            stack.extend(cell.cell_contents for cell in obj.__closure__ or ())
            continue
        stack.extend(gc.get_referents(obj))
    return found


def assert_nothing_requires_grad(cache) -> None:
    reachable = strongly_reachable(cache)
    tensors = [obj for obj in reachable if isinstance(obj, torch.Tensor)]
    assert tensors, "the walk found no tensor: it does not see the cache's storage"
    assert not any(isinstance(obj, torch.nn.Module) for obj in reachable), "the cache holds a model module"
    grad = [tuple(t.shape) for t in tensors if t.requires_grad or t.grad_fn is not None]
    assert not grad, f"tensors held by the cache require grad: {grad}"


def greedy_with_grad(model, cache, ids, mask, new_tokens=NEW_TOKENS):
    """Prefill and greedy decode steps as direct forwards, grad enabled (no torch.no_grad)."""
    assert torch.is_grad_enabled()
    out = model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), use_cache=True)
    for _ in range(new_tokens - 1):
        ids = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), use_cache=True)
    assert out.logits.requires_grad  # the forwards did build an autograd graph
    return out


def assert_freed_without_gc(build_and_run) -> None:
    """build_and_run() -> a cache that was used; after its last reference goes it must be
    gone at once, and with it every tensor it held, the cyclic collector switched off."""
    gc.collect()
    gc.disable()
    try:
        cache = build_and_run()
        held = [weakref.ref(obj) for obj in strongly_reachable(cache) if isinstance(obj, torch.Tensor)]
        ref = weakref.ref(cache)
        del cache
        assert ref() is None, "the cache outlived its last reference (a reference cycle)"
        alive = [tuple(t().shape) for t in held if t() is not None]
        assert not alive, f"tensors the cache held outlived it (a reference cycle below it): {alive}"
    finally:
        gc.enable()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("method", method_names())
def test_cache_is_freed_at_once_and_holds_nothing_that_requires_grad(arch, method):
    model = tiny_model(arch)
    ids, mask = padded_batch(length=48, pad=6)

    def build_and_run():
        cache = zipkv.make_cache(method, model.config, **PARAMS.get(method, {}))
        out = greedy_with_grad(model, cache, ids, mask)
        del out  # holds the cache (past_key_values) and the autograd graph
        assert cache.get_seq_length() > 0
        if method not in LOSSLESS:
            assert cache.stats().ratio > 1, f"{method} compressed nothing: the test would prove little"
        assert_nothing_requires_grad(cache)
        return cache

    assert_freed_without_gc(build_and_run)


@pytest.mark.parametrize("method,params", [("zipvl", dict(sparse_prefill=True, stream_interval=8)),
                                           ("zipvl_v2", dict(sparse_prefill=True, ratio=0.5, stream_interval=8))])
def test_sparse_prefill_cache_is_freed_at_once_and_holds_nothing_that_requires_grad(method, params):
    model = tiny_model("llama")
    ids, mask = padded_batch(length=48, pad=6)

    def build_and_run():
        cache = zipkv.make_cache(method, model.config, **params)
        del greedy_with_grad(model, cache, ids, mask).logits
        assert cache.sparse_prefill_report() is not None
        assert_nothing_requires_grad(cache)
        return cache

    assert_freed_without_gc(build_and_run)


@pytest.mark.parametrize("method", ["h2o", "snapkv", "zipvl", MINICACHE])
def test_cache_built_from_a_recorded_prefill_is_freed_at_once(method):
    """prefill_from_states shares the record's memo with the layers while they are built;
    neither the recording cache nor one built from its records may be kept by the other."""
    model = tiny_model("llama")
    ids, mask = padded_batch(length=48, pad=6)
    records, _, recording = record_prefill(model, ids, mask)

    def build_and_run():
        cache = zipkv.make_cache(method, model.config, **PARAMS[method])
        cache.prefill_from_states(records)
        assert cache.stats().ratio > 1
        return cache

    assert_freed_without_gc(build_and_run)
    del records  # they share the recording cache's tensors
    holder = [recording]
    del recording
    assert_freed_without_gc(holder.pop)


@pytest.mark.parametrize("method", ["zipkv", "snapkv", "h2o", MINICACHE])
def test_cache_used_by_generate_is_freed_at_once(method):
    model = tiny_model("llama")
    ids, mask = padded_batch(length=48, pad=6)

    def build_and_run():
        cache = zipkv.make_cache(method, model.config, **PARAMS.get(method, {}))
        out = model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=NEW_TOKENS,
                             do_sample=False, return_dict_in_generate=True)
        assert out.sequences.shape[1] == ids.shape[1] + NEW_TOKENS
        del out
        return cache

    assert_freed_without_gc(build_and_run)


@pytest.mark.parametrize("method", ["zipkv", "snapkv", MINICACHE])
def test_cache_of_a_model_with_sliding_window_layers_is_freed_at_once(method):
    """Gemma 3 style: the sliding-window layers of the cache must not point back at it either."""
    model = tiny_model("gemma3")
    ids, mask = padded_batch(length=48, pad=6)

    def build_and_run():
        cache = zipkv.make_cache(method, model.config, **PARAMS.get(method, {}))
        del model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), use_cache=True).logits
        return cache

    assert_freed_without_gc(build_and_run)


def static_methods() -> list[str]:
    """The registry's methods that have a static (CUDA-graph) form."""
    return [name for name in method_names() if getattr(zipkv.METHODS[name], "static", False)]


@pytest.mark.parametrize("method", static_methods())
def test_static_cache_is_freed_at_once_and_holds_nothing_that_requires_grad(method):
    model = tiny_model("llama")
    ids, mask = padded_batch(length=40, pad=6)

    def build_and_run():
        cache = zipkv.make_cache(method, model.config, **PARAMS.get(method, {}))
        positions = prompt_positions(mask)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_kwargs(cache))
        first = out.logits[:, -1:].argmax(-1)
        del out
        assert_nothing_requires_grad(cache)  # the eager prefill, before the copy into buffers
        decoder = StaticDecoder(model, cache, first, positions[:, -1] + 1, NEW_TOKENS, mask, cuda_graph=False)
        for _ in range(NEW_TOKENS):
            decoder.step()
        assert all(isinstance(layer, StaticLayer) for layer in cache.layers)
        assert_nothing_requires_grad(cache)
        del decoder
        return cache

    assert_freed_without_gc(build_and_run)


def test_static_cache_stepped_by_hand_with_grad_holds_nothing_that_requires_grad():
    """to_static() outside inference mode and a decode step as a plain grad-enabled forward
    (StaticDecoder itself runs under inference_mode): the buffers written in place stay
    out of the autograd graph."""
    model = tiny_model("llama")
    ids, mask = padded_batch(length=40, pad=6)

    def build_and_run():
        cache = zipkv.make_cache("zipcache", model.config, decode_path="packed", **QUANT)
        positions = prompt_positions(mask)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_kwargs(cache))
        cache.to_static(4, mask)
        step = dict(position_ids=positions[:, -1:] + 1, cache_position=torch.tensor([cache.get_seq_length()]))
        out = model(input_ids=out.logits[:, -1:].argmax(-1), **cache_kwargs(cache), **step)
        assert out.logits.requires_grad
        del out
        assert_nothing_requires_grad(cache)
        return cache

    assert_freed_without_gc(build_and_run)


VLM_PARAMS = {
    "zipcache": QUANT,
    "kivi": dict(QUANT, key_group_size=8),
    "uniform": QUANT,
    "zipkv": QUANT,
    "zipvl": QUANT,
    "vidkv": dict(QUANT, vidkv_group_size=8),
}


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method", ["full", *sorted(VLM_PARAMS)])
def test_vlm_cache_is_freed_at_once_and_holds_nothing_that_requires_grad(arch, method):
    pytest.importorskip("PIL")  # the LLaVA processors' image backend
    from zipkv.vlm import make_vlm_cache
    from zipkv.vlm.tiny import image_prompts, tiny_vlm

    model = tiny_vlm(arch)
    inputs = image_prompts(arch)

    def build_and_run():
        cache = make_vlm_cache(method, model.config, inputs["input_ids"], attention_mask=inputs["attention_mask"],
                               **VLM_PARAMS.get(method, {}))
        out = model(**inputs, **cache_kwargs(cache), use_cache=True)
        assert out.logits.requires_grad
        del out
        if method != "full":
            assert cache.stats().ratio > 1
        assert_nothing_requires_grad(cache)
        return cache

    assert_freed_without_gc(build_and_run)


@pytest.mark.parametrize("method", ["zipkv", "snapkv"])
def test_a_note_nobody_picked_up_keeps_nothing_alive(method):
    """update() leaves a note for zipkv attention; when no attention call takes it (a model
    that does not run zipkv attention), the note must not keep the layer or its cache alive,
    and the same cache's next update still names the layer whose attention never ran."""
    model = tiny_model("llama")
    states = torch.randn(1, 2, 20, 16, requires_grad=True)

    def build_and_run():
        cache = zipkv.make_cache(method, model.config, **PARAMS[method])
        cache.update(states, states, 0)  # no attention call follows
        assert cache.layers[0].awaiting_queries
        with pytest.raises(RuntimeError, match="zipkv attention never ran for layer 0"):
            cache.update(states, states, 1)
        return cache

    assert_freed_without_gc(build_and_run)


def live_tensors() -> tuple[int, int]:
    """(count, bytes) of the tensors Python objects hold right now, collected or not."""
    tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    return len(tensors), sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("method", ["zipkv", "snapkv"])
def test_sequential_prefills_with_grad_do_not_accumulate_tensors(method):
    """A soak in small: ten prompts one after another, grad enabled, a fresh cache each (what
    a server loop does), the cyclic collector off (it runs by object counts, not bytes, so
    it may not run for many GPU-sized prompts). Live tensors must stay flat after the first
    prompt: each cache, and its prompt's autograd graph, is gone when the next one starts."""
    model = tiny_model("llama")
    counts = []
    gc.collect()
    gc.disable()
    try:
        for prompt in range(10):
            ids, mask = padded_batch(length=48, pad=6, seed=prompt)
            cache = zipkv.make_cache(method, model.config, **PARAMS[method])
            out = model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), use_cache=True)
            del out, cache
            counts.append(live_tensors())
    finally:
        gc.enable()
    assert all(count <= counts[0] for count in counts[1:]), f"live (tensors, bytes) grew across prompts: {counts}"
