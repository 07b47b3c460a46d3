"""zipkv.registry: one table of methods that make_cache, the CLI, eval and the README read."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

import zipkv
from tiny_models import tiny_model
from zipkv import cache_kwargs, cli, registry
from zipkv.cache import TokenQuantCache, ZipCache
from zipkv.cache.eviction_cache import EvictionCache
from zipkv.cache.minicache import MiniCache
from zipkv.registry import METHODS, MethodError, check_method, parse_method_spec

README = Path(__file__).resolve().parent.parent / "README.md"
PROMPT = 192  # tokens: more than KIVI's 128 fp16 ones, and SnapKV's 32-token window at ratio 0.5
CLASS_OF_FAMILY = {"lossless": ZipCache, "baseline": TokenQuantCache, "quantize": ZipCache, "evict": EvictionCache, "tiered": EvictionCache,
                   "merge": MiniCache}


def budget_params(spec) -> dict:
    """What a method needs beyond its defaults: budget-taking methods need a budget."""
    return dict(ratio=0.5) if spec.takes_budget and spec.name != "zipvl_v2" else {}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    return tiny_model(request.param)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_builds_and_runs_a_prefill_and_a_step(model, name):
    spec = METHODS[name]
    cache = zipkv.make_cache(name, model.config, **budget_params(spec))
    assert isinstance(cache, CLASS_OF_FAMILY[spec.family])
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, **cache_kwargs(cache))
        step = model(input_ids=out.logits[:, -1:].argmax(-1), **cache_kwargs(cache))
    assert torch.isfinite(step.logits).all()
    stats = cache.stats()
    assert stats.bytes_held > 0 and len(stats.tokens_per_layer) == model.config.num_hidden_layers
    if spec.family != "lossless":
        assert stats.bytes_held < stats.fp16_bytes or spec.family == "merge", (name, stats)
    model.set_attn_implementation("sdpa")  # the cache switched it to zipkv; the next test starts clean


@pytest.mark.parametrize("name", [n for n, s in METHODS.items() if s.family in ("lossless", "quantize")])
def test_static_flag_says_whether_to_static_accepts_the_cache(name):
    model = tiny_model("llama")
    cache = zipkv.make_cache(name, model.config)
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(cache))
    if METHODS[name].static:
        cache.to_static(4)
        assert cache.is_static
    else:
        with pytest.raises(ValueError):
            cache.to_static(4)


def test_registry_shape():
    assert zipkv.METHODS is METHODS
    assert list(METHODS)[:5] == ["full", "zipcache", "zipkv", "kivi", "uniform"]  # registration order
    for spec in METHODS.values():
        assert spec.family in registry.FAMILIES and spec.summary and spec.footprint
        assert "\n" not in spec.summary
        assert set(spec.defaults) <= set(spec.params) | set(registry.QUANT_SETTINGS) | {"scorer"}
        with pytest.raises(dataclasses.FrozenInstanceError):
            spec.name = "other"
        with pytest.raises(TypeError):
            spec.defaults["x"] = 1
    # the quantizing presets' parameters are CompressionConfig's fields
    assert registry.QUANT_SETTINGS == tuple(f.name for f in dataclasses.fields(zipkv.CompressionConfig))
    # the compatibility view is the registry's ZipCache presets
    assert zipkv.PRESETS == {n: dict(s.defaults) for n, s in METHODS.items() if s.family in ("lossless", "quantize")}


def test_vlm_methods_are_the_registry_presets_plus_the_vlm_only_ones():
    from zipkv.vlm import VLM_PRESETS
    from zipkv.vlm.settings import VLM_ONLY_PRESETS

    base = [n for n, s in METHODS.items() if s.family in ("lossless", "quantize")]
    assert list(VLM_PRESETS) == base + [n for n in VLM_ONLY_PRESETS if n not in base]
    assert VLM_PRESETS["kivi"] == dict(METHODS["kivi"].defaults)


# ---- the spec syntax -----------------------------------------------------------------------

def test_parse_method_spec_coerces_values():
    assert parse_method_spec("snapkv:ratio=0.2,window=16") == ("snapkv", {"ratio": 0.2, "window": 16})
    name, params = parse_method_spec(" zipvl : sparse_prefill=true, tau=1, pooling=max, start_layer=None ")
    assert name == "zipvl"
    assert params == {"sparse_prefill": True, "tau": 1, "pooling": "max", "start_layer": None}
    assert type(params["tau"]) is int and type(parse_method_spec("x:a=1e-3")[1]["a"]) is float
    assert parse_method_spec("full") == ("full", {})
    assert parse_method_spec("kivi:bits=2,") == ("kivi", {"bits": 2})


@pytest.mark.parametrize("text, message", [
    ("", "method must look like NAME"),
    ("9bits", "method must look like NAME"),
    ("kivi:bits", "must be key=value, got 'bits'"),
    ("kivi:=2", "must be key=value"),
    ("kivi:bits=2,bits=4", "'bits' is given twice"),
])
def test_parse_method_spec_errors(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_method_spec(text)


# ---- errors: before any model, naming what was typed -----------------------------------------

@pytest.mark.parametrize("name, params, message, param", [
    ("foo", {}, "method must be one of [", None),
    ("zipkv", dict(foo=1), "zipkv does not take ['foo']; it accepts ['channel_separable',", "foo"),
    ("kivi", dict(bits=3), "bits must be one of (2, 4, 8) (got 3)", "bits"),
    ("snapkv", dict(ratio=0), "ratio=0 is outside the allowed range (0, 1]", "ratio"),
    ("snapkv", dict(ratio=1.5), "ratio=1.5 is outside the allowed range (0, 1]", "ratio"),
    ("snapkv", dict(budget=0), "budget=0 is outside the allowed range [1, inf]", "budget"),
    ("snapkv", dict(budget=-1), "budget=-1 is outside the allowed range [1, inf]", "budget"),
    ("snapkv", dict(budget=2.5), "budget must be an integer >= 1 (got 2.5)", "budget"),
    ("snapkv", dict(ratio="most"), "ratio must be a number in (0, 1] (got 'most')", "ratio"),
    ("snapkv", dict(ratio=0.2, budget=4), "not both", "budget"),
    ("snapkv", {}, "exactly one of budget", None),
    ("snapkv", dict(ratio=0.2, window=4, kernel_size=7), "kernel_size=7 is larger than the observation window=4",
     "kernel_size"),
    ("zipvl_v2", dict(tau=1.5), "tau=1.5 is outside the allowed range (0, 1]", "tau"),
    ("three_tier", dict(ratio=0.2), "three_tier does not take ['ratio'] (it has no budget / ratio)", "ratio"),
    ("full", dict(high_bits=4), "full does not take ['high_bits']; it accepts []", "high_bits"),
    ("zipcache", dict(high_bits=2, low_bits=4), "low_bits (4) must not exceed high_bits (2)", "low_bits"),
    ("zipcache", dict(bits=4), "zipcache does not take ['bits']", "bits"),
    ("minicache", dict(start_layer=-1), "start_layer must be None or an integer >= 0 (got -1)", "start_layer"),
    ("minicache", dict(t=2.0), "t must be a number in [0, 1] (got 2.0)", "t"),
    ("snapkv", dict(ratio=0.2, sparse_prefill=True), "sparse_prefill needs ZipVL's important set", "sparse_prefill"),
    ("snapkv", dict(ratio=0.2, keep_model_dtype="yes"), "keep_model_dtype must be True or False", "keep_model_dtype"),
])
def test_check_method_errors(name, params, message, param):
    with pytest.raises(MethodError, match=re.escape(message)) as raised:
        check_method(name, params)
    assert raised.value.param == param
    if name == "foo":
        assert "(got 'foo')" in str(raised.value) and "snapkv" in str(raised.value)


def test_make_cache_checks_first_and_keeps_the_checks_tests_rely_on():
    config = tiny_model("llama").config
    with pytest.raises(ValueError, match=re.escape("zipkv does not take ['foo']")):
        zipkv.make_cache("zipkv", config, foo=1)  # was a raw TypeError from the dataclass
    with pytest.raises(ValueError, match=re.escape("bits must be one of (2, 4, 8) (got 3)")):
        zipkv.make_cache("kivi", config, bits=3)
    for bad in (dict(ratio=0), dict(ratio=1.5), dict(budget=0), dict(budget=-1)):
        with pytest.raises(ValueError, match="outside the allowed range"):
            zipkv.make_cache("snapkv", config, **bad)
        with pytest.raises(ValueError, match="outside the allowed range"):
            zipkv.make_eviction_cache("snapkv", config, **bad)
    # model-dependent checks still run when the cache is built
    with pytest.raises(ValueError, match=r"start_layer must be an integer in \[0, 1\]"):
        zipkv.make_cache("minicache", config, start_layer=5)
    assert zipkv.make_cache("kivi", config).settings.value_group_size == 16  # KIVI's groups of 32, head dim 16
    assert zipkv.make_eviction_cache("full", config).stats().bytes_held == 0  # the family's lossless reference


# ---- the README and `zipkv methods` --------------------------------------------------------------

def readme_method_table() -> list[str]:
    lines = README.read_text().splitlines()
    start = lines.index(registry.markdown_table().splitlines()[0])
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    return table


def test_readme_method_table_is_the_registry():
    table = readme_method_table()
    names = [re.match(r"\| `([\w]+)` \|", row).group(1) for row in table[2:]]
    assert names == list(METHODS)
    assert "\n".join(table) == registry.markdown_table(), "regenerate it: zipkv methods --markdown"


def test_methods_command_json_lists_every_method(capsys):
    assert cli.main(["methods", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listed] == list(METHODS)
    snapkv = next(m for m in listed if m["name"] == "snapkv")
    assert snapkv["family"] == "evict" and snapkv["takes_budget"] and snapkv["defaults"]["window"] == 32
    assert [m["static"] for m in listed] == [s.static for s in METHODS.values()]
    assert {"zipcache", "zipkv", "kivi", "uniform"} <= {m["name"] for m in listed if m["static"]}


def test_methods_command_table(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, spec in METHODS.items():
        row = next(line for line in out.splitlines() if re.search(rf"│ {name}\s+│", line))
        assert spec.family in row and ("yes" if spec.static else "no") in row


# ---- zipkv eval: bad methods fail before any model loads -----------------------------------

@pytest.mark.parametrize("spec, message", [
    ("foo", "method must be one of"),
    ("snapkv:ratio=2", "ratio=2 is outside the allowed range (0, 1]"),
    ("kivi:bits=3", "bits must be one of (2, 4, 8) (got 3)"),
    ("zipkv:foo=1", "zipkv does not take ['foo']"),
])
def test_eval_rejects_bad_methods_before_loading_a_model(spec, message, monkeypatch, tmp_path, capsys):
    from zipkv import models
    from zipkv.eval import cli as eval_cli

    monkeypatch.setattr(eval_cli, "_load", lambda args: pytest.fail("model loaded"))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as exited:
        cli.main(["eval", "--model", "tiny-random", "--methods", "full", spec, "--out", str(tmp_path)])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.jsonl").exists()


def test_eval_run_where_every_case_failed_exits_non_zero(tmp_path, capsys):
    # a budget no prompt reaches: the check passes, every case then fails at its prefill
    status = cli.main(["eval", "--model", "tiny-random", "--tasks", "passkey", "--lengths", "400", "--count", "1",
                       "--methods", "snapkv:budget=100000", "--out", str(tmp_path), "--no-plots"])
    assert status == 1
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert rows and all(r["status"] == "error" and "larger than the prompt" in r["error"] for r in rows)
    assert "every case failed" in capsys.readouterr().err
