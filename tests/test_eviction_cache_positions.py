"""Evicting caches keep positions and masks right: decoding after eviction equals an
uncompressed run (DynamicCache) in which the evicted tokens are masked out, per layer and
KV head; generate() works with left padding and without position_ids."""

import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from zipkv import cache_kwargs
from zipkv.cache.eviction_layer import EvictingLayer
from zipkv.eviction_cache import make_eviction_cache
from tiny_models import tiny_model


REFERENCE = "masked_reference"
_KEEP = {}  # layer_idx -> bool [B, Hkv, L]: which cached positions the reference may attend


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Plain float32 softmax attention over the full cache, with the model's own mask and
    the evicted positions of this layer and KV head masked out."""
    b, hq, q, d = query.shape
    hkv, k = key.shape[1], key.shape[2]
    allowed = torch.ones(b, hkv, q, k, dtype=torch.bool)
    keep = _KEEP.get(module.layer_idx)
    if keep is not None:
        allowed[..., : keep.shape[-1]] &= keep[:, :, None, :]
    if attention_mask is not None:
        allowed &= attention_mask[:, :, :, :k] if attention_mask.dtype == torch.bool else attention_mask[:, :, :, :k] == 0
    else:  # the model skipped the mask: plain causal, bottom-right aligned
        allowed &= torch.ones(q, k, dtype=torch.bool).tril(k - q)
    groups = hq // hkv
    allowed = allowed.repeat_interleave(groups, dim=1)
    logits = query.float() @ key.float().repeat_interleave(groups, 1).transpose(-1, -2) * (scaling or d**-0.5)
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    out = probs @ value.float().repeat_interleave(groups, 1)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(REFERENCE, _reference_attention)
AttentionMaskInterface.register(REFERENCE, sdpa_mask)


def held_positions(layer: EvictingLayer, full_keys: torch.Tensor) -> torch.Tensor:
    """bool [B, H, L]: positions of full_keys [B, H, L, D] that the layer still holds, found
    by matching the held keys (exact copies in a model-dtype cache)."""
    keys, _ = layer._held_layout()
    valid = layer.held_valid()
    b, h, l, _ = full_keys.shape
    keep = torch.zeros(b, h, l, dtype=torch.bool)
    for i in range(b):
        for j in range(h):
            held = keys[i, j][valid[i, j]]
            distance = torch.cdist(held.float(), full_keys[i, j].float(), compute_mode="donot_use_mm_for_euclid_dist")
            best = distance.min(dim=1)
            assert float(best.values.max()) < 1e-5, "a held key is not an exact copy of a cached key"
            keep[i, j, best.indices] = True
            assert int(keep[i, j].sum()) == held.shape[0]
    layer._parts_valid = None
    return keep


def _batch(length=48, pad=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (2, length), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :pad], mask[1, :pad] = 0, 0
    return ids, mask


CASES = {
    "streaming_llm": dict(budget=14, num_sinks=2),
    "h2o": dict(budget=14),
    "snapkv": dict(ratio=0.4, window=6, kernel_size=3),
    "pyramidkv": dict(ratio=0.4, window=6, kernel_size=3, beta=4.0),
    "adakv": dict(ratio=0.4, window=6, kernel_size=3),
    "cake": dict(ratio=0.4, window=6, kernel_size=3),
    "zipvl_v2": dict(high_bits=16, tau=0.5, probe_recent=4, probe_random=4, stream_interval=3),
}


@pytest.mark.parametrize("arch,method", [("llama", m) for m in CASES] + [("qwen2", "snapkv"), ("qwen2", "h2o")])
def test_decode_after_eviction_matches_masked_reference(arch, method):
    model = tiny_model(arch, num_hidden_layers=3)
    ids, mask = _batch()
    question = torch.randint(3, 250, (2, 5), generator=torch.Generator().manual_seed(2))
    cache = make_eviction_cache(method, model.config, keep_model_dtype=True, **CASES[method])
    reference = DynamicCache(config=model.config)
    _KEEP.clear()
    steps = [ids, question] + [None] * 4
    next_tokens = None
    full_mask = mask
    with torch.no_grad():
        for step, tokens in enumerate(steps):
            tokens = next_tokens if tokens is None else tokens
            if step:
                full_mask = torch.cat([full_mask, torch.ones_like(tokens)], dim=1)
                # what each evicting layer holds now, as positions of the full cache
                for layer in cache.evicting_layers():
                    _KEEP[layer.layer_idx] = held_positions(layer, reference.layers[layer.layer_idx].keys)
            model.config._attn_implementation = "zipkv"
            ours = model(input_ids=tokens, attention_mask=full_mask, **cache_kwargs(cache)).logits
            model.config._attn_implementation = REFERENCE
            theirs = model(input_ids=tokens, attention_mask=full_mask, **cache_kwargs(reference)).logits
            real = full_mask[:, -tokens.shape[1]:].bool()
            assert torch.allclose(ours[real], theirs[real], atol=1e-4), (step, (ours[real] - theirs[real]).abs().max())
            next_tokens = ours[:, -1:].argmax(-1)
            assert cache.get_seq_length() == reference.get_seq_length() == full_mask.shape[1]
    stats = cache.stats()
    assert stats.kept_fraction < 0.75  # something was really dropped


@pytest.mark.parametrize("method", ["streaming_llm", "h2o", "snapkv", "adakv", "pyramidkv", "cake", "three_tier"])
def test_generate_padded_row_matches_its_unpadded_run(method):
    model = tiny_model("llama", num_hidden_layers=2)
    ids, mask = _batch(length=40, pad=7)
    params = dict(CASES.get(method, {}))
    if method == "three_tier":
        params = dict(high_ratio=0.2, low_ratio=0.3, window=6, kernel_size=3, stream_interval=4)
    if "budget" in params:
        params = {**params, "budget": None, "ratio": 0.4}
        params.pop("budget")

    def run(i, m):
        cache = make_eviction_cache(method, model.config, **params)
        with torch.no_grad():
            return model.generate(input_ids=i, attention_mask=m, **cache_kwargs(cache), max_new_tokens=10,
                                  do_sample=False, pad_token_id=0)

    both = run(ids, mask)
    alone = run(ids[1:, 7:], mask[1:, 7:])
    assert torch.equal(both[1, 40:], alone[0, 33:])


def test_generate_needs_no_position_ids():
    """generate() derives positions itself; a manual greedy loop that passes neither
    positions nor a mask (positions then come from get_seq_length, the logical length)
    produces the same tokens."""
    model = tiny_model("llama", num_hidden_layers=2)
    ids = torch.randint(3, 250, (1, 40), generator=torch.Generator().manual_seed(4))
    params = dict(budget=12)
    with torch.no_grad():
        out = model.generate(input_ids=ids, **cache_kwargs(make_eviction_cache("h2o", model.config, **params)),
                             max_new_tokens=8, do_sample=False, pad_token_id=0)
        cache = make_eviction_cache("h2o", model.config, **params)
        tokens, generated = ids, []
        for _ in range(8):
            tokens = model(input_ids=tokens, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
            generated.append(tokens)
    assert torch.equal(out[:, 40:], torch.cat(generated, 1))
    assert cache.get_seq_length() == 47  # logical: prompt + 7 fed tokens
    assert cache.stats().tokens_per_layer == [12, 12]  # physical


def test_hybrid_sliding_model_and_batch_expansion():
    """Gemma 3 (sliding-window layers keep their own cache), and generate()'s batch
    expansion (num_return_sequences) reorders every store."""
    model = tiny_model("gemma3")
    ids = torch.randint(3, 250, (1, 30), generator=torch.Generator().manual_seed(5))
    cache = make_eviction_cache("snapkv", model.config, ratio=0.3, window=6, kernel_size=3)
    with torch.no_grad():
        out = model.generate(input_ids=ids, **cache_kwargs(cache), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 35)
    stats = cache.stats()
    assert stats.tokens_per_layer[1] == 9 + 4 and stats.logical_tokens_per_layer[0] == 0  # layer 0 slides
    model = tiny_model("llama", num_hidden_layers=2)
    for method, params in (("h2o", dict(ratio=0.3)), ("zipvl", dict(stream_interval=3)), ("adakv", dict(ratio=0.3, window=6, kernel_size=3))):
        cache = make_eviction_cache(method, model.config, **params)
        with torch.no_grad():
            out = model.generate(input_ids=ids, **cache_kwargs(cache), max_new_tokens=6, do_sample=True, top_k=5,
                                 num_return_sequences=3, pad_token_id=0)
        assert out.shape == (3, 36) and cache.evicting_layers()[0].batch_size == 3


def test_model_not_running_eviction_attention_is_a_clear_error():
    model = tiny_model("llama", num_hidden_layers=2)
    cache = make_eviction_cache("h2o", model.config, ratio=0.5)
    model.config._attn_implementation = "sdpa"  # someone switched it back
    with pytest.raises(RuntimeError, match="zipkv attention never ran for layer 0"):
        with torch.no_grad():
            model(input_ids=torch.randint(3, 250, (1, 12)), **cache_kwargs(cache))
    # the abandoned note does not break another cache once the model runs zipkv attention again
    fresh = make_eviction_cache("h2o", model.config, ratio=0.5)
    with torch.no_grad():
        model(input_ids=torch.randint(3, 250, (1, 12)), **cache_kwargs(fresh))
    assert fresh.stats().tokens_per_layer == [6, 6]
