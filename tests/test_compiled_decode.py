"""The compiled static decode step (zipkv/compiled.py, kernels/ops.py): torch.compile with
fullgraph=True over each decoder layer of a model step of every static form gives the eager
static step's tokens, with one graph per layer for every step (no graph break, no recompile
while blocks are quantized between steps).

On the CPU the backend is aot_eager (dynamo + AOTAutograd: the whole tracing path, the custom
ops' fake implementations and declared mutations included, without inductor's C++ build,
which takes minutes on a busy 2-core box); the GPU check runs inductor
(benchmarks/compiled_check.py).
"""

import pytest
import torch
from tiny_models import padded_batch, tiny_model

import zipkv
from zipkv.compiled import check_compile

NEW = 14


def counting_backend(graphs: list, backend: str = "aot_eager"):
    """A torch.compile backend that records each graph dynamo hands it, then compiles it with
    `backend`: one entry per compile (a graph break or a recompile adds one)."""
    from torch._dynamo.backends.registry import lookup_backend

    def compile_graph(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend(backend)(gm, example_inputs)

    return compile_graph


# (arch, method, params): one of each static form. ZipCache layers (quantizing, with and
# without window saliency), a sliding ZipCache layer beside a full one (Gemma 3), evicting
# layers (SnapKV's kept prompt, H2O's running scores), tiered layers, AdaKV's per-head mask,
# and transformers' window layers inside an evicting cache (Gemma 3's sliding layers).
FORMS = [
    ("llama", "zipkv", dict(stream_interval=5)),
    ("llama", "zipcache", dict(stream_interval=6, residual_length=3, sink_tokens=2)),
    ("gemma3", "kivi", dict(stream_interval=8, residual_length=0)),
    ("llama", "snapkv", dict(ratio=0.5, window=8)),
    ("llama", "h2o", dict(ratio=0.5)),
    ("llama", "streaming_llm", dict(ratio=0.5)),
    ("llama", "zipvl", dict(stream_interval=8)),
    ("llama", "adakv", dict(ratio=0.5, window=8)),
    ("gemma3", "snapkv", dict(ratio=0.5, window=8)),
]
FAST = {0, 1}  # the rest: slow (each compile takes a few seconds on 2 busy cores)


def _cases():
    for i, case in enumerate(FORMS):
        marks = () if i in FAST else (pytest.mark.slow,)
        yield pytest.param(*case, marks=marks, id=f"{case[0]}-{case[1]}")


def _decode(model, method, params, ids, mask, compile):
    cache = zipkv.make_cache(method, model.config, **params)
    tokens = zipkv.greedy_decode(model, cache, ids, mask, max_new_tokens=NEW, cuda_graph=False, eos_token_id=False,
                                 compile=compile)
    return tokens, cache


@pytest.mark.parametrize("arch,method,params", list(_cases()))
def test_compiled_step_equals_the_eager_static_step(arch, method, params):
    """Same tokens as the eager static step over enough steps for blocks to be quantized
    between them (padding included), from one compiled graph per decoder layer: fullgraph=True
    raises at a graph break, and a recompile would hand the backend another graph."""
    model = tiny_model(arch, num_hidden_layers=2)
    ids, mask = padded_batch(length=40, pad=5)
    expected, eager_cache = _decode(model, method, params, ids, mask, False)
    graphs = []
    torch._dynamo.reset()
    tokens, cache = _decode(model, method, params, ids, mask, counting_backend(graphs))
    assert torch.equal(tokens, expected)
    layers = model.config.num_hidden_layers
    assert len(graphs) == layers, f"{len(graphs)} graphs for {layers} layers: a recompile or graph break"
    # the custom ops are in each layer's graph, one per kernel call (not inlined reference code)
    for graph in graphs:
        ops = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
        assert any("zipkv.decode_attention" in name for name in ops), sorted(ops)
    assert not any("forward" in layer.__dict__ for layer in model.model.layers)  # removed after each step
    if method in ("h2o", "streaming_llm"):  # their token goes to a slot by a custom op, not a copied buffer
        assert all("zipkv.write_slots.default" in {str(n.target) for n in graph.graph.nodes} for graph in graphs)
    assert cache.get_seq_length() == eager_cache.get_seq_length()
    for layer, eager_layer in zip(cache.layers, eager_cache.layers):
        assert torch.equal(layer.lengths, eager_layer.lengths)


def test_decoders_reuse_the_compiled_layers_and_leave_the_model_as_it_was():
    """Decoders one after another on one model: the first compiles one graph per layer (past
    dynamo's default limit of 8 entries per code object: the layers' call raises it for its
    own code), the later ones reuse them (same shapes: nothing compiled again), every one gives
    the eager tokens, no layer keeps the compiled forward after a step, and a cache is freed
    at its last reference (dynamo's tracing leftovers, cycles that held it, are collected)."""
    import weakref

    from zipkv.compiled import decoder_layers

    layers = 10
    model = tiny_model("llama", num_hidden_layers=layers)
    ids, mask = padded_batch(length=24, pad=3)
    assert decoder_layers(model) == list(model.model.layers)
    expected, _ = _decode(model, "zipkv", dict(stream_interval=5), ids, mask, False)
    torch._dynamo.reset()
    graphs = []
    backend = counting_backend(graphs)
    for _ in range(3):
        tokens, cache = _decode(model, "zipkv", dict(stream_interval=5), ids, mask, backend)
        assert torch.equal(tokens, expected)
        assert len(graphs) == layers
        gone = weakref.ref(cache)
        del cache
        assert gone() is None
    assert not any("forward" in layer.__dict__ for layer in model.model.layers)


def test_explain_counts_no_graph_break():
    """torch._dynamo.explain over one static step of a ZipCache with window saliency: one
    graph, zero breaks (the reference path's .tolist() of the counts was the break)."""
    from zipkv.graph_decode import StaticDecoder, prompt_positions
    from zipkv.transformers_support import cache_kwargs

    model = tiny_model("llama", num_hidden_layers=1)
    ids, mask = padded_batch(length=24, pad=3)
    cache = zipkv.make_cache("zipcache", model.config, stream_interval=8)
    positions = prompt_positions(mask)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache_kwargs(cache))
    decoder = StaticDecoder(model, cache, out.logits[:, -1:].argmax(-1), positions[:, -1] + 1, 4, mask,
                            cuda_graph=False)
    torch._dynamo.reset()
    with torch.inference_mode():
        explained = torch._dynamo.explain(decoder._forward)()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_custom_ops_match_the_wrappers_on_random_inputs():
    """The ops' real implementations are the wrappers' eager code, and opcheck validates
    their schemas, fake implementations and declared mutations on fresh random inputs."""
    from zipkv.kernels import ops
    from zipkv.kernels.decode_attention import decode_attention
    from zipkv.kernels.packed import PackedSegment, pack_planes

    g = torch.Generator().manual_seed(7)
    b, h, hq, n, w, d = 2, 2, 4, 12, 6, 32

    def segment(bits):
        codes = lambda: pack_planes(torch.randint(0, 2**bits, (b, h, n, d), generator=g), bits)  # noqa: E731
        return PackedSegment(bits, codes(), torch.rand(b, h, 2, d, generator=g), torch.randn(b, h, 2, d, generator=g),
                             (torch.arange(n) >= n // 2).int(), codes(), torch.rand(b, h, n, 1, generator=g),
                             torch.randn(b, h, n, 1, generator=g))

    segs = [segment(2), segment(4)]
    query = torch.randn(b, hq, 1, d, generator=g)
    k_fp, v_fp = torch.randn(b, h, w, d, generator=g), torch.randn(b, h, w, d, generator=g)
    lengths = torch.tensor([9, 5, 4], dtype=torch.int32)
    mask = torch.rand(b, 2 * n + w, generator=g) > 0.2
    tensors, bits = ops.flatten_segments(segs)
    out, lse = ops.decode_attention_op(query, tensors, bits, k_fp, v_fp, mask, 0.3, lengths, True)
    ref, ref_lse = decode_attention(query, segs, k_fp, v_fp, mask=mask, scale=0.3, lengths=lengths, return_lse=True)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    torch.library.opcheck(ops.decode_attention_op, (query, tensors, bits, k_fp, v_fp, mask, 0.3, lengths, False))
    scores, ref_scores = torch.full((b, hq, w), float("nan")), torch.full((b, hq, w), float("nan"))
    out, lse = ops.decode_attention_scores_op(query, tensors, bits, k_fp, v_fp, mask, 0.3, lengths, scores)
    decode_attention(query, segs, k_fp, v_fp, mask=mask, scale=0.3, lengths=lengths, scores_out=ref_scores)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    assert torch.equal(scores[..., :4], ref_scores[..., :4]) and torch.isnan(scores[..., 4:]).all()
    torch.library.opcheck(ops.decode_attention_scores_op, (query, tensors, bits, k_fp, v_fp, mask, 0.3, lengths,
                                                           scores.clone()))

    keys, values = torch.randn(b, h, 1, d, generator=g), torch.randn(b, h, 1, d, generator=g)
    nonfinite = torch.zeros((), dtype=torch.bool)
    torch.library.opcheck(ops.window_append_op, (keys, values, k_fp.clone(), v_fp.clone(), lengths, nonfinite))
    k_win = k_fp.clone()
    ops.window_append_op(keys, values, k_win, v_fp.clone(), lengths, nonfinite)
    assert torch.equal(k_win[:, :, 4:5], keys) and not bool(nonfinite)
    real = torch.rand(b, w, generator=g) > 0.3
    score_sum, score_count = torch.zeros(b, h, w), torch.zeros(b, 1, w)
    torch.library.opcheck(ops.window_scores_op, (query, k_fp, lengths, real, score_sum.clone(), score_count.clone(),
                                                 0.2))
    ops.window_scores_op(query, k_fp, lengths, real, score_sum, score_count, 0.2)
    assert torch.equal(score_count[:, 0], ((torch.arange(w) < 4) & real).float())

    slot = torch.randint(0, w, (b, h), generator=g)
    torch.library.opcheck(ops.write_slots_op, (keys, values, k_fp.clone(), v_fp.clone(), slot, nonfinite.clone()))
    k_buf = k_fp.clone()
    ops.write_slots_op(keys, values, k_buf, v_fp.clone(), slot, nonfinite)
    for row in range(b):
        for head in range(h):
            assert torch.equal(k_buf[row, head, slot[row, head]], keys[row, head, 0])


def test_compile_argument_is_checked():
    assert check_compile(False) is None and check_compile(True) == "inductor"
    assert check_compile("aot_eager") == "aot_eager"
    with pytest.raises(ValueError, match="compile must be"):
        check_compile("fastest")
    with pytest.raises(ValueError, match="compile must be"):
        check_compile(3)


# -- model.generate() on the compiled path (static_for_generate) ---------------------------------
def _compile_config(graphs: list):
    """generate()'s compile settings for the CPU: transformers compiles only on accelerators
    unless _compile_all_devices is set; aot_eager through the counting backend."""
    from transformers import CompileConfig

    config = CompileConfig(backend=counting_backend(graphs), mode=None, fullgraph=False, dynamic=False)
    config._compile_all_devices = True
    return config


def _generate(model, cache, ids, mask, new_tokens, **kwargs):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, **zipkv.cache_kwargs(cache),
                             **kwargs)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("arch,method,params", [
    ("llama", "zipkv", dict(stream_interval=5)),
    pytest.param("gemma3", "zipcache", dict(stream_interval=6, residual_length=3, sink_tokens=2),
                 marks=pytest.mark.slow),
])
def test_generate_compiles_the_static_step_and_equals_the_eager_cache(arch, method, params):
    """model.generate with a cache made by static_for_generate: transformers compiles the
    decode step (the cache reports is_compileable), the prompt runs eagerly, the cache turns
    static at the first decode step and quantizes its blocks between steps; the tokens equal
    generate() with the eager cache (left padding included), from one compiled graph."""
    model = tiny_model(arch)
    ids, mask = padded_batch(length=40, pad=5)
    expected = _generate(model, zipkv.make_cache(method, model.config, decode_path="packed", **params), ids, mask, NEW,
                         do_sample=False)
    cache = zipkv.make_cache(method, model.config, decode_path="packed", **params).static_for_generate(model, NEW)
    assert cache.is_compileable
    graphs = []
    torch._dynamo.reset()
    tokens = _generate(model, cache, ids, mask, NEW, do_sample=False, compile_config=_compile_config(graphs))
    assert torch.equal(tokens, expected)
    assert len(graphs) == 1, f"{len(graphs)} graphs: a recompile or graph break"
    assert cache.is_static and cache.get_seq_length() == ids.shape[1] + NEW - 1
    assert any(layer.low.num_tokens > 0 for layer in cache.layers if hasattr(layer, "low"))


def test_generate_samples_like_dynamic_cache_on_a_lossless_setting():
    """Sampling (temperature, top-k, a logits processor from transformers) with a fixed seed: a
    cache that keeps every token (snapkv at ratio 1: the whole prompt, then every new token) on
    the compiled path gives DynamicCache's tokens."""
    from transformers import DynamicCache

    model = tiny_model("llama")
    ids, mask = padded_batch(length=24, pad=4)
    sampling = dict(do_sample=True, temperature=0.8, top_k=20, repetition_penalty=1.1)
    torch.manual_seed(3)
    expected = _generate(model, DynamicCache(), ids, mask, NEW, **sampling)
    cache = zipkv.make_cache("snapkv", model.config, ratio=1.0, window=8).static_for_generate(model, NEW)
    torch._dynamo.reset()
    torch.manual_seed(3)
    tokens = _generate(model, cache, ids, mask, NEW, compile_config=_compile_config([]), **sampling)
    assert torch.equal(tokens, expected)


def test_static_for_generate_checks_its_arguments():
    model = tiny_model("llama", num_hidden_layers=1)
    cache = zipkv.make_cache("zipkv", model.config)
    assert not cache.is_compileable
    with pytest.raises(ValueError, match="max_new_tokens"):
        cache.static_for_generate(model, 0)
    with pytest.raises(ValueError, match="model must be"):
        cache.static_for_generate("llama", 4)
    ids, mask = padded_batch(length=20, pad=0)
    cache.static_for_generate(model, 2)
    with pytest.raises(RuntimeError, match="made for 2 new tokens"):
        _generate(model, cache, ids, mask, 6, do_sample=False, compile_config=_compile_config([]))
