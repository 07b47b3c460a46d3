"""Prompt + new tokens beyond the model's max_position_embeddings (zipkv/cache/limits.py): a
warning at the forward that crosses it (default), or an error raised before the cache stores
anything (on_overflow="raise"), on tiny models with a 64-position context."""

import warnings

import pytest
import torch
from tiny_models import padded_batch, tiny_model

import zipkv
from zipkv.cache.limits import (
    ON_OVERFLOW_ENV,
    ContextOverflowError,
    ContextOverflowWarning,
    PositionLimit,
    max_positions,
)

LIMIT = 64
CASES = [  # every cache family whose layers check: quantizing, evicting, lossless, window layers
    ("llama", "zipkv", {}),
    ("llama", "snapkv", {"ratio": 0.5, "window": 4, "kernel_size": 3}),
    ("llama", "full", {}),
    ("gemma3", "zipkv", {}),  # layer 0 is a sliding-window layer (SlidingZipLayer)
    ("qwen2", "streaming_llm", {"budget": 24}),
]


def model_of(arch):
    return tiny_model(arch, max_position_embeddings=LIMIT)


def generate(model, cache, prompt: int, new_tokens: int):
    """Greedy generate() of a padded batch (rows of `prompt` tokens); the overflow warnings it raised."""
    ids, mask = padded_batch(length=prompt, pad=3)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, **zipkv.cache_kwargs(cache))
    return [str(w.message) for w in caught if issubclass(w.category, ContextOverflowWarning)]


@pytest.mark.parametrize("arch,method,params", CASES)
def test_generation_that_crosses_the_context_warns_once(arch, method, params):
    model = model_of(arch)
    # 50 prompt tokens + 30 new: 79 positions fed (the last token never is); crossed at 65
    found = generate(model, zipkv.make_cache(method, model.config, **params), prompt=50, new_tokens=30)
    assert len(found) == 1
    assert "reach 65 positions" in found[0] and f"max_position_embeddings={LIMIT}" in found[0]


@pytest.mark.parametrize("arch,method,params", CASES[:2])
def test_generation_that_fills_the_context_exactly_is_silent(arch, method, params):
    model = model_of(arch)
    # 50 + 15 new: 64 positions fed, the whole context and not one more
    assert generate(model, zipkv.make_cache(method, model.config, **params), prompt=50, new_tokens=15) == []


def test_prompt_longer_than_the_context_warns_at_the_prefill():
    model = model_of("llama")
    found = generate(model, zipkv.make_cache("zipkv", model.config), prompt=70, new_tokens=3)
    assert len(found) == 1 and "reach 70 positions" in found[0]


def test_a_reset_cache_warns_again():
    model = model_of("llama")
    cache = zipkv.make_cache("zipkv", model.config)
    assert len(generate(model, cache, prompt=50, new_tokens=30)) == 1
    cache.reset()
    assert len(generate(model, cache, prompt=50, new_tokens=30)) == 1


@pytest.mark.parametrize("arch,method,params", CASES)
def test_raise_stops_the_crossing_forward_before_anything_is_stored(arch, method, params):
    model = model_of(arch)
    ids, mask = padded_batch(length=60, pad=3)
    cache = zipkv.make_cache(method, model.config, **params)
    cache.position_limit.on_overflow = "raise"
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=True, **zipkv.cache_kwargs(cache))
        held = cache.get_seq_length()
        step = ids[:, -5:]  # 60 + 5 = 65 positions: one too many
        step_mask = torch.cat([mask, torch.ones_like(step)], dim=1)
        with pytest.raises(ContextOverflowError, match=f"reach 65 positions.*max_position_embeddings={LIMIT}"):
            model(input_ids=step, attention_mask=step_mask, use_cache=True, **zipkv.cache_kwargs(cache))
        assert cache.get_seq_length() == held == 60
        # within the context the cache carries on (the failed forward left no pending note)
        model(input_ids=step[:, :4], attention_mask=step_mask[:, :-1], use_cache=True, **zipkv.cache_kwargs(cache))
    assert cache.get_seq_length() == 64


def test_raise_set_by_the_environment(monkeypatch):
    monkeypatch.setenv(ON_OVERFLOW_ENV, "raise")
    model = model_of("llama")
    cache = zipkv.make_cache("kivi", model.config)
    assert cache.position_limit.on_overflow == "raise"
    with pytest.raises(ContextOverflowError):
        generate(model, cache, prompt=70, new_tokens=2)
    assert cache.get_seq_length() == 0  # the prompt was refused before the first layer stored it
    assert isinstance(ContextOverflowError("x"), ValueError)


def test_ignore_is_silent():
    model = model_of("llama")
    cache = zipkv.make_cache("zipkv", model.config)
    cache.position_limit.on_overflow = "ignore"
    assert generate(model, cache, prompt=50, new_tokens=30) == []


def test_bad_settings_name_the_setting(monkeypatch):
    model = model_of("llama")
    cache = zipkv.make_cache("zipkv", model.config)
    with pytest.raises(ValueError, match=r"on_overflow must be one of \('warn', 'raise', 'ignore'\) \(got 'loud'\)"):
        cache.position_limit.on_overflow = "loud"
    monkeypatch.setenv(ON_OVERFLOW_ENV, "loud")
    with pytest.raises(ValueError, match=f"{ON_OVERFLOW_ENV} must be one of"):
        zipkv.make_cache("zipkv", model.config)


@pytest.mark.parametrize("method", ["zipkv", "streaming_llm"])
def test_greedy_decode_checks_the_whole_decode_before_the_prompt_runs(method):
    model = model_of("llama")
    ids, mask = padded_batch(length=50, pad=3)
    params = {"budget": 24} if method == "streaming_llm" else {}
    cache = zipkv.make_cache(method, model.config, **params)
    cache.position_limit.on_overflow = "raise"
    with pytest.raises(ContextOverflowError, match="reach 65 positions"):
        zipkv.greedy_decode(model, cache, ids, mask, max_new_tokens=16)
    assert cache.get_seq_length() == 0
    cache = zipkv.make_cache(method, model.config, **params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        zipkv.greedy_decode(model, cache, ids, mask, max_new_tokens=15)  # 64 positions: the context
        assert not [w for w in caught if issubclass(w.category, ContextOverflowWarning)]
        zipkv.greedy_decode(model, zipkv.make_cache(method, model.config, **params), ids, mask, max_new_tokens=30)
    assert len([w for w in caught if issubclass(w.category, ContextOverflowWarning)]) == 1


class NoContextConfig:
    """A config that declares no max_position_embeddings (e.g. a model without positions)."""

    def get_text_config(self, decoder=True):
        return self


def test_a_config_without_a_context_checks_nothing():
    config = NoContextConfig()
    assert max_positions(config) is None
    assert max_positions(model_of("llama").config) == LIMIT
    limit = PositionLimit(config, on_overflow="raise")
    limit.check(10**6, 10**6)  # no limit declared: nothing to compare against
