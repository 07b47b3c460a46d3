"""VidKV's 1.x-bit scheme: packing, the reference quantizers checked against a plain
per-element re-implementation, honest byte counts, and the preset inside a tiny VLM."""

import math

import pytest
import torch

from zipkv.vlm import make_vlm_cache
from zipkv.vlm.vidkv import (
    dequantize_keys_vidkv,
    dequantize_values_ternary,
    pack_bits,
    pack_trits,
    quantize_keys_vidkv,
    quantize_values_ternary,
    unpack_bits,
    unpack_trits,
)
from zipkv.vlm.vidkv_tier import VidKVTier


def test_bit_and_trit_packing_round_trip():
    g = torch.Generator().manual_seed(0)
    bits = torch.rand(3, 2, 40, generator=g) > 0.5
    assert pack_bits(bits).shape == (3, 2, 5)
    assert torch.equal(unpack_bits(pack_bits(bits)), bits)
    trits = torch.randint(-1, 2, (3, 2, 37), generator=g)
    packed = pack_trits(trits)
    assert packed.shape == (3, 2, 8) and packed.dtype == torch.uint8  # ceil(37 / 5)
    assert torch.equal(unpack_trits(packed, 37), trits.to(torch.int8))
    assert int(pack_trits(torch.ones(1, 5)).max()) == 242  # 3^5 - 1 fits a byte


def _keys_with_outlier_channels(b=2, h=2, n=20, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    spread = torch.ones(d)
    spread[torch.randperm(d, generator=g)[: d // 4]] = 8.0  # a few wide channels, as in real keys
    return (torch.randn(b, h, n, d, generator=g) * spread + torch.randn(d, generator=g)).half()


def _reference_keys(x, group):
    """Per (b, h): plain loops over channels and token groups, full complex FFT in float64."""
    b, h, n, d = x.shape
    out = torch.empty(b, h, n, d)
    for i in range(b):
        for j in range(h):
            xs = x[i, j].float()
            spread = xs.max(dim=0).values - xs.min(dim=0).values
            wide = sorted(spread.argsort(descending=True)[: d // 2].tolist())
            narrow = [c for c in range(d) if c not in wide]
            spectrum = torch.fft.fft(xs[:, narrow].double(), dim=-1)  # [n, d/2], Hermitian
            for start in range(0, n, group):
                rows = slice(start, min(start + group, n))
                for c in wide:
                    # the quantizer's documented rule: parameters rounded to fp16 first
                    lo = xs[rows, c].min().half().float()
                    step = ((xs[rows, c].max() - lo) / 3).half().float()
                    code = torch.round((xs[rows, c] - lo) / step).clamp(0, 3)
                    out[i, j, rows, c] = code * step + lo
                # each real and imaginary part becomes sign * its mean magnitude over the group
                block = spectrum[rows]
                re = torch.where(block.real >= 0, 1.0, -1.0) * block.real.abs().mean(dim=0)
                im = torch.sign(block.imag) * block.imag.abs().mean(dim=0)
                rebuilt = torch.fft.irfft(torch.complex(re, im)[:, : d // 4 + 1], n=d // 2, dim=-1)
                for k, c in enumerate(narrow):
                    out[i, j, rows, c] = rebuilt[:, k].float()
    return out


def test_keys_match_a_plain_reference():
    keys = _keys_with_outlier_channels()
    group = 8
    q = quantize_keys_vidkv(keys, group)
    n = keys.shape[2]
    token_group = (torch.arange(n) // group).to(torch.int32)
    token_block = torch.zeros(n, dtype=torch.int32)
    got = dequantize_keys_vidkv(**q, token_group=token_group, token_block=token_block)
    want = _reference_keys(keys, group)
    # parameters are stored in fp16: agreement to fp16 rounding of scales, not bit-exact
    assert torch.allclose(got, want, rtol=1e-3, atol=5e-4 * float(keys.float().abs().max()))
    # the 2-bit channels are exactly the widest-range half, per (b, h)
    mask = unpack_bits(q["channel_mask"])[:, :, 0]
    spread = keys.float().amax(dim=2) - keys.float().amin(dim=2)
    for i in range(2):
        for j in range(2):
            assert set(mask[i, j].nonzero().flatten().tolist()) == set(spread[i, j].topk(8).indices.tolist())


def test_values_match_a_plain_reference():
    g = torch.Generator().manual_seed(1)
    values = (torch.randn(2, 2, 13, 16, generator=g) * torch.linspace(0.2, 2, 16)).half()
    group = 5
    packed, alpha = quantize_values_ternary(values, group)
    n = values.shape[2]
    got = dequantize_values_ternary(packed, alpha, (torch.arange(n) // group).to(torch.int32), 16)
    want = torch.empty(values.shape)
    for start in range(0, n, group):
        x = values[:, :, start: start + group].float()
        m = x.abs().mean(dim=2, keepdim=True)
        code = torch.where(x.abs() > 0.5 * m, x.sign(), torch.zeros_like(x))
        a = (x.abs() * code.abs()).sum(dim=2, keepdim=True) / code.abs().sum(dim=2, keepdim=True).clamp_min(1)
        want[:, :, start: start + group] = code * a
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-4)
    # ternary is the paper's 1.58 bits; stored five per byte: 1.6 bits per value
    assert packed.shape[-1] == math.ceil(13 * 16 / 5)


def test_tier_bytes_are_what_it_holds_and_about_1_5_bits():
    d, n, group = 64, 96, 32
    tier = VidKVTier(group)
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(1, 2, n, d, generator=g).half()
    values = torch.randn(1, 2, n, d, generator=g).half()
    tier.append(keys[:, :, :64], values[:, :, :64])
    tier.append(keys[:, :, 64:], values[:, :, 64:])  # a second block: its own channel split
    assert tier.num_tokens == n
    rows = 1 * 2  # B * H
    groups = 2 + 1
    codes = rows * (n * d * 2 // 2 // 8 + n * d // 2 // 8)  # 2-bit half + 1-bit half
    params = rows * groups * (3 * (d // 2) + d) * 2  # wide scale/min, narrow scale, value alpha (fp16)
    masks = rows * 2 * d // 8
    trits = rows * (math.ceil(64 * d / 5) + math.ceil(32 * d / 5))
    bookkeeping = 4 * groups + 4 * 2
    assert tier.nbytes() == codes + params + masks + trits + bookkeeping
    assert 8 * codes / (rows * n * d) == 1.5  # keys: 2 bits on half the channels, 1 on the rest
    assert abs(8 * trits / (rows * n * d) - 1.6) < 0.01
    got_keys, got_values = tier.dequantize(torch.float32)
    assert got_keys.shape == got_values.shape == (1, 2, n, d)
    # the reference error of 1.x bits on Gaussian data: bounded, and better with wide channels at 2 bits
    assert ((got_keys - keys.float()).norm() / keys.float().norm()) < 0.6


def test_vidkv_preset_inside_a_vlm():
    pytest.importorskip("PIL")
    from zipkv.vlm.tiny import greedy, image_prompts, tiny_vlm

    model = tiny_vlm("qwen2_vl")
    inputs = image_prompts("qwen2_vl")
    cache = make_vlm_cache(
        "vidkv", model.config, inputs["input_ids"], attention_mask=inputs["attention_mask"], vidkv_group_size=8,
    )
    out = greedy(model, inputs, cache, 12, output_logits=True, return_dict_in_generate=True)
    assert all(torch.isfinite(step).all() for step in out.logits)
    n_visual = int((inputs["mm_token_type_ids"] == 1).sum(dim=1).min())
    for layer in cache.layers:
        assert isinstance(layer.vis_low, VidKVTier) and layer.vis_low.num_tokens == n_visual
        assert layer.vis_high.num_tokens == 0
    stats = cache.modality_stats()
    assert stats.bytes_held == cache.stats().bytes_held
    # visual tokens cost far less than text ones (2-4 bit ZipCache) per value, overheads included
    assert stats.bits_per_value("visual", 16, 2) < 0.8 * stats.bits_per_value("text", 16, 2)


def test_vidkv_needs_head_dim_multiple_of_16():
    pytest.importorskip("PIL")
    from zipkv.vlm.tiny import tiny_vlm

    model = tiny_vlm("llava", num_attention_heads=8, num_key_value_heads=2)  # head_dim 8
    with pytest.raises(ValueError, match="head_dim"):
        make_vlm_cache("vidkv", model.config)
    with pytest.raises(ValueError, match="vidkv_group_size"):
        VidKVTier(0)
