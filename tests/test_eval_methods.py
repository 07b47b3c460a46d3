"""Method specs and honest byte accounting for the baselines."""
import importlib.util

import pytest
import torch
import transformers.cache_utils
from transformers import DynamicCache, LlamaConfig, QuantizedCache

from zipkv.eval.methods import MethodSpec, MethodUnavailable, resolve
from zipkv.eval.methods.accounting import fp16_bytes_of, measured_stats, tensor_bytes
from zipkv.eval.methods.hf_quantized import HFQuantizedMethod
from zipkv.eval.methods.reference import DynamicCacheMethod
from zipkv.eval.methods.zipkv_methods import ZipkvMethod

FP8_BACKEND = hasattr(transformers.cache_utils, "Fp8QuantizedLayer")  # transformers >= 5.21
CONFIG = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                     intermediate_size=128, vocab_size=100)  # head dim 16


def test_spec_parsing_types_and_canonical_label():
    spec = MethodSpec.parse("zipcache:salient_ratio=0.6,high_bits=4,low_bits=2,probe=recent,fused=true")
    assert spec.name == "zipcache"
    assert spec.params == {"salient_ratio": 0.6, "high_bits": 4, "low_bits": 2, "probe": "recent", "fused": True}
    assert spec.label == "zipcache:fused=True,high_bits=4,low_bits=2,probe=recent,salient_ratio=0.6"
    assert MethodSpec.parse("zipcache:low_bits=2,high_bits=4").label == MethodSpec.parse("zipcache:high_bits=4,low_bits=2").label
    assert MethodSpec.parse("full").label == "full"
    for bad in ("", "9bits", "kivi:bits", "kivi:=2"):
        with pytest.raises(ValueError, match="method"):
            MethodSpec.parse(bad)


def test_resolve_routes_names():
    assert isinstance(resolve("hf-dynamic"), DynamicCacheMethod)
    if FP8_BACKEND:
        assert isinstance(resolve("hf-fp8"), HFQuantizedMethod)
    assert isinstance(resolve("zipcache:high_bits=4"), ZipkvMethod)
    with pytest.raises(ValueError, match="no parameters"):
        resolve("hf-dynamic:x=1")


def test_kvpress_without_kvpress_is_unavailable_not_a_crash():
    if importlib.util.find_spec("kvpress") is not None:
        pytest.skip("kvpress installed")
    with pytest.raises(MethodUnavailable, match="transformers < 5.3"):
        resolve("kvpress-snapkv:compression_ratio=0.5")


def _fill(cache, tokens, layers=2, dtype=torch.float32):
    torch.manual_seed(0)
    for layer in range(layers):
        k = torch.randn(1, 2, tokens, 16, dtype=dtype)
        cache.update(k, torch.randn_like(k), layer)


def test_dynamic_cache_bytes_are_its_tensors_and_fp16_bytes_the_formula():
    cache = DynamicCache(config=CONFIG)
    _fill(cache, 10)
    stats = measured_stats(cache, CONFIG, tokens_seen=10)
    assert stats["bytes_held"] == 2 * 2 * (1 * 2 * 10 * 16) * 4  # layers, K+V, elements, float32
    assert stats["fp16_bytes"] == 2 * 2 * (1 * 2 * 10 * 16) * 2
    assert stats["ratio"] == pytest.approx(0.5)


def test_fp16_bytes_count_sliding_window_layers_at_their_window():
    class Layer:
        def __init__(self, window):
            self.sliding_window = window

    class Cache:
        layers = [Layer(None), Layer(8)]

    per_token = 2 * 2 * 16 * 2  # K+V, kv heads, head dim, fp16
    assert fp16_bytes_of(Cache(), CONFIG, tokens_seen=100) == per_token * (100 + 8)


def test_tensor_bytes_recurses_into_tuples_and_dicts_once_each():
    t = torch.zeros(10, dtype=torch.float16)
    assert tensor_bytes((t, {"scale": torch.zeros(3), "again": t})) == 20 + 12


def test_hf_fp8_without_the_backend_is_unavailable_naming_the_version(monkeypatch):
    """transformers < 5.21 has no fp8 QuantizedCache backend: resolving hf-fp8 says so."""
    from transformers import cache_utils

    monkeypatch.delattr(cache_utils, "Fp8QuantizedLayer", raising=False)
    with pytest.raises(MethodUnavailable, match=r"hf-fp8 needs transformers >= 5\.21 .*installed: 5\."):
        resolve("hf-fp8")


@pytest.mark.skipif(not FP8_BACKEND, reason="transformers < 5.21: QuantizedCache has no fp8 backend")
def test_hf_fp8_cache_holds_one_byte_per_element_plus_scales():
    cache = QuantizedCache("fp8", CONFIG)
    _fill(cache, 20)
    stats = measured_stats(cache, CONFIG, tokens_seen=20)
    elements = 2 * 2 * (2 * 20 * 16)  # layers, K+V, elements
    assert elements <= stats["bytes_held"] <= elements + 2 * 2 * 16  # plus a few scale scalars
    assert stats["ratio"] == pytest.approx(2.0, rel=0.01)


@pytest.mark.skipif(importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None,
                    reason="optimum-quanto not installed")
@pytest.mark.parametrize("bits", [2, 4])
def test_hf_quanto_bytes_count_packed_codes_scales_and_residual(bits):
    cache = QuantizedCache("quanto", CONFIG, nbits=bits, q_group_size=16, residual_length=4)
    _fill(cache, 64)  # first update quantizes all 64 tokens at once
    stats = measured_stats(cache, CONFIG, tokens_seen=64)
    elements = 2 * 64 * 16  # one tensor
    groups = elements // 16
    per_tensor = elements * bits // 8 + 2 * groups * 4  # packed codes + float32 scale and shift per group
    assert stats["bytes_held"] == 2 * 2 * per_tensor
    # one more token lands in the fp16 residual, in the model dtype
    for layer in range(2):
        k = torch.randn(1, 2, 1, 16)
        cache.update(k, k.clone(), layer)
    assert measured_stats(cache, CONFIG, 65)["bytes_held"] == 2 * 2 * (per_tensor + 2 * 16 * 4)


def test_hqq_missing_is_unavailable():
    if importlib.util.find_spec("hqq") is not None:
        pytest.skip("hqq installed")
    with pytest.raises(MethodUnavailable, match="pip install hqq"):
        resolve("hf-hqq:nbits=4")
