"""The contract every method of the registry keeps, on every model family zipkv supports.

One parametrized suite over `zipkv.METHODS` x {tiny Llama, Qwen2, Gemma 3 text (a sliding
layer beside a full one), LLaVA, Qwen2-VL}: a method added to the registry is tested here
without touching this file. Per case: greedy generation works, then one more step runs with
grad enabled (as a user's own loop may); `stats().bytes_held` equals the bytes of the tensors
reachable from the cache; no held tensor requires grad; after `del` the cache is gone
without the cyclic garbage collector; the left-padded row of a batch gives the same tokens
as the same row run alone; lossless settings equal DynamicCache; methods with a static form
give the same tokens through it (`greedy_decode`) as through `model.generate`.
"""

import gc
import weakref

import pytest
import torch
from held_tensors import held_bytes, reachable_tensors
from tiny_models import padded_batch, tiny_model
from transformers import DynamicCache

import zipkv
from zipkv import cache_kwargs

TEXT_ARCHS = ("llama", "qwen2", "gemma3")
VLM_ARCHS = ("llava", "qwen2_vl")
NEW_TOKENS = 10


def contract_params(spec) -> dict:
    """Settings that make a 40-token prompt compress on a 2-layer toy model: small blocks
    and windows, half the tokens kept."""
    params = {}
    if spec.takes_budget:
        params["ratio"] = 0.5
    small = dict(stream_interval=8, residual_length=4, window=8, start_layer=0)
    params.update({name: value for name, value in small.items() if name in spec.params})
    return params


def build(method: str, config):
    return zipkv.METHODS[method].build(config, **contract_params(zipkv.METHODS[method]))


def generate(model, cache, ids, mask, **kwargs):
    """NEW_TOKENS greedy tokens per row (EOS suppressed, so a row alone runs as long as in a batch)."""
    kwargs = {"min_new_tokens": NEW_TOKENS, **kwargs}
    out = model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=NEW_TOKENS,
                         do_sample=False, **kwargs)
    return out[:, ids.shape[1]:]


def check_detached(cache) -> weakref.ref:
    """No held tensor requires grad. Returns a weak reference: the caller drops its last
    strong one and checks `assert_freed`."""
    grads = [tuple(t.shape) for t in reachable_tensors(cache) if t.requires_grad]
    assert not grads, f"the cache holds tensors that require grad: {grads}"
    return weakref.ref(cache)


def assert_freed(ref: weakref.ref) -> None:
    assert ref() is None, "the cache outlived its last reference (a reference cycle)"


@pytest.fixture(autouse=True)
def no_cyclic_gc():
    """The cyclic garbage collector stays off: a cache must go by reference counting alone."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


@pytest.fixture(scope="module", params=TEXT_ARCHS)
def text_model(request):
    return request.param, tiny_model(request.param)


@pytest.mark.parametrize("method", list(zipkv.METHODS))
def test_text_model_contract(text_model, method):
    arch, model = text_model
    ids, mask = padded_batch(length=40, pad=6)
    cache = build(method, model.config)
    tokens = generate(model, cache, ids, mask)
    assert tokens.shape == (2, NEW_TOKENS)
    # generate() runs under no_grad: one more step with grad enabled, as a user's own loop would
    step_mask = torch.cat([mask, torch.ones(2, NEW_TOKENS, dtype=mask.dtype)], dim=1)  # prompt + generated
    model(tokens[:, -1:], attention_mask=step_mask, **cache_kwargs(cache))
    stats = cache.stats()
    assert stats.bytes_held == held_bytes(cache)
    full_layers = sum(kind == "full_attention" for kind in getattr(model.config, "layer_types", None) or ["full_attention"] * 2)
    if zipkv.METHODS[method].family != "lossless" and not (zipkv.METHODS[method].family == "merge" and full_layers < 2):
        # (merging needs a pair of full-attention layers: tiny Gemma 3 has one)
        assert stats.ratio > 1.0, f"{method} on {arch} compressed nothing (ratio {stats.ratio:.2f})"
    ref = check_detached(cache)
    del cache
    assert_freed(ref)
    # the left-padded row alone, without its padding
    alone = generate(model, build(method, model.config), ids[1:, 6:], mask[1:, 6:])
    assert torch.equal(alone[0], tokens[1]), f"{method} on {arch}: the padded row differs from the row alone"


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_lossless_equals_dynamic_cache(arch):
    model = tiny_model(arch)
    ids, mask = padded_batch(length=40, pad=6)
    expected = generate(model, DynamicCache(config=model.config), ids, mask)
    lossless = [name for name, spec in zipkv.METHODS.items() if spec.family == "lossless"]
    assert lossless
    for name in lossless:
        assert torch.equal(generate(model, build(name, model.config), ids, mask), expected), name


STATIC = [name for name, spec in zipkv.METHODS.items() if spec.static]


@pytest.mark.parametrize("arch", TEXT_ARCHS)
@pytest.mark.parametrize("method", STATIC)
def test_static_form_equals_eager_form(arch, method):
    model = tiny_model(arch)
    ids, mask = padded_batch(length=40, pad=6)
    spec = zipkv.METHODS[method]
    params = contract_params(spec)
    if "decode_path" in spec.params:  # the eager form reads the packed tiers as the static one does
        params["decode_path"] = "packed"
    with torch.no_grad():  # greedy_decode continues past EOS like generate() does in a batch
        expected = generate(model, spec.build(model.config, **params), ids, mask, min_new_tokens=0)
    cache = spec.build(model.config, **params)
    # (Gemma 3's sliding layer: a packed ring for the quantizing methods, transformers' exact
    # window layer as an fp16 ring for the others; both mask on the device)
    tokens = zipkv.greedy_decode(model, cache, ids, mask, max_new_tokens=NEW_TOKENS, cuda_graph=False)
    assert cache.is_static
    assert torch.equal(tokens, expected), f"{method} on {arch}: static and eager forms disagree"
    assert cache.stats().bytes_held == held_bytes(cache)


@pytest.fixture(scope="module", params=VLM_ARCHS)
def vlm(request):
    pytest.importorskip("PIL")
    from zipkv.vlm.tiny import image_prompts, tiny_vlm

    return request.param, tiny_vlm(request.param), image_prompts(request.param)


@pytest.mark.parametrize("method", list(zipkv.METHODS))
def test_vlm_contract(vlm, method):
    from zipkv.vlm.tiny import greedy

    arch, model, inputs = vlm
    cache = build(method, model.config)
    out = greedy(model, inputs, cache, NEW_TOKENS)
    assert out.shape == (2, inputs["input_ids"].shape[1] + NEW_TOKENS)
    assert cache.stats().bytes_held == held_bytes(cache)
    ref = check_detached(cache)
    del cache
    assert_freed(ref)


def test_unsupported_attention_arguments_raise_naming_them():
    """Gemma 2 soft-caps its attention logits; zipkv's kernels do not: an error, not a
    silently different model."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, attn_implementation="eager",
                          attn_logit_softcapping=50.0, layer_types=["full_attention", "full_attention"])
    model = Gemma2ForCausalLM(config).eval()
    ids, mask = padded_batch(length=20, pad=0, batch=1)
    with pytest.raises(ValueError, match="softcap"):
        generate(model, zipkv.make_cache("zipkv", model.config), ids, mask)


@pytest.mark.parametrize("method", STATIC)
def test_vlm_static_form_equals_eager_form(vlm, method):
    """The registry's methods with a static form, inside a VLM's language model: the prompt
    forward with the images, then StaticDecoder steps, against generate() with the eager cache."""
    from zipkv.decode_positions import uses_mrope
    from zipkv.graph_decode import StaticDecoder, prompt_positions

    arch, model, inputs = vlm
    spec = zipkv.METHODS[method]
    params = contract_params(spec)
    if "decode_path" in spec.params:
        params["decode_path"] = "packed"
    with torch.no_grad():
        out = model.generate(**inputs, **cache_kwargs(spec.build(model.config, **params)), max_new_tokens=NEW_TOKENS,
                             do_sample=False)
    expected = out[:, inputs["input_ids"].shape[1]:]
    cache = spec.build(model.config, **params)
    positions = None if uses_mrope(model) else prompt_positions(inputs["attention_mask"])
    with torch.inference_mode():
        first = model(**inputs, position_ids=positions, **cache_kwargs(cache), use_cache=True).logits[:, -1:].argmax(-1)
    held = cache.get_seq_length()
    decoder = StaticDecoder(model, cache, first, prompt_positions(inputs["attention_mask"])[:, -1] + 1, NEW_TOKENS - 1,
                            inputs["attention_mask"], cuda_graph=False)
    assert cache.get_seq_length() == held  # the static form keeps every token
    tokens = torch.cat([first] + [decoder.step().clone() for _ in range(NEW_TOKENS - 1)], dim=1)
    assert torch.equal(tokens, expected), f"{method} on {arch}: static and eager forms disagree"
    assert cache.stats().bytes_held == held_bytes(cache)
