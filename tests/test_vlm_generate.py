"""The plain zipkv caches inside tiny random VLMs (vision tower included): LLaVA, LLaVA-NeXT,
Qwen2-VL, Qwen2.5-VL; generate(), batch 2 with left padding, text + image inputs."""

import pytest
import torch
from held_tensors import held_bytes
from transformers import DynamicCache

import zipkv
from zipkv.cache.layer import ZipCacheLayer
from zipkv.vlm.tiny import ARCHS, greedy, image_prompts, tiny_vlm

pytest.importorskip("PIL")  # the LLaVA processors' image backend


# LLaVA-NeXT's image token count depends on the image size (anyres tiles): rows differ
SIZES = {"llava_next": ((40, 48), (64, 32))}


def _model_and_inputs(arch):
    model = tiny_vlm(arch)
    inputs = image_prompts(arch, image_sizes=SIZES.get(arch, ((32, 32), (32, 32))))
    assert (inputs["attention_mask"][1] == 0).any(), "row 1 must be left padded"
    return model, inputs


@pytest.mark.parametrize("arch", ARCHS)
def test_lossless_equals_dynamic_cache(arch):
    model, inputs = _model_and_inputs(arch)
    expected = greedy(model, inputs, DynamicCache(config=model.config), 12)
    cache = zipkv.make_cache("full", model.config)
    assert torch.equal(greedy(model, inputs, cache, 12), expected)
    assert cache.stats().tokens_per_layer == [inputs["input_ids"].shape[1] + 11] * 2


# small blocks / windows so that 20 decoded tokens are quantized too
SHORT_BLOCKS = {
    "zipcache": dict(stream_interval=8),
    "kivi": dict(residual_length=4, stream_interval=8, key_group_size=8),
    "uniform": dict(stream_interval=8),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", sorted(SHORT_BLOCKS))
def test_compressing_caches_run_inside_the_language_model(arch, method):
    model, inputs = _model_and_inputs(arch)
    vision_attention = model.config.vision_config._attn_implementation
    cache = zipkv.make_cache(method, model.config, **SHORT_BLOCKS[method])
    language_config = model.model.language_model.config
    if method == "zipcache":
        # the cache is built from the top-level config; the switch must reach the language model
        assert language_config._attn_implementation == "zipkv"
    assert model.config.vision_config._attn_implementation == vision_attention
    out = greedy(model, inputs, cache, 20)
    length = inputs["input_ids"].shape[1]
    assert out.shape == (2, length + 20)
    layers = [layer for layer in cache.layers if isinstance(layer, ZipCacheLayer)]
    assert len(layers) == 2
    assert not any(layer.awaiting_queries for layer in layers)  # zipkv attention ran after every update
    if method == "zipcache":
        assert all(layer.high.num_tokens for layer in layers)  # saliency came from the queries
    assert all(layer.low.num_tokens + layer.high.num_tokens > length for layer in layers)  # decoded blocks too
    assert cache.stats().ratio > 1.5
    assert cache.stats().tokens_per_layer == [length + 19] * 2


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_mrope_positions_unchanged_by_compression(arch):
    """M-RoPE: the 3-D positions reaching the language model are those of DynamicCache, and the
    image block / decode positions are what the grid says (checked by hand, not by the model)."""
    model, inputs = _model_and_inputs(arch)
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"].clone()), with_kwargs=True
    )
    try:
        greedy(model, inputs, DynamicCache(config=model.config), 6)
        reference, seen[:] = list(seen), []
        greedy(model, inputs, zipkv.make_cache("zipcache", model.config, stream_interval=2), 6)
    finally:
        hook.remove()
    assert len(seen) == len(reference) == 6
    for got, want in zip(seen, reference):
        assert torch.equal(got, want)
    # hand check, row 0 (no padding): 6 words + <vision_start> at 0..6, a 4x4 merged grid at
    # temporal 7, height 7 + i // 4, width 7 + i % 4, then text from 7 + 4 = 11 on
    prefill = reference[0][1:, 0]  # the three M-RoPE rows
    grid = torch.arange(16)
    assert torch.equal(prefill[:, :7], torch.arange(7).expand(3, -1))
    assert torch.equal(prefill[0, 7:23], torch.full((16,), 7))
    assert torch.equal(prefill[1, 7:23], 7 + grid // 4)
    assert torch.equal(prefill[2, 7:23], 7 + grid % 4)
    assert torch.equal(prefill[:, 23:], (11 + torch.arange(6)).expand(3, -1))
    # decode: every row continues from its own largest position, the same on all three axes
    for step, positions in enumerate(reference[1:]):
        for row in range(2):
            top = int(reference[0][1:, row].max())
            assert positions[1:, row, 0].tolist() == [top + 1 + step] * 3


def _expected_tiers(prompt, real_min, new_tokens, ratio=0.6, interval=100):
    """(low, high, fp16) token counts of a zipcache layer after generate(): the prompt is one
    block, then one block per `interval` decoded tokens; the last generated token is never fed."""
    high = round(ratio * real_min)
    low = prompt - high
    fed = new_tokens - 1
    blocks = fed // interval
    block_high = round(ratio * interval)
    return low + blocks * (interval - block_high), high + blocks * block_high, fed - blocks * interval



@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_zipcache_decodes_200_tokens(arch):
    model, inputs = _model_and_inputs(arch)
    cache = zipkv.make_cache("zipcache", model.config)
    out = greedy(model, inputs, cache, 210, output_logits=True, return_dict_in_generate=True)
    prompt = inputs["input_ids"].shape[1]
    assert out.sequences.shape == (2, prompt + 210)
    assert all(torch.isfinite(step).all() for step in out.logits)
    real_min = int(inputs["attention_mask"].sum(dim=1).min())
    low, high, fp16 = _expected_tiers(prompt, real_min, 210)
    for layer in cache.layers:
        assert (layer.low.num_tokens, layer.high.num_tokens, layer.keys.shape[2]) == (low, high, fp16)
        # the held codes have the documented shapes: [B, H, N, D * bits / 8]
        assert layer.low.k_codes.shape == (2, 2, low, 16 * 2 // 8)
        assert layer.high.v_codes.shape == (2, 2, high, 16 * 4 // 8)
    stats = cache.stats()
    held = held_bytes(cache)
    assert stats.bytes_held == held
    assert stats.fp16_bytes == 2 * 2 * (prompt + 209) * 2 * 16 * 2 * 2  # layers, K+V, tokens, B, H, D, bytes
    assert stats.ratio > 3.0
