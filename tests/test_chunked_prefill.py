"""Chunked prefill (zipkv/prefill.py, greedy_decode(prefill_chunk=...)): the prompt in forwards
of at most N tokens through the cache, left padding included."""

import pytest
import torch
from tiny_models import padded_batch, tiny_model

import zipkv
from zipkv.prefill import chunked_prefill, prompt_positions

RUN = dict(max_new_tokens=8, cuda_graph=False, eos_token_id=False)


def test_lossless_chunks_give_the_one_forward_tokens():
    """`full` (lossless): a prompt in chunks of 16 (the padded row's first chunk partly or
    wholly padding) gives the tokens and, closely, the logits of one forward, and holds every
    token."""
    model = tiny_model("llama")
    for pad in (20, 5):  # 20: the padded row's whole first chunk is padding
        ids, mask = padded_batch(length=40, pad=pad)
        one = zipkv.greedy_decode(model, zipkv.make_cache("full", model.config), ids, mask, **RUN)
        chunked = zipkv.greedy_decode(model, zipkv.make_cache("full", model.config), ids, mask, prefill_chunk=16,
                                      **RUN)
        assert torch.equal(chunked, one), pad
    whole, parts = zipkv.make_cache("full", model.config), zipkv.make_cache("full", model.config)
    with torch.inference_mode():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=prompt_positions(mask), use_cache=True,
                         **zipkv.cache_kwargs(whole)).logits[:, -1:]
    got = chunked_prefill(model, parts, ids, mask, chunk_size=16)
    assert parts.get_seq_length() == whole.get_seq_length() == 40
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


@pytest.mark.parametrize("method", ["zipkv", "kivi", "auto"])
def test_quantizing_caches_take_chunks(method):
    """Quantizing caches prefill in chunks: the same tokens held as after one forward, the
    static decode that follows runs, and the bytes differ by the fp16 tail only: the first
    chunk is packed as a prompt, later ones as streamed tokens, in blocks of stream_interval,
    so fewer than stream_interval tokens per layer stay fp16 (after decoding, as always)."""
    model = tiny_model("llama")
    ids, mask = padded_batch(length=160, pad=6)
    caches = {}
    for chunk in (None, 40):
        cache = caches[chunk] = zipkv.make_cache(method, model.config)
        tokens = zipkv.greedy_decode(model, cache, ids, mask, prefill_chunk=chunk, **RUN)
        assert tokens.shape == (2, 8)
    assert caches[40].get_seq_length() == caches[None].get_seq_length()
    cache = zipkv.make_cache(method, model.config)
    chunked_prefill(model, cache, ids, mask, chunk_size=40)
    s = cache.settings
    for layer in cache.layers:  # the eager form right after the prefill: its fp16 part
        assert layer.keys.shape[2] < s.stream_interval + max(s.residual_length, 40)
    if ids.shape[1] > s.residual_length + s.stream_interval:  # kivi keeps 128 tokens fp16: nothing packed yet
        assert cache.stats().bytes_held < cache.stats().fp16_bytes


@pytest.mark.parametrize("method, params, reason", [
    ("snapkv", dict(ratio=0.5, window=8), "sizes its budget"), ("h2o", dict(ratio=0.5), "sizes its budget"),
    ("streaming_llm", dict(ratio=0.5), "sizes its budget"), ("minicache", {}, "merges"),
])
def test_prompt_sized_budgets_and_merges_refuse_chunks(method, params, reason):
    """A budget sized from the first forward's length (h2o kept 4 of 48 tokens in chunks of 12,
    22 in one forward) or a one-time selection / merge would silently change: a clear error."""
    model = tiny_model("llama")
    ids, mask = padded_batch(length=40, pad=5)
    with pytest.raises(ValueError, match=reason):
        chunked_prefill(model, zipkv.make_cache(method, model.config, **params), ids, mask, chunk_size=16)
    # one chunk covering the prompt is a plain prefill: allowed
    chunked_prefill(model, zipkv.make_cache(method, model.config, **params), ids, mask, chunk_size=64)


@pytest.mark.parametrize("bad", [0, -3, True, "16", 2.5])
def test_chunk_size_is_checked(bad):
    model = tiny_model("llama")
    ids, mask = padded_batch(length=20, pad=2)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        chunked_prefill(model, zipkv.make_cache("zipkv", model.config), ids, mask, chunk_size=bad)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        zipkv.greedy_decode(model, zipkv.make_cache("zipkv", model.config), ids, mask, prefill_chunk=bad, **RUN)
