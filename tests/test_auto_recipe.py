"""The automatic recipe (`auto`: zipkv/cache/auto_recipe.py, recipe_choice.py): per-layer bits
and rotation chosen from the prompt under a byte target.

The byte target is met by the measured stats().ratio; a layer with outlier channels (in its
keys, where its queries look) gets more bits than a plain one; the greedy choice keeps its
budget and takes the least-error options when everything fits; bad targets name the parameter.
"""

import pytest
import torch
from held_tensors import held_bytes
from tiny_models import generate_new_tokens, padded_batch, tiny_model

import zipkv
from zipkv.cache.recipe_choice import Candidate, Measured, calibrate, candidates, choose_per_layer

HEAD64 = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)  # head_dim 64


def prompt(model, cache, length=160, pad=0, batch=1):
    ids, mask = padded_batch(length=length, pad=pad, batch=batch)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache)
    return cache


@pytest.mark.parametrize("target", [dict(ratio=3.0), dict(ratio=5.0), dict(bits=3.5)])
def test_measured_ratio_meets_the_target(target):
    model = tiny_model("llama", **HEAD64)
    cache = prompt(model, zipkv.make_cache("auto", model.config, residual_length=8, stream_interval=8, **target))
    stats = cache.stats()
    wanted = target.get("ratio") or 16 / target["bits"]
    assert stats.ratio >= wanted, cache.recipe()
    assert stats.bytes_held == held_bytes(cache)
    rows = cache.recipe()["layers"]
    assert [r["layer"] for r in rows] == [0, 1] and cache.recipe()["target_ratio"] == pytest.approx(wanted)
    # the choice spends what the target allows: a looser target never costs more error
    if target == dict(ratio=3.0):
        tight = prompt(model, zipkv.make_cache("auto", model.config, residual_length=8, stream_interval=8, ratio=5.0))
        assert sum(r["error"] for r in rows) <= sum(r["error"] for r in tight.recipe()["layers"])
        assert stats.bytes_held > tight.stats().bytes_held


def test_generation_keeps_the_choice_and_static_equals_eager():
    model = tiny_model("llama", **HEAD64)
    ids, mask = padded_batch(length=120, pad=5)
    params = dict(ratio=4.0, residual_length=4, stream_interval=8, decode_path="packed")
    eager = zipkv.make_cache("auto", model.config, **params)
    tokens = generate_new_tokens(model, eager, ids, mask, 12)
    static = zipkv.make_cache("auto", model.config, **params)
    with torch.no_grad():
        assert torch.equal(zipkv.greedy_decode(model, static, ids, mask, max_new_tokens=12, cuda_graph=False), tokens)
    assert static.recipe() == eager.recipe()
    seen = set()  # the layers' tensors (the cache's own step counter is not KV storage)
    assert static.stats().bytes_held == sum(held_bytes(layer, seen) for layer in static.layers)


def outlier_layer(model, layer: int, channels=(0, 1, 32, 33), key_scale=8.0, query_scale=3.0):
    """Outlier key channels where the queries look too (both RoPE halves of each channel pair)."""
    attn = model.model.layers[layer].self_attn
    d = model.config.head_dim if getattr(model.config, "head_dim", None) else 64
    with torch.no_grad():
        for head in range(model.config.num_key_value_heads):
            attn.k_proj.weight[[head * d + c for c in channels]] *= key_scale
        for head in range(model.config.num_attention_heads):
            attn.q_proj.weight[[head * d + c for c in channels]] *= query_scale


def bits_of(row) -> int:
    return row["key_bits"] + row["value_bits"]


@pytest.mark.parametrize("outliers_in", [0, 1])
def test_the_layer_with_outlier_channels_gets_more_bits(outliers_in):
    model = tiny_model("llama", **HEAD64)
    outlier_layer(model, outliers_in)
    # a target between "every layer at its cheapest" and "every layer upgraded" (the waiting
    # tokens counted: 3.5x on this 160-token prompt), so the budget decides who gets the bits
    rows = prompt(model, zipkv.make_cache("auto", model.config, ratio=3.5, stream_interval=8))
    rows = rows.recipe()["layers"]
    assert bits_of(rows[outliers_in]) > bits_of(rows[1 - outliers_in]), rows


def test_calibration_measures_real_bytes_and_more_bits_err_less():
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 2, 96, 64, generator=g), torch.randn(1, 2, 96, 64, generator=g)
    query = torch.randn(1, 4, 16, 64, generator=g)
    settings = zipkv.CompressionConfig()
    table = calibrate(query, keys.half(), values.half(), torch.ones(1, 96, dtype=torch.bool), 80, 0.125, settings, 0,
                      candidates(64))
    by = {m.candidate: m for m in table}
    assert len(table) == 18  # 3 x 3 bit pairs, unrotated and rotated
    assert by[Candidate(8, 8)].error < by[Candidate(4, 4)].error < by[Candidate(2, 2)].error
    assert by[Candidate(2, 2, "hadamard")].nbytes == by[Candidate(2, 2)].nbytes + 2 * 64 * 2  # + the signs
    assert len(candidates(80)) == 9  # no rotation for a head_dim that is not a power of two


def test_greedy_choice_keeps_the_budget():
    def table(errors):
        return [Measured(Candidate(b, b), nbytes, e) for (b, nbytes), e in zip(((2, 100), (4, 180), (8, 340)), errors)]

    tables = [table((0.5, 0.1, 0.01)), table((0.2, 0.15, 0.1))]
    assert [m.candidate.key_bits for m in choose_per_layer(tables, 10)] == [2, 2]  # nothing fits: the cheapest
    assert [m.candidate.key_bits for m in choose_per_layer(tables, 680)] == [8, 8]  # everything fits
    chosen = choose_per_layer(tables, 300)  # one upgrade: where it removes the most error per byte
    assert [m.candidate.key_bits for m in chosen] == [4, 2] and sum(m.nbytes for m in chosen) <= 300
    # a dominated option (more bytes, more error) is never taken
    worse = tables[1] + [Measured(Candidate(4, 2), 150, 0.3)]
    assert all(m.candidate != Candidate(4, 2) for m in choose_per_layer([tables[0], worse], 1000))


@pytest.mark.parametrize("params,param", [
    (dict(ratio=5.0, bits=3), "ratio"), (dict(ratio=0.5), "ratio"), (dict(bits=20), "bits"),
    (dict(window=0), "window"), (dict(residual_length=-1), "residual_length"),
])
def test_bad_targets_name_the_parameter(params, param):
    with pytest.raises(ValueError, match=param) as error:
        zipkv.registry.check_method("auto", params)
    assert error.value.param == param
    with pytest.raises(ValueError, match="high_bits"):
        zipkv.registry.check_method("auto", dict(high_bits=4))


def test_reset_calibrates_again():
    model = tiny_model("llama", **HEAD64)
    cache = prompt(model, zipkv.make_cache("auto", model.config, ratio=4.0))
    first = cache.recipe()
    cache.reset()
    assert cache.recipe()["layers"] == [None, None]
    assert prompt(model, cache).recipe() == first


@pytest.mark.parametrize("ratio", [3.0, 4.0])
def test_the_target_holds_while_decoding_with_the_waiting_tokens(ratio):
    """After the prompt and at every decoding step (up to stream_interval tokens waiting
    unquantized, then a block quantized), stats().ratio stays >= the target."""
    model = tiny_model("llama", **HEAD64)
    ids, mask = padded_batch(length=160)
    cache = zipkv.make_cache("auto", model.config, ratio=ratio, stream_interval=16)
    ratios = []
    with torch.no_grad():
        out = model(ids, attention_mask=mask, past_key_values=cache)
        ratios.append(cache.stats().ratio)
        for _ in range(20):  # past one block of 16
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = model(out.logits[:, -1:].argmax(-1), attention_mask=mask, past_key_values=cache)
            ratios.append(cache.stats().ratio)
    assert min(ratios) >= ratio, (ratios, cache.recipe())
