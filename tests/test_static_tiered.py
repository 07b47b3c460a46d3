"""Static (CUDA-graph) forms of AdaKV (per-head budgets: a per-head mask) and of the tiered
methods (ZipVL v1 / v2, three_tier, MiKV: packed parts in static tiers, new tokens in a window
that the eager TieredPolicy splits between replays).

On the CPU the static path runs eagerly (same buffers, device-side counts, the decode
attention reference over them); greedy_decode there must give model.generate's tokens with
the same method's eager cache, and stats() must count exactly what the cache holds.
"""

import pytest
import torch
from held_tensors import held_bytes
from tiny_models import padded_batch, tiny_model

import zipkv

NEW = 16
METHODS = ["adakv"]


def params_of(method: str) -> dict:
    """ratio=0.5 where the method takes one, stream_interval=8 where it takes one (blocks are
    split while decoding 16 tokens), an observation window that fits a 40-token prompt."""
    spec = zipkv.METHODS[method]
    params = {"ratio": 0.5} if spec.takes_budget else {}
    for name, value in dict(stream_interval=8, window=8).items():
        if name in spec.params:
            params[name] = value
    return params


def _cache(model, method):
    return zipkv.make_cache(method, model.config, **params_of(method))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("method", METHODS)
def test_static_decode_equals_generate_with_the_eager_cache(arch, method):
    model = tiny_model(arch)
    ids, mask = padded_batch(length=40, pad=6)
    eager = _cache(model, method)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, past_key_values=eager, max_new_tokens=NEW,
                                  do_sample=False)[:, ids.shape[1]:]
    cache = _cache(model, method)
    tokens = zipkv.greedy_decode(model, cache, ids, mask, max_new_tokens=NEW, cuda_graph=False)
    assert cache.is_static
    assert torch.equal(tokens, expected), f"{method} on {arch}"
    stats = cache.stats()
    assert stats.bytes_held == held_bytes(cache) > 0
    # the same (token, head) pairs held as the eager cache after the same steps (generate()
    # feeds its last token but does not attend it: one token fewer there)
    assert cache.get_seq_length() == eager.get_seq_length()


def test_adakv_heads_keep_different_counts_behind_a_per_head_mask():
    model = tiny_model("llama")
    ids, mask = padded_batch(length=40, pad=6)
    cache = _cache(model, "adakv")
    zipkv.greedy_decode(model, cache, ids, mask, max_new_tokens=4, cuda_graph=False)
    layer = cache.layers[0]
    assert layer.pad_mask.dim() == 3  # [B, H, N]
    held = layer.held_slots().sum(-1)  # per (row, head)
    assert not bool((held == held[:, :1]).all())
