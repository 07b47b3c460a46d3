"""Visual-token awareness: which positions are visual, a cache that gives them their own tiers,
bits and ratio (fixed or ZipVL's tau), and stats split by modality."""

import pytest
import torch
from held_tensors import held_bytes
from transformers import DynamicCache

from zipkv import cache_kwargs
from zipkv.vlm import IMAGE, TEXT, VIDEO, VisualCompressionConfig, make_vlm_cache, token_modality, visual_spans
from zipkv.vlm.layer import ModalityTags, VisualZipCacheLayer
from zipkv.vlm.tiny import SPECIAL, greedy, image_prompts, tiny_vlm

pytest.importorskip("PIL")  # the LLaVA processors' image backend



# -- which positions are visual ---------------------------------------------------------------------
def test_token_modality_from_config_and_from_mm_token_type_ids():
    model = tiny_vlm("qwen2_vl")
    inputs = image_prompts("qwen2_vl")
    modality = token_modality(inputs["input_ids"], model.config)
    assert torch.equal(modality == IMAGE, inputs["input_ids"] == SPECIAL["<|image_pad|>"])
    assert torch.equal(modality, token_modality(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"]))
    ids = torch.tensor([[5, 251, 251, 6, 252, 252, 252, 251]])
    assert token_modality(ids, model.config).tolist() == [[TEXT, IMAGE, IMAGE, TEXT, VIDEO, VIDEO, VIDEO, IMAGE]]
    assert visual_spans(token_modality(ids, model.config)) == [[(1, 3, IMAGE), (4, 7, VIDEO), (7, 8, IMAGE)]]
    # LLaVA names it image_token_index; one run of 16 image tokens per row (4x4 patches, CLS dropped)
    llava = tiny_vlm("llava")
    spans = visual_spans(token_modality(image_prompts("llava")["input_ids"], llava.config))
    assert [[end - start for start, end, _ in row] for row in spans] == [[16], [16]]


def test_token_modality_rejects_bad_input():
    with pytest.raises(ValueError, match="image_token_id"):
        token_modality(torch.zeros(1, 4, dtype=torch.long), tiny_vlm("llava").config.text_config)
    with pytest.raises(ValueError, match="input_ids"):
        token_modality(torch.zeros(4, dtype=torch.long), image_token_id=3)
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        token_modality(torch.zeros(1, 4, dtype=torch.long), mm_token_type_ids=torch.full((1, 4), 3))


# -- the cache ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_lossless_visual_cache_equals_dynamic_cache_and_counts_modalities(arch):
    model = tiny_vlm(arch)
    inputs = image_prompts(arch)
    expected = greedy(model, inputs, DynamicCache(config=model.config), 10)
    cache = make_vlm_cache("full", model.config, inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert torch.equal(greedy(model, inputs, cache, 10), expected)
    stats = cache.modality_stats()
    n_visual = int((token_modality(inputs["input_ids"], model.config) != TEXT).sum())
    n_padding = int((inputs["attention_mask"] == 0).sum())
    total = 2 * (inputs["input_ids"].shape[1] + 9)
    assert stats.tokens["visual"] == [n_visual] * 2
    assert stats.tokens["padding"] == [n_padding] * 2
    assert stats.tokens["text"] == [total - n_visual - n_padding] * 2
    assert stats.bytes_held == cache.stats().bytes_held == held_bytes(cache)


def test_visual_tokens_get_their_own_tiers_and_bits():
    """Text 4/2-bit, visual kept in fp16: the visual tier must hold exactly the keys of the
    image positions (compared with DynamicCache's keys), the text tiers none of them."""
    model = tiny_vlm("llava")
    inputs = image_prompts("llava")
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model(**inputs, **cache_kwargs(reference))
    cache = make_vlm_cache(
        "zipcache", model.config, inputs["input_ids"], attention_mask=inputs["attention_mask"],
        visual_high_bits=16, visual_low_bits=16,
    )
    with torch.no_grad():
        model(**inputs, **cache_kwargs(cache))
    visual = token_modality(inputs["input_ids"], model.config) != TEXT
    for index, (layer, ref) in enumerate(zip(cache.layers, reference.layers)):
        assert layer.vis_high.num_tokens == 0 and layer.keys.shape[2] == 0
        # layer 0 sees the same inputs: exact; later layers differ by the fp16 storage of the
        # lossy cache's full-precision part (attention reads keys rounded to fp16)
        same = torch.equal if index == 0 else lambda a, b: torch.allclose(a.float(), b.float(), atol=2e-3)
        for row in range(2):
            assert same(layer.vis_low.keys[row], ref.keys[row][:, visual[row]].half())
            assert same(layer.vis_low.values[row], ref.values[row][:, visual[row]].half())
        text_tokens = layer.low.num_tokens + layer.high.num_tokens
        assert text_tokens == inputs["input_ids"].shape[1] - 16
        assert layer.low.bits == 2 and layer.high.bits == 4
        assert all(counts[1] == 0 for name in ("low", "high") for counts in layer.entry_counts[name])
    stats = cache.modality_stats()
    # fp16 visual tokens cost 16 bits per element and more; 4/2-bit text less, even though its
    # 8 tokens per row carry a whole quantization group's parameters
    head_dim, heads = 16, 2
    assert stats.bits_per_value("visual", head_dim, heads) >= 16
    assert stats.bits_per_value("text", head_dim, heads) < 12
    assert stats.bytes_held == cache.stats().bytes_held == held_bytes(cache)


def test_visual_salient_ratio_and_surplus_visual_tokens():
    """LLaVA-NeXT rows with different image sizes hold different numbers of image tokens: the
    visual tiers take the smaller count per row, the surplus goes to the text tiers, and the
    stats still count every visual token as visual."""
    model = tiny_vlm("llava_next")
    inputs = image_prompts("llava_next", image_sizes=((40, 48), (64, 32)))
    visual = token_modality(inputs["input_ids"], model.config) != TEXT
    per_row = visual.sum(dim=1).tolist()
    assert per_row[0] != per_row[1]
    cache = make_vlm_cache(
        "zipcache", model.config, inputs["input_ids"], attention_mask=inputs["attention_mask"],
        visual_high_bits=8, visual_low_bits=4, visual_salient_ratio=0.25,
    )
    greedy(model, inputs, cache, 3)
    v = min(per_row)
    surplus = max(per_row) - v
    for layer in cache.layers:
        assert (layer.vis_high.num_tokens, layer.vis_low.num_tokens) == (round(0.25 * v), v - round(0.25 * v))
        assert (layer.vis_high.bits, layer.vis_low.bits) == (8, 4)
        in_text_tiers = sum(counts[1] for name in ("low", "high") for counts in layer.entry_counts[name])
        assert in_text_tiers == surplus * 2  # entries: tokens x KV heads
    stats = cache.modality_stats()
    assert stats.tokens["visual"] == [sum(per_row)] * 2
    assert stats.high_fraction["visual"] == [round(0.25 * v) / v] * 2
    assert stats.bytes_held == cache.stats().bytes_held == held_bytes(cache)


def test_padded_row_matches_its_unpadded_run():
    model = tiny_vlm("llava")
    inputs = image_prompts("llava")
    pad = int((inputs["attention_mask"][1] == 0).sum())

    def run(batch):
        cache = make_vlm_cache("uniform", model.config, batch["input_ids"], attention_mask=batch["attention_mask"],
                               bits=4, visual_high_bits=2, visual_low_bits=2, stream_interval=4)
        return greedy(model, batch, cache, 10)

    alone = {
        "input_ids": inputs["input_ids"][1:, pad:],
        "attention_mask": inputs["attention_mask"][1:, pad:],
        "pixel_values": inputs["pixel_values"][1:],
    }
    assert torch.equal(run(inputs)[1, pad:], run(alone)[0])


def test_chunked_prefill_tags_each_chunk_by_its_positions():
    """Prompt in two forwards (image + text, then a text question on top of the cache): each
    layer takes the tags of the positions it stores, the question's tokens are text."""
    model = tiny_vlm("llava")
    inputs = image_prompts("llava")
    split = inputs["input_ids"].shape[1] - 3
    cache = make_vlm_cache("zipcache", model.config, inputs["input_ids"], attention_mask=inputs["attention_mask"],
                           visual_high_bits=8, visual_low_bits=8)
    with torch.no_grad():
        model(input_ids=inputs["input_ids"][:, :split], attention_mask=inputs["attention_mask"][:, :split],
              pixel_values=inputs["pixel_values"], **cache_kwargs(cache))
        assert all(layer.vis_low.num_tokens + layer.vis_high.num_tokens == 16 for layer in cache.layers)
        model(input_ids=inputs["input_ids"][:, split:], attention_mask=inputs["attention_mask"], **cache_kwargs(cache))
    stats = cache.modality_stats()
    assert stats.tokens["visual"] == [32, 32]
    assert stats.tokens["padding"] == [int((inputs["attention_mask"] == 0).sum())] * 2
    assert cache.tags.tags is None  # every layer has read the prompt's tags: the shared copy is gone
    for layer in cache.layers:
        assert layer.vis_low.num_tokens + layer.vis_high.num_tokens == 16  # the question went to text
        text = layer.low.num_tokens + layer.high.num_tokens + layer.keys.shape[2]  # tiers + fp16 part
        assert text == inputs["input_ids"].shape[1] - 16 and not layer.is_visual.any()


def test_zipvl_tau_picks_the_fewest_tokens_carrying_the_mass():
    """Probes attend (almost) only to 3 hot visual tokens: with tau = 0.9 exactly those 3 are
    important (high tier); the text group follows its own fixed ratio."""
    settings = VisualCompressionConfig(
        high_bits=4, low_bits=2, salient_ratio=0.5, probe_recent=1.0, probe_random=0.0, visual_high_bits=8,
        visual_low_bits=2, visual_salient_tau=0.9,
    )
    tags = ModalityTags(readers=1)
    modality = torch.zeros(1, 24, dtype=torch.int8)
    modality[0, 4:20] = IMAGE
    tags.set(modality)
    layer = VisualZipCacheLayer(settings, 0, tags)
    torch.manual_seed(0)
    keys = torch.randn(1, 1, 24, 8) * 0.1
    values = torch.randn(1, 1, 24, 8)
    hot = [6, 11, 17]
    keys[:, :, hot, 0] = 4.0
    query = torch.zeros(1, 1, 24, 8)
    query[..., 0] = 10.0
    layer.update(keys, values)
    layer.observe(query, None, 1.0)
    assert (layer.vis_high.num_tokens, layer.vis_low.num_tokens) == (3, 13)
    assert (layer.high.num_tokens, layer.low.num_tokens) == (4, 4)
    high_keys, _ = layer.vis_high.dequantize(torch.float32)
    assert torch.allclose(high_keys, keys[:, :, hot].float(), atol=0.05)


def test_zipvl_preset_reports_important_fractions():
    model = tiny_vlm("qwen2_vl")
    inputs = image_prompts("qwen2_vl")
    fractions = {}
    for tau in (0.5, 0.97):
        cache = make_vlm_cache("zipvl", model.config, inputs["input_ids"], attention_mask=inputs["attention_mask"],
                               salient_tau=tau, visual_salient_tau=tau)
        out = greedy(model, inputs, cache, 5)
        assert out.shape == (2, inputs["input_ids"].shape[1] + 5)
        fractions[tau] = cache.modality_stats().high_fraction
        assert cache.modality_stats().bytes_held == held_bytes(cache)
    for modality in ("text", "visual"):
        for low, high in zip(fractions[0.5][modality], fractions[0.97][modality]):
            assert 0 < low < high <= 1


def test_errors_name_the_parameter():
    model = tiny_vlm("llava")
    with pytest.raises(ValueError, match="method"):
        make_vlm_cache("nope", model.config)
    with pytest.raises(ValueError, match="visual_low_bits"):
        make_vlm_cache("zipcache", model.config, visual_low_bits=3)
    with pytest.raises(ValueError, match="visual_salient_ratio"):
        make_vlm_cache("zipcache", model.config, visual_salient_ratio=1.5)
    with pytest.raises(ValueError, match="salient_tau"):
        make_vlm_cache("zipvl", model.config, salient_tau=0.0)
    with pytest.raises(ValueError, match="visual_low_bits"):
        make_vlm_cache("zipcache", model.config, visual_high_bits=2, visual_low_bits=4)
    # no tags: a clear error at the first forward instead of silently treating images as text
    inputs = image_prompts("llava")
    with pytest.raises(RuntimeError, match="set_modality"):
        greedy(model, inputs, make_vlm_cache("zipcache", model.config), 2)
    with pytest.raises(ValueError, match="rows"):
        greedy(model, inputs, make_vlm_cache("uniform", model.config, torch.zeros(3, 5, dtype=torch.long)), 2)
