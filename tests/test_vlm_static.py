"""Static (CUDA-graph) decoding of the modality-aware VLM caches (zipkv.vlm) on tiny random
LLaVA, LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL: a left-padded batch of 2, text + image prompts.

On the CPU the static path runs eagerly (cuda_graph=False: the same buffers, device-side
counts and kernels' references); the reference is model.generate() with the eager cache.
Both sides take the plain argmax (generate() without suppressed tokens), which is what
StaticDecoder does.
"""

import pytest
import torch
from held_tensors import held_bytes

from zipkv import cache_kwargs
from zipkv.decode_positions import decode_positions, uses_mrope
from zipkv.graph_decode import StaticDecoder, greedy_decode, prompt_positions
from zipkv.methods import make_cache
from zipkv.vlm.cache import make_vlm_cache
from zipkv.vlm.layer import TIER_NAMES
from zipkv.vlm.tiny import ARCHS, image_prompts, tiny_vlm

pytest.importorskip("PIL")  # the LLaVA processors' image backend

# Rows with different image token counts where the family allows it (LLaVA-NeXT's anyres
# tiles, Qwen's native resolution): a block's visual group is then the rows' minimum.
SIZES = {"llava_next": ((40, 48), (64, 32)), "qwen2_vl": ((32, 32), (32, 64)), "qwen2_5_vl": ((32, 64), (32, 32))}
NEW_TOKENS = 14
# Small blocks, so several are quantized between static steps (the prompts are ~30-60 tokens).
BLOCKS = dict(stream_interval=8, decode_path="packed")
CASES = [
    ("zipcache", {}),
    ("zipcache", dict(sink_tokens=2, residual_length=3)),
    ("zipcache", dict(residual_length=24)),  # visual tokens still in the window: quantized by a static flush
    ("zipkv", {}),  # 4-bit keys, 2-bit values
    ("kivi", dict(residual_length=4)),  # the preset keeps 128 recent tokens in fp16: nothing would be quantized
    ("uniform", {}),
    ("zipvl", {}),  # ZipVL's dynamic ratio (tau of the score mass): sensitive to every score
]


def _model_and_inputs(arch):
    model = tiny_vlm(arch)
    inputs = image_prompts(arch, image_sizes=SIZES.get(arch, ((32, 32), (32, 32))))
    assert (inputs["attention_mask"] == 0).any(), "the batch must be left padded"
    return model, inputs


def _cache(model, inputs, method, kw):
    return make_vlm_cache(method, model.config, inputs["input_ids"], attention_mask=inputs["attention_mask"],
                          mm_token_type_ids=inputs.get("mm_token_type_ids"), **BLOCKS, **kw)


def _tier_tokens(cache):
    return [[getattr(layer, name).num_tokens for name in TIER_NAMES] for layer in cache.layers]


def _prefill(model, inputs, cache):
    """The prompt forward as generate() runs it: padding-aware positions (an M-RoPE model
    makes its own 3-D ones from the mask and the image grid, and keeps their rope_deltas)."""
    positions = None if uses_mrope(model) else prompt_positions(inputs["attention_mask"])
    with torch.inference_mode():
        out = model(**inputs, position_ids=positions, **cache_kwargs(cache), use_cache=True)
    return out.logits[:, -1:].argmax(-1)


def _assert_same_states(static, eager):
    """The same key and value states, every tier and the fp16 part: keys carry their rotary
    positions, which a tiny random model's tokens hardly depend on (its attention is nearly
    uniform), so positions are checked here rather than through the tokens."""
    for static_layer, eager_layer in zip(static.layers, eager.layers):
        for static_tier, eager_tier in zip(static_layer.tiers(), eager_layer.tiers()):
            assert static_tier.num_tokens == eager_tier.num_tokens
            if eager_tier.num_tokens:
                assert all(torch.equal(a, b) for a, b in zip(static_tier.dequantize(torch.float32),
                                                             eager_tier.dequantize(torch.float32)))
        n = static_layer.n_fp
        assert torch.equal(static_layer.k_win[:, :, :n], eager_layer.keys)
        assert torch.equal(static_layer.v_win[:, :, :n], eager_layer.values)


@pytest.mark.parametrize("method,kw", CASES, ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x.items())))
@pytest.mark.parametrize("arch", ARCHS)
def test_static_decode_equals_generate_with_the_eager_cache(arch, method, kw):
    model, inputs = _model_and_inputs(arch)
    eager = _cache(model, inputs, method, kw)
    with torch.no_grad():
        out = model.generate(**inputs, **cache_kwargs(eager), max_new_tokens=NEW_TOKENS, do_sample=False)
    expected = out[:, inputs["input_ids"].shape[1]:]

    cache = _cache(model, inputs, method, kw)
    first = _prefill(model, inputs, cache)
    length, tiers = cache.get_seq_length(), _tier_tokens(cache)
    next_positions = prompt_positions(inputs["attention_mask"])[:, -1] + 1
    decoder = StaticDecoder(model, cache, first, next_positions, NEW_TOKENS - 1, inputs["attention_mask"],
                            cuda_graph=False)
    # the static form keeps every token, in the same tiers
    assert cache.is_static and cache.get_seq_length() == length and _tier_tokens(cache) == tiers
    tokens = torch.cat([first] + [decoder.step().clone() for _ in range(NEW_TOKENS - 1)], dim=1)

    assert torch.equal(tokens, expected)
    assert decoder.flushes > 0  # blocks were quantized between static steps
    assert cache.get_seq_length() == eager.get_seq_length()
    assert _tier_tokens(cache) == _tier_tokens(eager)
    _assert_same_states(cache, eager)
    for static_layer, eager_layer in zip(cache.layers, eager.layers):
        assert static_layer.entry_counts == eager_layer.entry_counts  # text / visual / padding per tier
    seen = set()
    assert cache.stats().bytes_held == sum(held_bytes(layer, seen) for layer in cache.layers)


def test_a_static_flush_quantizes_visual_tokens():
    """The residual_length=24 case really sends window tokens to the visual tiers between
    static steps (their room in the static form is what the window held)."""
    model, inputs = _model_and_inputs("llava")
    cache = _cache(model, inputs, "zipcache", dict(residual_length=24))
    first = _prefill(model, inputs, cache)
    visual_before = sum(layer.vis_low.num_tokens + layer.vis_high.num_tokens for layer in cache.layers)
    decoder = StaticDecoder(model, cache, first, prompt_positions(inputs["attention_mask"])[:, -1] + 1,
                            NEW_TOKENS - 1, inputs["attention_mask"], cuda_graph=False)
    for _ in range(NEW_TOKENS - 1):
        decoder.step()
    assert sum(layer.vis_low.num_tokens + layer.vis_high.num_tokens for layer in cache.layers) > visual_before


@pytest.mark.parametrize("residual_length", [0, 28])
def test_vidkv_tiers_refuse_the_static_form(residual_length):
    """The decode kernel cannot read VidKV's 1.x-bit tier: a clear error, whether the tier
    holds the prompt's visual tokens (0) or would only receive them from the window later (28)."""
    model, inputs = _model_and_inputs("llava")
    cache = _cache(model, inputs, "vidkv", dict(residual_length=residual_length, vidkv_group_size=8))
    _prefill(model, inputs, cache)
    assert bool(cache.layers[0].vis_low.num_tokens) == (residual_length == 0)
    with pytest.raises(ValueError, match="'vis_low' tier is a VidKVTier"):
        cache.to_static(4, inputs["attention_mask"])


def test_mrope_decode_positions_carry_the_prompts_rope_deltas():
    model, inputs = _model_and_inputs("qwen2_vl")
    _prefill(model, inputs, _cache(model, inputs, "kivi", {}))
    text = prompt_positions(inputs["attention_mask"])[:, -1] + 1
    positions = decode_positions(model, text)
    assert positions.shape == (3, 2, 1)
    deltas = model.model.rope_deltas
    assert bool((deltas != 0).any())  # an image shifts the rows' positions
    assert torch.equal(positions, (text[:, None] + deltas)[None].expand(3, -1, -1))
    llava, _ = _model_and_inputs("llava")
    assert torch.equal(decode_positions(llava, text), text[:, None])


def test_greedy_decode_on_a_text_prompt_ignores_an_earlier_image_prompts_deltas():
    model, inputs = _model_and_inputs("qwen2_vl")
    _prefill(model, inputs, _cache(model, inputs, "kivi", {}))  # leaves rope_deltas on the model
    ids = torch.randint(3, 250, (2, 8), generator=torch.Generator().manual_seed(0))  # text words only
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # row 0 left padded
    ids[0, :3] = 0
    kw = dict(stream_interval=4, residual_length=2, decode_path="packed")
    eager = make_cache("zipcache", model.config, **kw)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(eager), max_new_tokens=10,
                                  do_sample=False)[:, ids.shape[1]:]
    _prefill(model, inputs, _cache(model, inputs, "kivi", {}))  # generate() reset them: leave them again
    cache = make_cache("zipcache", model.config, **kw)
    assert torch.equal(greedy_decode(model, cache, ids, mask, max_new_tokens=10, cuda_graph=False), expected)
    _assert_same_states(cache, eager)
