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
from tiny_models import generate_new_tokens, padded_batch, tiny_model

import zipkv
from zipkv import cache_kwargs

NEW = 16
METHODS = ["adakv", "zipvl", "zipvl_v2", "three_tier", "mikv"]
TIERED = METHODS[1:]


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


def _generate(model, method, ids, mask):
    """model.generate's new tokens with the method's eager cache, and that cache."""
    eager = _cache(model, method)
    return generate_new_tokens(model, eager, ids, mask, NEW), eager


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("method", METHODS)
def test_static_decode_equals_generate_with_the_eager_cache(arch, method):
    model = tiny_model(arch)
    ids, mask = padded_batch(length=40, pad=6)
    expected, eager = _generate(model, method, ids, mask)
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


def _eager_parts(layer):
    """Per part (and the recent tokens): each (row, head)'s held keys of an eager tiered layer,
    as sorted projections."""
    out = []
    for part in layer.parts:
        k, _, ok = part.padded(torch.float32)
        out.append(_sorted_sets(k, ok))
    out.append(_sorted_sets(layer.recent_keys.float(), layer.recent_real[:, None, :].expand(-1, layer.num_heads, -1)))
    return out


def _static_parts(layer):
    out = []
    for part in layer.parts:
        if part.bits == 16:
            n, start = part.filled, part.offset
            k = layer.k_buf[:, :, :n].float()
        else:
            n, start = part.tier.num_tokens, part.offset
            k = part.tier.dequantize(torch.float32)[0]
        out.append(_sorted_sets(k, layer.pad_mask[:, None, start:start + n].expand(-1, layer.num_heads, -1)))
    c, n = layer.fp16_slots, layer.n_win
    out.append(_sorted_sets(layer.k_buf[:, :, c:c + n].float(),
                            layer.real_win[:, None, :n].expand(-1, layer.num_heads, -1)))
    return out


def _sorted_sets(keys, valid):
    projection = torch.linspace(-1, 1, keys.shape[-1])
    return [[(keys[b, h][valid[b, h]] @ projection).sort().values for h in range(keys.shape[1])]
            for b in range(keys.shape[0])]


@pytest.mark.parametrize("method,settings", [
    ("zipvl", dict(key_group_size=4)),  # several key groups per block: rows aligned group by group
    ("three_tier", dict(key_group_size=3, channel_separable=False)),
    ("mikv", dict(ratio=0.5, key_group_size=5, value_group_size=8)),
])
def test_tiers_hold_what_the_eager_tiers_hold(method, settings):
    """After the same steps every part holds the same (token, head) pairs as the eager layer's
    (blocks split between replays by the eager policy's own code), with key groups finer than a
    block and rows of different counts aligned in one buffer."""
    model = tiny_model("llama")
    ids, mask = padded_batch(length=40, pad=6)
    params = dict(stream_interval=8, **settings)
    eager = zipkv.make_cache(method, model.config, **params)
    with torch.no_grad():  # generate() attends max_new_tokens - 1 new tokens, like greedy_decode
        expected = model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(eager), max_new_tokens=21,
                                  do_sample=False, eos_token_id=None)[:, ids.shape[1]:]
    cache = zipkv.make_cache(method, model.config, **params)
    tokens = zipkv.greedy_decode(model, cache, ids, mask, max_new_tokens=21, cuda_graph=False, eos_token_id=False)
    assert torch.equal(tokens, expected)
    for static_layer, eager_layer in zip(cache.layers, eager.layers):
        assert eager_layer.recent_keys.shape[2] == static_layer.n_win == 4  # 20 attended = 2 blocks + 4
        for got_part, want_part in zip(_static_parts(static_layer), _eager_parts(eager_layer)):
            for got_row, want_row in zip(got_part, want_part):
                for got, want in zip(got_row, want_row):
                    # the decoded tokens' keys differ in the last bits (the eager step attends its
                    # new token unrounded); a different token would differ by far more
                    assert got.shape == want.shape and torch.allclose(got, want, atol=2e-3, rtol=0)
    assert cache.stats().kept_token_heads_per_layer == eager.stats().kept_token_heads_per_layer
    assert cache.stats().bytes_held == held_bytes(cache)


def test_a_padded_row_equals_the_same_row_alone():
    """Rows aligned in one buffer (holes masked) decode as each would alone."""
    model = tiny_model("llama")
    ids, mask = padded_batch(length=40, pad=6)
    for method in ("zipvl", "mikv"):
        tokens = [zipkv.greedy_decode(model, _cache(model, method), *inputs, max_new_tokens=NEW, cuda_graph=False,
                                      eos_token_id=False) for inputs in ((ids, mask), (ids[1:, 6:], None))]
        assert torch.equal(tokens[0][1:], tokens[1]), method


def test_aligned_layout_gives_every_row_its_own_slots_under_shared_indices():
    """Rows of different chunk / group structure: each token gets one slot, no two tokens of a
    row share one, and the shared token_group / token_chunk index names that row's group and
    chunk: the same aligned index for the same source group / chunk."""
    from zipkv.cache.static_aligned_parts import aligned_layout

    rows = [
        [[(0, 0, 3), (1, 3, 4)], [(2, 7, 5)]],  # two chunks: groups of 3 + 4, then 5
        [[(0, 0, 4)]],  # one chunk, one group
        [],  # a row that keeps nothing
        [[(0, 0, 1), (1, 1, 4), (2, 5, 4)], [(3, 9, 2), (4, 11, 4)], [(5, 15, 4)]],
    ]
    placements, token_group, token_chunk, chunks = aligned_layout(rows)
    assert chunks == 3 and len(token_group) == len(token_chunk)
    for row, places in zip(rows, placements):
        tokens = sum(n for chunk in row for _, _, n in chunk)
        assert sum(n for _, n, *_ in places) == tokens
        used = [slot for _, n, dst, *_ in places for slot in range(dst, dst + n)]
        assert len(set(used)) == len(used) and max(used, default=0) < len(token_group)
        seen_groups, seen_chunks = {}, {}
        for _, n, dst, group, src_group, chunk, src_chunk in places:
            assert set(token_group[dst:dst + n]) == {group} and set(token_chunk[dst:dst + n]) == {chunk}
            assert seen_groups.setdefault(src_group, group) == group
            assert seen_chunks.setdefault(src_chunk, chunk) == chunk
        assert len(set(seen_groups.values())) == len(seen_groups)  # distinct groups, distinct indices


needs_gpu = pytest.mark.gpu  # conftest: skipped without a CUDA device (sm80+) or under TRITON_INTERPRET=1


@needs_gpu
@pytest.mark.parametrize("method", METHODS)
def test_cuda_graph_decode_equals_the_eager_static_path(method):
    """The captured graph (the Triton kernel: per-head masks for adakv, the log-sum-exp for the
    tiered window scores) replays what the same static step computes uncaptured, and agrees
    with model.generate on the eager cache."""
    pytest.importorskip("triton")
    model = tiny_model("llama", hidden_size=256).cuda()  # head_dim 64: 2-bit key rows wide enough
    ids, mask = (t.cuda() for t in padded_batch(length=40, pad=6))
    expected, _ = _generate(model, method, ids, mask)
    caches = {graph: _cache(model, method) for graph in (True, False)}
    tokens = {graph: zipkv.greedy_decode(model, cache, ids, mask, max_new_tokens=NEW, cuda_graph=graph)
              for graph, cache in caches.items()}
    assert torch.equal(tokens[True], tokens[False])
    # the kernel reads fp16 queries and keys where generate()'s SDPA reads float32: the first
    # tokens, before a near tie can send the two on different paths
    assert torch.equal(tokens[True][:, :4], expected[:, :4])
    assert all(cache.stats().bytes_held == held_bytes(cache) for cache in caches.values())
