"""The baselines `full`, `fp8`, `int4` (cache/baseline_cache.py) and their static form
(cache/static_flash_layer.py): tokens, bytes, padding, protocols, errors, on tiny models."""

import pytest
import torch
from held_tensors import held_bytes
from tiny_models import padded_batch, tiny_model
from transformers import DynamicCache

import zipkv
from zipkv import cache_kwargs
from zipkv.cache import static_flash_layer
from zipkv.cache.baseline_cache import TokenQuantCache
from zipkv.cache.protocol import StaticStore, TierStore
from zipkv.cache.static_flash_layer import StaticFlashLayer
from zipkv.cache.token_head_tier import TokenHeadBuffers, TokenHeadTier
from zipkv.graph_decode import prompt_positions

NEW = 8
PAD = 6


def eager_tokens(model, cache, ids, mask):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=NEW,
                             do_sample=False)
    return out[:, ids.shape[1]:]


def prefilled(method, model, ids, mask):
    cache = zipkv.make_cache(method, model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=prompt_positions(mask), **cache_kwargs(cache))
    return cache


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_full_static_form_equals_dynamic_cache(arch):
    model = tiny_model(arch)
    ids, mask = padded_batch(length=40, pad=PAD)
    expected = eager_tokens(model, DynamicCache(config=model.config), ids, mask)
    cache = zipkv.make_cache("full", model.config)
    tokens = zipkv.greedy_decode(model, cache, ids, mask, max_new_tokens=NEW, cuda_graph=False)
    assert cache.is_static and all(isinstance(layer, StaticFlashLayer) for layer in cache.layers)
    assert torch.equal(tokens, expected)
    model.set_attn_implementation("sdpa")  # to_static switched it to zipkv attention


@pytest.mark.parametrize("method", ["fp8", "int4", "full"])
def test_static_form_through_the_kernel_equals_the_eager_form(method, monkeypatch):
    """greedy_decode with the flash kernel itself (Triton interpreter; head_dim 32) gives the
    eager form's tokens (the eager form attends to the dequantized cache with SDPA)."""
    from zipkv.kernels._runtime import enable_interpreter, interpreter_enabled, triton_installed

    if not triton_installed() or (torch.cuda.is_available() and not interpreter_enabled()):
        pytest.skip("Triton interpreter test: needs triton, and TRITON_INTERPRET=1 on CUDA")
    enable_interpreter()
    monkeypatch.setattr(static_flash_layer, "FLASH_IMPL", "triton")
    model = tiny_model("llama", hidden_size=128)  # 4 heads of 32, 2 KV heads
    ids, mask = padded_batch(length=24, pad=PAD)
    expected = eager_tokens(model, zipkv.make_cache(method, model.config), ids, mask)
    cache = zipkv.make_cache(method, model.config)
    tokens = zipkv.greedy_decode(model, cache, ids, mask, max_new_tokens=NEW, cuda_graph=False)
    assert torch.equal(tokens, expected), method
    model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("method,per_token_head", [("fp8", lambda d: 2 * (d + 4)), ("int4", lambda d: 2 * (d // 2 + 4))])
def test_bytes_held_are_the_codes_and_their_scales(method, per_token_head):
    model = tiny_model("llama")
    ids, mask = padded_batch(length=40, pad=PAD)
    cache = prefilled(method, model, ids, mask)
    assert model.config._attn_implementation == "sdpa"  # the eager form needs no zipkv attention
    b, h, d, layers = 2, 2, 16, 2
    stats = cache.stats()
    assert stats.bytes_held == held_bytes(cache) == layers * b * h * 40 * per_token_head(d)
    assert stats.fp16_bytes == layers * b * h * 40 * 2 * d * 2
    cache.to_static(5, mask)
    assert model.config._attn_implementation == "zipkv"
    capacity = 40 + 5  # the longest row (no padding) + the steps asked for
    layer_bytes = b * h * capacity * per_token_head(d) + 4 * b + 1  # + int32 lengths, the NaN/inf flag
    stats = cache.stats()
    assert stats.bytes_per_layer == [held_bytes(layer) for layer in cache.layers] == [layer_bytes] * layers
    assert stats.tokens_per_layer == [40, 40]
    model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("method", ["fp8", "int4", "full"])
def test_static_rows_start_with_their_real_tokens(method):
    model = tiny_model("llama")
    ids, mask = padded_batch(length=40, pad=PAD)
    cache = prefilled(method, model, ids, mask)
    layer = cache.layers[0]
    eager = layer.tier.dequantize(torch.float32) if method != "full" else (layer.keys, layer.values)
    cache.to_static(3, mask)
    store = cache.layers[0].store
    assert store.lengths.tolist() == [40, 40 - PAD] and store.capacity == 43
    keys, _ = store.dequantize(torch.float32)
    assert torch.equal(keys[0], eager[0][0]) and torch.equal(keys[1, :, :40 - PAD], eager[0][1, :, PAD:])
    assert torch.equal(keys[1, :, 40 - PAD:], torch.zeros_like(keys[1, :, 40 - PAD:]))  # past its count
    model.set_attn_implementation("sdpa")


def test_stores_keep_their_protocols():
    g = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(2, 3, 12, 32, generator=g) for _ in range(2))
    for form in ("fp8", "int4"):
        tier = TokenHeadTier(form)
        assert isinstance(tier, TierStore)
        tier.append(keys[:, :, :5], values[:, :, :5])
        tier.append(keys[:, :, 5:], values[:, :, 5:])
        assert tier.num_tokens == 12 and tier.nbytes() == sum(t.numel() * t.element_size() for t in tier.tensors())
        whole = TokenHeadTier(form)
        whole.append(keys, values)  # per token: appending in pieces quantizes the same
        assert all(torch.equal(a, b) for a, b in zip(tier.dequantize(torch.float32), whole.dequantize(torch.float32)))
        static = TokenHeadBuffers(tier.segment(), torch.tensor([0, 4]), extra_tokens=2)
        assert isinstance(static, StaticStore) and static.capacity == 14
        static.append(keys[:, :, :1], values[:, :, :1])  # row 0 at slot 12, row 1 at slot 8
        assert static.lengths.tolist() == [13, 9]
        k, _ = static.segment().dequantize(torch.float32)
        one = TokenHeadTier(form)
        one.append(keys[:, :, :1], values[:, :, :1])
        assert torch.equal(k[0, :, 12], one.dequantize(torch.float32)[0][0, :, 0])
        assert torch.equal(k[1, :, 8], one.dequantize(torch.float32)[0][1, :, 0])
        tier.select_batch(torch.tensor([1]))
        assert torch.equal(tier.dequantize(torch.float32)[0], whole.dequantize(torch.float32)[0][1:])


def test_static_buffers_refuse_a_step_past_their_capacity():
    model = tiny_model("llama")
    ids, mask = padded_batch(length=10, pad=0)
    cache = prefilled("int4", model, ids, mask)
    cache.to_static(1)
    layer = cache.layers[0]
    assert layer.has_room()
    layer.store.append(*(torch.zeros(2, 2, 1, 16) for _ in range(2)))
    layer.store.advance()
    assert not layer.has_room()
    with pytest.raises(RuntimeError, match="full"):
        layer.store.append(*(torch.zeros(2, 2, 1, 16) for _ in range(2)))
    model.set_attn_implementation("sdpa")


def test_bad_input_raises_naming_it():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="form"):
        TokenQuantCache(model.config, "int8")
    cache = zipkv.make_cache("fp8", model.config)
    states = torch.randn(1, 2, 3, 16)
    states[0, 1, 2, 5] = float("nan")
    with pytest.raises(ValueError, match="key_states of layer 0 contain NaN"):
        cache.update(states, torch.randn(1, 2, 3, 16), 0)
    with pytest.raises(ValueError, match="does not take"):
        zipkv.make_cache("int4", model.config, bits=2)
    with pytest.raises(ValueError, match="to_static"):
        zipkv.make_cache("fp8", model.config).to_static(4)  # holds no prompt
