"""ZipkvCache (zipkv/cache/base.py): the one base of every zipkv cache, its to_static() (every
layer checked before any moves) and stats() (one per-layer report)."""

import pytest
import torch
from tiny_models import tiny_model

import zipkv
from zipkv.cache.base import ZipkvCache
from zipkv.cache.layer import ZipCacheLayer
from zipkv.cache.layer_base import ZipkvLayer
from zipkv.cache.stats import fp16_equivalent
from zipkv.eviction_cache import make_eviction_cache


def _prefill(model, cache, length=20):
    ids = torch.randint(0, model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids, **zipkv.cache_kwargs(cache))
    return cache


@pytest.mark.parametrize("build", [
    lambda config: zipkv.make_cache("kivi", config),
    lambda config: make_eviction_cache("h2o", config, budget=8),
    lambda config: zipkv.MiniCache(config),
])
def test_every_cache_is_a_zipkv_cache_owning_its_layers(build):
    model = tiny_model("gemma3")  # sliding and full layers
    cache = _prefill(model, build(model.config))
    assert isinstance(cache, ZipkvCache)
    zipkv_layers = [layer for layer in cache.layers if isinstance(layer, ZipkvLayer)]
    assert zipkv_layers and all(layer.owner is cache for layer in zipkv_layers)
    model.set_attn_implementation("sdpa")


def test_a_refused_layer_leaves_every_layer_as_it_was():
    """The last layer cannot move (it holds no prompt): the refusal comes before any layer
    moved, so the cache is the eager one it was; with the layer back, it moves."""
    model = tiny_model("llama")
    cache = _prefill(model, zipkv.make_cache("kivi", model.config))
    before = list(cache.layers)
    held = cache.stats().to_dict()
    last = len(cache.layers) - 1
    cache.layers[last] = ZipCacheLayer(cache.settings, last)
    with pytest.raises(ValueError, match=f"layer {last}: to_static\\(\\) needs a cache that holds the prompt"):
        cache.to_static(4)
    assert all(now is was for now, was in zip(cache.layers[:last], before))
    assert not cache.is_static
    cache.layers[last] = before[last]
    assert cache.stats().to_dict() == held
    cache.to_static(4)
    assert cache.is_static and all(layer.owner is cache for layer in cache.layers)
    assert cache.stats().tokens_per_layer == held["tokens_per_layer"]
    model.set_attn_implementation("sdpa")


def test_minicache_has_no_static_form_and_stays_usable():
    model = tiny_model("llama")
    cache = _prefill(model, zipkv.MiniCache(model.config))
    held = cache.stats().to_dict()
    with pytest.raises(ValueError, match="MiniCache has no static \\(CUDA-graph\\) form: layer .* MiniCacheLayer"):
        cache.to_static(4)
    assert not cache.is_static and cache.stats().to_dict() == held


def test_evicting_layers_report_the_logical_sequence_window_layers_what_they_hold():
    """fp16_bytes: an evicting layer's is that of every token seen (what eviction saved); an
    exact window layer's is that of the tokens it holds (its buffer)."""
    model = tiny_model("gemma3")
    length = 20
    cache = _prefill(model, make_eviction_cache("h2o", model.config, budget=8), length)
    stats = cache.stats()
    kinds = set()
    for i, layer in enumerate(cache.layers):
        kinds.add(hasattr(layer, "kept_token_heads"))
        if hasattr(layer, "kept_token_heads"):
            b, h, d = layer.batch_size, layer.num_heads, layer.head_dim
            assert stats.fp16_bytes_per_layer[i] == fp16_equivalent(length, b, h, d)
            assert stats.tokens_per_layer[i] < length
        else:
            b, h, _, d = layer.keys.shape
            assert stats.tokens_per_layer[i] == layer.keys.shape[2] < length
            assert stats.fp16_bytes_per_layer[i] == fp16_equivalent(layer.keys.shape[2], b, h, d)
    assert kinds == {True, False}  # both kinds of layer were checked
    model.set_attn_implementation("sdpa")
