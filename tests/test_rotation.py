"""Randomized Hadamard rotation of the quantized tiers (zipkv.quant.rotation, CompressionConfig.rotation).

The fast transform against its explicit matrix, exact invertibility, the round trip through the
quantizers within their bound on inputs with outlier channels, rotated attention through the
packed kernel (Triton under TRITON_INTERPRET=1) against dequantize + un-rotate + attend, and a
tiny model: packed == dequantized path, static == eager tokens, bytes held == bytes reachable.
"""

import math

import pytest
import torch
from held_tensors import held_bytes
from tiny_models import generate_new_tokens, padded_batch, tiny_model

import zipkv
from zipkv.cache.layer import rotated_decode_attention
from zipkv.cache.tier import PackedTier
from zipkv.quant.rotation import HadamardRotation, fwht, hadamard_matrix
from zipkv.quant.schemes import (
    dequantize_keys_channelwise,
    dequantize_values_tokenwise,
    quantize_keys_channelwise,
    quantize_values_tokenwise,
)


def outlier_states(b=2, h=2, n=48, d=64, seed=0, outliers=(3, 17), scale=30.0):
    """Gaussian states [B, H, N, D] with a few channels `scale` times wider (as real keys have)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, n, d, generator=g)
    x[..., list(outliers)] *= scale
    return x


@pytest.mark.parametrize("d", [2, 16, 64, 128])
def test_fast_transform_equals_the_matrix_and_inverts_exactly(d):
    x = torch.randn(3, 2, 7, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
    h = hadamard_matrix(d)
    assert torch.allclose(h @ h.T, torch.eye(d, dtype=torch.float64), atol=1e-13)
    assert (fwht(x) - x @ h).abs().max() < 1e-12
    rot = HadamardRotation(2, d, seed=5, layer_idx=3, dtype=torch.float32)
    r = rot.matrices()  # [H, D, D]
    assert torch.allclose(r @ r.transpose(1, 2), torch.eye(d, dtype=torch.float64).expand(2, d, d), atol=1e-13)
    assert (rot.rotate(x) - torch.einsum("bhnd,hde->bhne", x, r)).abs().max() < 1e-12
    assert (rot.unrotate(rot.rotate(x)) - x).abs().max() < 1e-12
    # queries: GQA, query head i uses KV head i // 2
    q = torch.randn(3, 4, 1, d, dtype=torch.float64)
    assert (rot.rotate(q) - torch.einsum("bhnd,hde->bhne", q, r.repeat_interleave(2, 0))).abs().max() < 1e-12


def test_signs_differ_per_layer_and_head_and_follow_the_seed():
    a, b = HadamardRotation(2, 64, 0, 0), HadamardRotation(2, 64, 0, 1)
    assert not torch.equal(a.signs, b.signs) and not torch.equal(a.signs[0], a.signs[1])
    assert torch.equal(a.signs, HadamardRotation(2, 64, 0, 0).signs)
    assert set(a.signs.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("d", [80, 96, 0])
def test_non_power_of_two_head_dim_is_refused(d):
    with pytest.raises(ValueError, match="power of two"):
        HadamardRotation(2, d, 0, 0)


def test_settings_errors_name_rotation():
    with pytest.raises(ValueError, match="rotation must be None or one of"):
        zipkv.CompressionConfig(rotation="givens")
    with pytest.raises(ValueError, match="rotation applies to quantized tiers"):
        zipkv.CompressionConfig(high_bits=16, low_bits=16, rotation="hadamard")


def test_a_model_with_head_dim_20_says_so_at_its_first_forward():
    model = tiny_model("llama", hidden_size=80)  # 4 heads of 20
    ids, mask = padded_batch(length=12, pad=0, batch=1)
    with pytest.raises(ValueError, match="power of two.*got 20"):
        generate_new_tokens(model, zipkv.make_cache("zipkv", model.config, rotation="hadamard"), ids, mask, 2)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bits", [2, 4])
def test_round_trip_within_the_quantizer_bound(d, bits):
    """Rotate, quantize, dequantize, un-rotate: per token the L2 error is at most the one of the
    codes in the rotated basis (R is orthonormal), whose elements are off by at most step / 2."""
    x = outlier_states(d=d, seed=bits)
    rot = HadamardRotation(2, d, seed=0, layer_idx=0, dtype=torch.float32)
    xr = rot.rotate(x)
    # keys, channelwise: step per (group, channel)
    packed, scale, minimum, _ = quantize_keys_channelwise(xr, bits, None)
    keys = rot.unrotate(dequantize_keys_channelwise(packed, scale, minimum, torch.zeros(x.shape[2], dtype=torch.int32), bits))
    bound = (scale.float() / 2).pow(2).sum(-1).sqrt()  # [B, H, 1]
    assert ((keys - x).norm(dim=-1) <= bound * (1 + 1e-3) + 1e-5).all()
    # values, channel-separable tokenwise: step per token, times the channel factor
    packed, scale, minimum, channel = quantize_values_tokenwise(xr, bits, None, True)
    chunk = torch.zeros(x.shape[2], dtype=torch.int32)
    values = rot.unrotate(dequantize_values_tokenwise(packed, scale, minimum, channel, chunk, bits))
    bound = (scale.float() / 2 * channel.float()).pow(2).sum(-1).sqrt()  # [B, H, N]
    assert ((values - x).norm(dim=-1) <= bound * (1 + 1e-3) + 1e-5).all()


def test_rotation_narrows_tokenwise_ranges_of_outlier_channels():
    """What the rotation is for: outlier channels spread over all channels, so plain tokenwise
    2-bit quantization (no channel factors) loses much less."""
    x = outlier_states(d=128)
    rot = HadamardRotation(2, 128, seed=0, layer_idx=0, dtype=torch.float32)
    chunk = torch.zeros(x.shape[2], dtype=torch.int32)

    def error(states, back):
        q = quantize_values_tokenwise(states, 2, None, False)
        return (back(dequantize_values_tokenwise(*q, chunk, 2)) - x).norm()

    assert error(rot.rotate(x), rot.unrotate) < 0.5 * error(x, lambda y: y)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_rotated_attention_through_the_packed_kernel_equals_the_reference(d, impl):
    """The kernel reads rotated codes with q R and the output is un-rotated; the reference
    dequantizes, un-rotates the cache and attends in float64."""
    torch.manual_seed(d)
    b, hkv, hq, n, nf = 2, 2, 4, 40, 5
    keys, values = outlier_states(b, hkv, n, d, seed=1), outlier_states(b, hkv, n, d, seed=2, outliers=(5,))
    rot = HadamardRotation(hkv, d, seed=0, layer_idx=1, dtype=torch.float16)
    tier = PackedTier(4, 16, None, True, value_bits=2)
    tier.append(rot.rotate(keys), rot.rotate(values))
    k_fp, v_fp = torch.randn(b, hkv, nf, d), torch.randn(b, hkv, nf, d)
    q = torch.randn(b, hq, 1, d)
    out = rotated_decode_attention(rot, q, [tier], k_fp, v_fp, scale=d ** -0.5, impl=impl)

    kt, vt = tier.dequantize(torch.float64)
    k_all = torch.cat([rot.unrotate(kt), k_fp.double()], 2).repeat_interleave(2, 1)
    v_all = torch.cat([rot.unrotate(vt), v_fp.double()], 2).repeat_interleave(2, 1)
    p = torch.softmax(q.double() @ k_all.transpose(-1, -2) / math.sqrt(d), -1)
    expected = p @ v_all
    assert out.shape == (b, hq, 1, d)
    # the Triton kernel keeps fp16 in places (the kernel tests' bound); the reference is float32
    assert (out.double() - expected).norm() / expected.norm() < (3e-3 if impl == "triton" else 1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_tiny_model_packed_equals_dequantized_and_static_equals_eager(arch):
    model = tiny_model(arch)
    ids, mask = padded_batch(length=40, pad=6)
    settings = dict(rotation="hadamard", stream_interval=8, residual_length=4)
    packed = zipkv.make_cache("zipkv", model.config, decode_path="packed", **settings)
    tokens = generate_new_tokens(model, packed, ids, mask, 10)
    dequantized = zipkv.make_cache("zipkv", model.config, decode_path="dequantize", **settings)
    assert torch.equal(generate_new_tokens(model, dequantized, ids, mask, 10), tokens)
    assert packed.stats().bytes_held == held_bytes(packed)
    full = [layer for layer in packed.layers if hasattr(layer, "rotation")]
    assert full and all(layer.rotation is not None for layer in full)
    windows = [layer for layer in packed.layers if hasattr(layer, "inner")]
    assert all(layer.inner.rotation is None for layer in windows)  # window layers stay unrotated
    static = zipkv.make_cache("zipkv", model.config, decode_path="packed", **settings)
    with torch.no_grad():
        assert torch.equal(zipkv.greedy_decode(model, static, ids, mask, max_new_tokens=10, cuda_graph=False), tokens)
    assert static.stats().bytes_held == held_bytes(static)
