"""Two zipkv caches in two threads at once: the query note a layer's update() leaves for zipkv's
attention function (zipkv/attention.py) is thread-local, so each thread's attention call finds
its own layer even when the other thread's update ran in between."""

import threading

import pytest
import torch
from tiny_models import padded_batch, tiny_model

import zipkv

NEW_TOKENS = 12
PAIRS = [  # (arch, seed, method, params) of the two threads
    (("llama", 0, "zipkv", {}), ("qwen2", 1, "snapkv", {"ratio": 0.5, "window": 4, "kernel_size": 3})),
    (("llama", 0, "zipcache", {"stream_interval": 4, "residual_length": 2}), ("llama", 2, "kivi", {})),
]


def generate(model, cache):
    ids, mask = padded_batch(length=24, pad=4)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, **zipkv.cache_kwargs(cache))
    return out[:, ids.shape[1]:]


def in_lockstep(cache, barrier: threading.Barrier) -> None:
    """Every layer update of `cache` waits for the other thread's: both notes are left before
    either attention call runs (the interleaving a shared note would get wrong)."""
    for layer in cache.layers:
        update = layer.update

        def waiting_update(*args, _update=update, **kwargs):
            out = _update(*args, **kwargs)
            barrier.wait()
            return out

        layer.update = waiting_update


def run_together(jobs):
    """Run (model, cache) jobs in one thread each, every layer update in lockstep; their tokens."""
    barrier = threading.Barrier(len(jobs), timeout=60)
    results, errors = [None] * len(jobs), []

    def work(i, model, cache):
        try:
            in_lockstep(cache, barrier)
            results[i] = generate(model, cache)
        except BaseException as error:  # noqa: BLE001 (reported below, with the other thread released)
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i, *job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish"
    if errors:
        raise errors[0]
    return results


def cache_of(model, method, params):
    return zipkv.make_cache(method, model.config, **params)


@pytest.mark.parametrize("first,second", PAIRS)
def test_two_models_in_two_threads_get_their_tokens_alone(first, second):
    models = [tiny_model(arch, seed=seed) for arch, seed, _, _ in (first, second)]
    specs = [(method, params) for _, _, method, params in (first, second)]
    alone = [generate(model, cache_of(model, *spec)) for model, spec in zip(models, specs)]
    caches = [cache_of(model, *spec) for model, spec in zip(models, specs)]
    together = run_together(list(zip(models, caches)))
    for tokens, expected in zip(together, alone):
        assert torch.equal(tokens, expected)
    assert not torch.equal(alone[0], alone[1])  # two different models: a mix-up would show
    for cache in caches:
        assert cache.get_seq_length() == 24 + NEW_TOKENS - 1


def test_one_model_shared_by_two_threads_with_two_caches():
    """The model is stateless between forwards for text models: two caches of one model in
    two threads each get the tokens of a run alone."""
    model = tiny_model("llama")
    alone = generate(model, zipkv.make_cache("zipkv", model.config))
    together = run_together([(model, zipkv.make_cache("zipkv", model.config)) for _ in range(2)])
    for tokens in together:
        assert torch.equal(tokens, alone)
