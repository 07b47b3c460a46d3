"""Every bad input and the error it gets: one table (ERRORS below), each row run as a test, and
docs/ERRORS.md's table checked to agree with it row for row. `python tests/test_errors.py`
prints the docs table from this one.

Inputs that are accepted and must behave (an all-padding row, a cache reused after reset(),
NaN in a lossless cache) have their own tests at the end; docs/ERRORS.md lists them too.
"""

import functools
import os
import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

import zipkv
from zipkv import METHODS, cache_kwargs, make_cache
from zipkv.registry import MethodError

from tiny_models import COMMON, padded_batch, tiny_model

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "ERRORS.md")
# one method of each cache class: lossless and quantizing ZipCache, EvictionCache, MiniCache
FAMILIES = dict(full={}, kivi={}, snapkv=dict(ratio=0.75, window=4, kernel_size=3), minicache={})


@functools.cache
def model():
    return tiny_model("llama")


def states(b=1, heads=2, n=4, dim=16, dtype=torch.float32, device="cpu"):
    return torch.randn(b, heads, n, dim, dtype=dtype, device=device)


def prefill(cache, net=None, length=24):
    net = net or model()
    ids, mask = padded_batch(length, 4)
    with torch.no_grad():
        net(ids, attention_mask=mask, **cache_kwargs(cache), use_cache=True)
    return cache


def each_family(per_cache: Callable, methods=tuple(FAMILIES)) -> Callable:
    """An action on a cache of each of `methods`; the row's test runs the first,
    test_every_cache_class_raises every one on its own."""
    def run():
        per_cache(make_cache(methods[0], model().config, **FAMILIES[methods[0]]))
    run.per_cache, run.methods = per_cache, methods
    return run


def reuse(other: Callable):
    """Fill a cache with the tiny Llama, then run another model on it."""
    def run(cache):
        prefill(cache)
        net = other()
        zipkv.enable_zipkv_attention(net)  # the other model runs zipkv attention too: only the cache is wrong
        with torch.no_grad():
            net(torch.randint(3, 250, (2, 3)), **cache_kwargs(cache), use_cache=True)
    return each_family(run)


def nan_update(cache):
    bad = states()
    bad[0, 1, 2, 3] = float("nan")
    cache.update(bad, states(), 0)


def inf_in_fp16_model():
    net = tiny_model("llama").half()
    with torch.no_grad():
        net.model.layers[0].self_attn.v_proj.weight[0, 0] = float("inf")
    prefill(make_cache("zipcache", net.config), net)


def softcap_model():
    net = Gemma2ForCausalLM(Gemma2Config(**COMMON, head_dim=16, sliding_window=8, attn_logit_softcapping=50.0))
    prefill(make_cache("kivi", net.eval().config), net, length=12)


def missing_attention():
    net = tiny_model("llama")
    cache = make_cache("kivi", net.config.__class__.from_dict(net.config.to_dict()))  # a copy: net is not switched
    prefill(cache, net)


def device_change(cache):
    cache.update(states(b=2), states(b=2), 0)
    cache.update(states(b=2, device="meta"), states(b=2, device="meta"), 0)


@dataclass(frozen=True)
class Row:
    id: str
    bad_input: str
    example: str
    error: type
    message: str  # a regular expression the message must match (re.search)
    action: Callable[[], None]


ERRORS = [
    Row("bits", "a bit width outside {2, 4, 8}", 'make_cache("kivi", cfg, bits=3)', MethodError,
        r"bits must be one of \(2, 4, 8\) \(got 3\)", lambda: make_cache("kivi", model().config, bits=3)),
    Row("ratio_zero", "ratio 0 (nothing kept)", 'make_cache("snapkv", cfg, ratio=0)', MethodError,
        r"ratio=0 is outside the allowed range \(0, 1\]", lambda: make_cache("snapkv", model().config, ratio=0)),
    Row("ratio_above_one", "ratio above 1", 'make_cache("snapkv", cfg, ratio=1.5)', MethodError,
        r"ratio=1.5 is outside the allowed range \(0, 1\]", lambda: make_cache("snapkv", model().config, ratio=1.5)),
    Row("ratio_negative", "negative ratio", 'make_cache("h2o", cfg, ratio=-1)', MethodError,
        r"ratio=-1 is outside the allowed range \(0, 1\]", lambda: make_cache("h2o", model().config, ratio=-1)),
    Row("ratio_below_window", "a ratio keeping fewer tokens than the method always keeps",
        'snapkv ratio=0.5 (window 32) on a 24-token prompt', ValueError,
        r"ratio=0.5 keeps 12 of a 24-token prompt, fewer than the 32 tokens the method always keeps",
        lambda: prefill(make_cache("snapkv", model().config, ratio=0.5))),
    Row("ratio_and_budget", "both budget and ratio", 'make_cache("snapkv", cfg, budget=8, ratio=0.5)', MethodError,
        r"give budget \(tokens per layer\) or ratio \(kept fraction\), not both",
        lambda: make_cache("snapkv", model().config, budget=8, ratio=0.5)),
    Row("budget_for_quantizer", "a budget / ratio for a method without one", 'make_cache("kivi", cfg, ratio=0.5)',
        MethodError, r"kivi does not take \['ratio'\] \(it has no budget / ratio\)",
        lambda: make_cache("kivi", model().config, ratio=0.5)),
    Row("budget_zero", "budget 0", 'make_cache("snapkv", cfg, budget=0)', MethodError,
        r"budget=0 is outside the allowed range \[1, inf\]", lambda: make_cache("snapkv", model().config, budget=0)),
    Row("budget_above_prompt", "a budget larger than the prompt", 'snapkv budget=100 on a 24-token prompt',
        ValueError, r"budget=100 is larger than the prompt \(24 tokens\)",
        lambda: prefill(make_cache("snapkv", model().config, budget=100))),
    Row("value_group_size", "value groups that do not divide the head", 'zipcache value_group_size=5, head_dim 16',
        ValueError, r"value_group_size must divide head_dim 16 \(got 5\)",
        lambda: make_cache("zipcache", model().config, value_group_size=5)),
    Row("unknown_method", "an unknown method", 'make_cache("snap", cfg)', MethodError,
        r"method must be one of \[.*'snapkv'.*\] \(got 'snap'\)", lambda: make_cache("snap", model().config)),
    Row("unknown_parameter", "an unknown parameter", 'make_cache("kivi", cfg, bit=2)', MethodError,
        r"kivi does not take \['bit'\]; it accepts \[.*'bits'.*\]", lambda: make_cache("kivi", model().config, bit=2)),
    Row("softcap", "an attention argument zipkv cannot honour (softcap, s_aux, sinks, position_bias)",
        "a Gemma 2 model (attn_logit_softcapping) with a kivi cache", ValueError,
        r"zipkv caches cannot honour the attention argument\(s\) \['softcap'\]", softcap_model),
    Row("no_zipkv_attention", "a model that does not run zipkv attention",
        "the cache built from a copy of the model's config", RuntimeError, r"zipkv attention never ran for layer 0",
        missing_attention),
    Row("nan_states", "NaN / inf states of an fp32 model (every lossy cache)", "cache.update(keys with a NaN, ...)",
        ValueError, r"key_states of layer 0 contain NaN/inf",
        each_family(nan_update, methods=("kivi", "snapkv"))),
    Row("inf_states_quantized", "NaN / inf states of an fp16 / bf16 model, when quantized",
        "an inf weight in v_proj of an fp16 model, zipcache", ValueError,
        r"cannot quantize values that contain NaN or inf", inf_in_fp16_model),
    Row("empty_update", "an update with no tokens (empty prompt)", "cache.update(keys [1, 2, 0, 16], ...)",
        ValueError, r"layer 0: key_states hold no tokens", each_family(lambda c: c.update(states(n=0), states(n=0), 0))),
    Row("batch_zero", "batch size 0", "cache.update(keys [0, 2, 4, 16], ...)", ValueError,
        r"layer 0: key_states hold no batch rows \(batch size 0\)",
        each_family(lambda c: c.update(states(b=0), states(b=0), 0))),
    Row("dtype_change", "another dtype than the states held (cache of an fp32 model, bf16 model)",
        "prefill in fp32, then a bf16 copy of the model", ValueError,
        r"layer 0 holds states of another model or batch \(dtype torch.float32 -> torch.bfloat16\)",
        reuse(lambda: tiny_model("llama").to(torch.bfloat16))),
    Row("device_change", "another device than the states held", "update on cpu, then on another device", ValueError,
        r"holds states of another model or batch \(device cpu -> meta\)", each_family(device_change)),
    Row("other_model_heads", "a cache reused for a model with other KV heads", "2 KV heads, then 4", ValueError,
        r"holds states of another model or batch \(kv_heads 2 -> 4\)",
        reuse(lambda: tiny_model("llama", num_key_value_heads=4))),
    Row("other_model_head_dim", "a cache reused for a model with another head_dim", "head_dim 16, then 32",
        ValueError, r"holds states of another model or batch \(head_dim 16 -> 32\)",
        reuse(lambda: tiny_model("llama", head_dim=32))),
    Row("other_model_layers", "a cache reused for a model with more layers", "2 decoder layers, then 3", ValueError,
        r"layer_idx=2 is outside this cache's layers \[0, 1\]", reuse(lambda: tiny_model("llama", num_hidden_layers=3))),
    Row("batch_change", "another batch size than the states held", "a prefill of 2 rows, then a step of 3",
        ValueError, r"holds states of another model or batch \(batch_rows 2 -> 3\)",
        each_family(lambda c: [c.update(states(b=2), states(b=2), 0), c.update(states(b=3), states(b=3), 0)])),
]


@pytest.mark.parametrize("row", ERRORS, ids=lambda row: row.id)
def test_bad_input_gets_its_error(row):
    with pytest.raises(row.error, match=row.message):
        row.action()


PER_CACHE = [(row, method) for row in ERRORS if hasattr(row.action, "per_cache") for method in row.action.methods]


@pytest.mark.parametrize("row, method", PER_CACHE, ids=[f"{row.id}-{method}" for row, method in PER_CACHE])
def test_every_cache_class_raises(row, method):
    """A row checked on one cache class above holds for every class it names."""
    with pytest.raises(row.error, match=row.message):
        row.action.per_cache(make_cache(method, model().config, **FAMILIES[method]))


def markdown_rows() -> list[str]:
    return [f"| `{r.id}` | {r.bad_input} | {r.example} | `{r.error.__name__}` | `{r.message}` |" for r in ERRORS]


def docs_rows() -> list[str]:
    with open(DOCS) as f:
        text = f.read()
    table = text.split("<!-- errors table -->")[1]
    return [line.strip() for line in table.splitlines() if line.startswith("| `")]


def test_docs_table_agrees_with_the_test_table():
    assert docs_rows() == markdown_rows(), "docs/ERRORS.md is stale: python tests/test_errors.py prints its table"


# -- inputs that are accepted and must behave --------------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_cache_reused_after_reset_works_like_a_fresh_one(method):
    params = dict(ratio=0.75) if METHODS[method].takes_budget else {}
    net = model()
    first, second = padded_batch(64, 5, seed=3), padded_batch(56, 9, seed=4)

    def generate(cache, batch):
        with torch.no_grad():
            return net.generate(batch[0], attention_mask=batch[1], **cache_kwargs(cache), max_new_tokens=4,
                                do_sample=False)

    fresh = make_cache(method, net.config, **params)
    expected = generate(fresh, second)
    reused = make_cache(method, net.config, **params)
    generate(reused, first)
    reused.reset()
    assert generate(reused, second).equal(expected)
    assert reused.stats().to_dict() == fresh.stats().to_dict()


@pytest.mark.parametrize("method", ["kivi", "uniform", "snapkv", "h2o", "minicache"])
def test_an_all_padding_row_leaves_the_other_rows_alone(method):
    """A row of nothing but padding is accepted: it attends to nothing real, keeps no tokens
    in an evicting cache, and the other row generates exactly what it generates alone (not
    with saliency: see the next test)."""
    params = dict(ratio=0.75, window=4, kernel_size=3) if method == "snapkv" else (
        dict(ratio=0.75) if method == "h2o" else {})
    net = model()
    ids, mask = padded_batch(40, 0)
    mask[1] = 0
    with torch.no_grad():
        both = net.generate(ids, attention_mask=mask, **cache_kwargs(make_cache(method, net.config, **params)),
                            max_new_tokens=4, do_sample=False)
        alone = net.generate(ids[:1], attention_mask=mask[:1],
                             **cache_kwargs(make_cache(method, net.config, **params)), max_new_tokens=4,
                             do_sample=False)
    assert both[:1].equal(alone)


@pytest.mark.parametrize("method", ["zipcache", "zipkv"])
def test_saliency_takes_its_salient_count_from_the_row_with_fewest_real_tokens(method):
    """docs/ERRORS.md's caveat: a tier holds the same count in every row, so the salient share
    of a padded batch is salient_ratio of its shortest row; an all-padding row leaves every
    row's whole prompt in the low tier (the batch is accepted, its other rows lose precision)."""
    net = model()
    ids, mask = padded_batch(40, 0)
    mask[1] = 0
    cache = make_cache(method, net.config)
    with torch.no_grad():
        net(ids, attention_mask=mask, **cache_kwargs(cache), use_cache=True)
    layer = cache.layers[0]
    assert layer.high.num_tokens == 0 and layer.low.num_tokens == 40


def test_a_lossless_cache_passes_nan_through_like_dynamic_cache():
    """`full` equals DynamicCache exactly, NaN included: it never quantizes, so it never checks."""
    bad = states()
    bad[0, 0, 1, 2] = float("nan")
    keys, _ = make_cache("full", model().config).update(bad, states(), 0)
    assert keys.isnan().sum() == 1


if __name__ == "__main__":
    print("\n".join(["| id | bad input | example | error | message (regex) |", "|---|---|---|---|---|",
                     *markdown_rows()]))
