"""The supported transformers range (pyproject pin == the import check), the error for a release
outside it, and the cache argument under both names (`cache=` from 5.24 on, `past_key_values=`)."""

import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from tiny_models import padded_batch, tiny_model

import zipkv
from zipkv.transformers_support import (
    ALLOW_UNTESTED_ENV,
    SUPPORTED_TRANSFORMERS,
    cache_argument_name,
    check_transformers_version,
    installed_transformers,
)

ROOT = Path(__file__).resolve().parent.parent
RENAMED = Version(installed_transformers()).release >= (5, 24)


def test_pyproject_pin_is_the_checked_range():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d for d in deps if d.startswith("transformers")]
    assert pins == ["transformers" + SUPPORTED_TRANSFORMERS]


def test_installed_release_is_supported():
    check_transformers_version()  # the suite itself runs on a supported release


@pytest.mark.parametrize("version", ["5.2.0", "5.23.0", "5.24.0", "5.24.1", "5.24.0rc1"])
def test_supported_releases_pass(version):
    check_transformers_version(version)


@pytest.mark.parametrize("version", ["4.57.1", "5.1.0", "5.25.0", "5.25.0.dev0", "6.0.0"])
def test_release_outside_the_range_is_an_import_error_naming_both(version, monkeypatch):
    monkeypatch.delenv(ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(ImportError) as err:
        check_transformers_version(version)
    assert f"transformers {version} is installed" in str(err.value)
    assert SUPPORTED_TRANSFORMERS in str(err.value)
    assert ALLOW_UNTESTED_ENV in str(err.value)


def test_untested_release_allowed_by_the_environment_warns(monkeypatch):
    monkeypatch.setenv(ALLOW_UNTESTED_ENV, "1")
    with pytest.warns(RuntimeWarning, match="transformers 5.30.0 is installed"):
        check_transformers_version("5.30.0")


@pytest.mark.parametrize("module", ["zipkv.cache", "zipkv.attention"])
def test_importing_zipkv_with_an_unsupported_release_fails(module, monkeypatch):
    """The check really runs at import (a fresh interpreter whose transformers claims 5.1.0)."""
    monkeypatch.delenv(ALLOW_UNTESTED_ENV, raising=False)
    code = f"import transformers; transformers.__version__ = '5.1.0'; import {module}"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode != 0
    assert "ImportError: zipkv supports transformers" in run.stderr
    assert "transformers 5.1.0 is installed" in run.stderr


@pytest.mark.parametrize("version,name", [("5.2.0", "past_key_values"), ("5.23.0", "past_key_values"),
                                          ("5.24.0", "cache"), ("5.24.0rc1", "cache"), ("5.30.0", "cache")])
def test_cache_argument_name_follows_the_rename(version, name):
    assert cache_argument_name(version) == name


def _greedy(model, ids, mask, **cache_argument):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                             **cache_argument)
    return out[:, ids.shape[1]:]


SPELLINGS = ["past_key_values", pytest.param("cache", marks=pytest.mark.skipif(
    not RENAMED, reason="transformers < 5.24 has no cache= argument"))]


@pytest.mark.parametrize("method,params", [("zipkv", {}), ("snapkv", {"ratio": 0.5, "window": 4, "kernel_size": 3})])
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_generate_and_forward_take_a_zipkv_cache_under_either_name(method, params, spelling):
    """Both names reach the zipkv cache (it fills up) and give the same tokens."""
    model = tiny_model("llama")
    ids, mask = padded_batch(length=24, pad=4)
    expected = _greedy(model, ids, mask, **zipkv.cache_kwargs(zipkv.make_cache(method, model.config, **params)))
    cache = zipkv.make_cache(method, model.config, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # past_key_values= is deprecated on 5.24
        tokens = _greedy(model, ids, mask, **{spelling: cache})
    assert torch.equal(tokens, expected)
    assert cache.get_seq_length() == ids.shape[1] + tokens.shape[1] - 1  # the last token is never fed back

    cache = zipkv.make_cache(method, model.config, **params)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **{spelling: cache})
    assert cache.get_seq_length() == ids.shape[1]
    assert out.past_key_values is cache  # the name outputs keep on every supported release


def test_zipkv_entry_points_pass_the_cache_without_deprecation_warnings():
    """zipkv's own calls (greedy_decode, record_prefill, the VLM helper) use the installed
    release's name: no FutureWarning about past_key_values on 5.24."""
    from zipkv.cache.eviction_cache import record_prefill

    model = tiny_model("llama")
    ids, mask = padded_batch(length=20, pad=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        zipkv.greedy_decode(model, zipkv.make_cache("zipkv", model.config), ids, mask, max_new_tokens=4)
        record_prefill(model, ids, mask)
    about_the_name = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert about_the_name == []
