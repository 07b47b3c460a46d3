"""Fuzzing the quantizer, the bit packing, the K/V schemes and every storage tier (hypothesis,
the fixed-seed "ci" profile of conftest.py).

The round-trip bound, derived from the quantizer (zipkv/quant/quantizer.py). A group with
range [lo, hi] stores min_s = lo rounded to the parameter dtype and scale_s = (hi - min_s) /
levels rounded (floored at the dtype's smallest normal for a constant group). Its codes
reconstruct the grid min_s + k * scale_s, k = 0..levels, so for every x of the group

    |x - deq(q(x))| <= max(scale_s / 2,                       # inside the grid: rounding
                           |min_s - lo|,                      # below it: min's rounding
                           levels * |scale_s - (hi - min_s) / levels|)  # above it: scale's
                       + 4 eps_fp32 (|x| + |min_s| + levels * scale_s)  # float32 arithmetic

i.e. half a step plus what rounding the parameters to their 16-bit dtype costs. With
channel-separable values (x quantized as x / c, multiplied back by c_s = c rounded) the bound
is bound(x / c) * c_s + |x / c| * |c - c_s|.
"""

import math

import pytest
import torch
from hypothesis import given, strategies as st

from zipkv.cache.tier import PackedTier
from zipkv.quant.packing import pack, packed_width, unpack
from zipkv.quant.quantizer import FP16_MAX, dequantize, quantize
from zipkv.quant.schemes import (
    channel_factors,
    dequantize_keys_channelwise,
    dequantize_values_tokenwise,
    quantize_keys_channelwise,
    quantize_values_tokenwise,
)
from zipkv.vlm.vidkv import wide_channel_mask
from zipkv.vlm.vidkv_tier import VidKVTier

EPS32 = torch.finfo(torch.float32).eps
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# What a group of states can look like: ordinary, one constant channel, one huge outlier
# channel, subnormal magnitudes, values at the fp16 limit, a whole tensor constant.
KINDS = ("normal", "constant_channel", "outlier_channel", "subnormal", "fp16_limit", "all_constant")


def make_states(seed: int, shape, dtype: torch.dtype, kind: str, outlier: float = 1e4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = 10.0 ** float(torch.randint(-3, 3, (1,), generator=gen))
    x = torch.randn(*shape, generator=gen) * scale
    channel = int(torch.randint(0, shape[-1], (1,), generator=gen))
    if kind == "constant_channel":
        x[..., channel] = float(torch.randn(1, generator=gen)) * scale
    elif kind == "outlier_channel":
        x[..., channel] *= outlier
    elif kind == "subnormal":  # below the smallest normal of the dtype (fp16: 6.1e-5; fp32 / bf16: 1.2e-38)
        x = torch.randn(*shape, generator=gen) * (1e-6 if dtype == torch.float16 else 1e-39)
    elif kind == "fp16_limit":
        x = torch.rand(*shape, generator=gen) * 2 * FP16_MAX - FP16_MAX
        x[..., channel] = FP16_MAX
        x.view(-1)[:1] = -FP16_MAX
    elif kind == "all_constant":
        x = torch.full(shape, float(torch.randn(1, generator=gen)) * scale)
    if dtype == torch.float16:
        x = x.clamp(-FP16_MAX, FP16_MAX)
    return x.to(dtype)


def step_bound(x, lo, hi, scale, minimum, levels):
    """The bound of the module docstring, elementwise; every argument broadcasts to x (float32)."""
    scale, minimum = scale.float(), minimum.float()
    bound = torch.maximum(scale / 2, (minimum - lo).abs())
    bound = torch.maximum(bound, levels * (scale - (hi - minimum) / levels).abs())
    return bound + 4 * EPS32 * (x.abs() + minimum.abs() + levels * scale)


def group_range(x, index, groups: int, dim: int):
    """(lo, hi) of x over the groups `index` [n] of axis `dim`, gathered back to x's shape."""
    shape = list(x.shape)
    shape[dim] = groups
    view = [1] * x.dim()
    view[dim] = -1
    idx = index.long().reshape(view).expand_as(x)
    lo = x.new_zeros(shape).scatter_reduce(dim, idx, x, "amin", include_self=False).gather(dim, idx)
    hi = x.new_zeros(shape).scatter_reduce(dim, idx, x, "amax", include_self=False).gather(dim, idx)
    return lo, hi


def assert_within(x, deq, bound, what):
    err = (x - deq.float()).abs()
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), (
        f"{what}: |x - deq| = {float(err.view(-1)[worst]):.6g} > bound {float(bound.view(-1)[worst]):.6g} "
        f"at x = {float(x.view(-1)[worst]):.6g}")


shapes = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 40), st.sampled_from([8, 16, 32]))


# -- quantizer ----------------------------------------------------------------------------------
@given(seed=st.integers(0, 2**31 - 1), shape=shapes, dtype=st.sampled_from(DTYPES), kind=st.sampled_from(KINDS),
       bits=st.sampled_from([2, 4, 8]), dims=st.sampled_from([2, 3, (2, 3)]))
def test_quantize_round_trip_within_step_bound(seed, shape, dtype, kind, bits, dims):
    x = make_states(seed, shape, dtype, kind)
    codes, scale, minimum = quantize(x, bits, dims)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape and int(codes.max()) < 2 ** bits
    assert scale.dtype == minimum.dtype and bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    xf = x.float()
    lo, hi = xf.amin(dim=dims, keepdim=True), xf.amax(dim=dims, keepdim=True)
    assert_within(xf, dequantize(codes, scale, minimum), step_bound(xf, lo, hi, scale, minimum, 2 ** bits - 1),
                  f"{dtype} {kind} {bits}-bit")


@given(seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(DTYPES), bad=st.sampled_from(["nan", "inf", "-inf"]))
def test_quantize_rejects_nan_and_inf(seed, dtype, bad):
    x = make_states(seed, (1, 2, 8, 16), dtype, "normal")
    x.view(-1)[seed % x.numel()] = float(bad)
    with pytest.raises(ValueError, match="cannot quantize keys that contain NaN or inf"):
        quantize(x, 4, 2, name="keys")


# -- packing ------------------------------------------------------------------------------------
@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from([2, 4, 8]), lead=st.integers(0, 3),
       width=st.integers(1, 12))
def test_pack_unpack_round_trip_is_exact(seed, bits, lead, width):
    dim = width * (8 // bits)
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (2, lead, 3, dim), generator=gen, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (*codes.shape[:-1], packed_width(dim, bits))
    assert unpack(packed, bits).equal(codes)


@given(bits=st.sampled_from([2, 4]), dim=st.integers(1, 40))
def test_pack_refuses_a_width_it_cannot_pack(bits, dim):
    if dim % (8 // bits) == 0:
        return
    with pytest.raises(ValueError, match=f"multiple of {8 // bits}"):
        pack(torch.zeros(1, dim, dtype=torch.uint8), bits)


# -- schemes ------------------------------------------------------------------------------------
@given(seed=st.integers(0, 2**31 - 1), shape=shapes, dtype=st.sampled_from(DTYPES), kind=st.sampled_from(KINDS),
       bits=st.sampled_from([2, 4, 8]), group=st.one_of(st.none(), st.integers(1, 48)))
def test_channelwise_keys_within_step_bound(seed, shape, dtype, kind, bits, group):
    """Key groups of `group` tokens, the last one partial when group does not divide N."""
    keys = make_states(seed, shape, dtype, kind)
    packed, scale, minimum, n_groups = quantize_keys_channelwise(keys, bits, group)
    n = shape[2]
    assert n_groups == math.ceil(n / (group or n)) and scale.shape == (*shape[:2], n_groups, shape[3])
    token_group = torch.arange(n) // (group or n)
    deq = dequantize_keys_channelwise(packed, scale, minimum, token_group, bits)
    x = keys.float()
    lo, hi = group_range(x, token_group, n_groups, dim=2)
    bound = step_bound(x, lo, hi, scale[:, :, token_group.long()], minimum[:, :, token_group.long()], 2 ** bits - 1)
    assert_within(x, deq, bound, f"keys {dtype} {kind} {bits}-bit group {group}")


def value_bound(values, scale, minimum, channel, group: int, bits: int):
    """The bound for tokenwise values in groups of `group` channels (channel-separable when
    `channel` holds the stored factors); values [B, H, N, D] of one quantization event."""
    d = values.shape[-1]
    x = values.float()
    c = channel_factors(values) if channel is not None else torch.ones_like(x[:, :, :1])
    scaled = x / c
    grouped = scaled.reshape(*x.shape[:3], d // group, group)
    lo = grouped.amin(-1, keepdim=True).expand_as(grouped).reshape(x.shape)
    hi = grouped.amax(-1, keepdim=True).expand_as(grouped).reshape(x.shape)
    per_channel = (scale.repeat_interleave(group, -1), minimum.repeat_interleave(group, -1))
    bound = step_bound(scaled, lo, hi, *per_channel, 2 ** bits - 1)
    if channel is None:
        return bound
    stored = channel.float()
    return bound * stored + scaled.abs() * (c - stored).abs() + 4 * EPS32 * x.abs()


@given(seed=st.integers(0, 2**31 - 1), shape=shapes, dtype=st.sampled_from(DTYPES), kind=st.sampled_from(KINDS),
       bits=st.sampled_from([2, 4, 8]), groups=st.sampled_from([1, 2, 4]), separable=st.booleans())
def test_tokenwise_values_within_step_bound(seed, shape, dtype, kind, bits, groups, separable):
    values = make_states(seed, shape, dtype, kind)
    group = shape[3] // groups
    packed, scale, minimum, channel = quantize_values_tokenwise(values, bits, group, separable)
    n = shape[2]
    deq = dequantize_values_tokenwise(packed, scale, minimum, channel, torch.zeros(n, dtype=torch.int32), bits)
    assert_within(values.float(), deq, value_bound(values, scale, minimum, channel, group, bits),
                  f"values {dtype} {kind} {bits}-bit groups {groups} separable {separable}")


@given(seed=st.integers(0, 2**31 - 1), bad=st.sampled_from(["nan", "inf"]), separable=st.booleans())
def test_schemes_reject_nan_and_inf_naming_keys_or_values(seed, bad, separable):
    states = make_states(seed, (1, 2, 6, 16), torch.float32, "normal")
    states.view(-1)[seed % states.numel()] = float(bad)
    with pytest.raises(ValueError, match="cannot quantize keys that contain NaN or inf"):
        quantize_keys_channelwise(states, 4, None)
    with pytest.raises(ValueError, match="cannot quantize values that contain NaN or inf"):
        quantize_values_tokenwise(states, 4, None, separable)


# -- every storage tier ---------------------------------------------------------------------------
tier_settings = st.fixed_dictionaries(dict(
    bits=st.sampled_from([2, 4, 8]), value_bits=st.sampled_from([None, 2, 4, 8]),
    key_group_size=st.one_of(st.none(), st.integers(1, 24)), value_groups=st.sampled_from([None, 1, 2]),
    channel_separable=st.booleans(), front_partial_group=st.booleans(),
))


@given(seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(DTYPES), kind=st.sampled_from(KINDS),
       settings=tier_settings, appends=st.lists(st.integers(0, 30), min_size=1, max_size=3),
       heads=st.integers(1, 3), dim=st.sampled_from([8, 16, 32]))
def test_packed_tier_round_trip_within_step_bound(seed, dtype, kind, settings, appends, heads, dim):
    """A PackedTier (every 2/4/8-bit scheme, mixed key / value widths, front partial groups)
    over several appends: its dequantized keys and values are within the step bound of the
    group each token was quantized in."""
    groups = settings.pop("value_groups")
    tier = PackedTier(value_group_size=None if groups is None else dim // groups, **settings)
    blocks = [make_states(seed + i, (2, heads, n, dim), dtype, kind) for i, n in enumerate(appends)]
    for block in blocks:
        tier.append(block, -block)
    n = sum(appends)
    assert tier.num_tokens == n
    if n == 0:
        return
    keys_deq, values_deq = tier.dequantize(torch.float32)
    assert keys_deq.shape == values_deq.shape == (2, heads, n, dim)
    keys = torch.cat(blocks, dim=2).float()
    token_group = tier.token_group.long()
    lo, hi = group_range(keys, token_group, tier.k_scale.shape[2], dim=2)
    bound = step_bound(keys, lo, hi, tier.k_scale[:, :, token_group], tier.k_min[:, :, token_group], 2 ** tier.bits - 1)
    assert_within(keys, keys_deq, bound, f"tier keys {dtype} {kind} {tier.bits}-bit {settings}")
    start = 0
    for chunk, block in enumerate(b for b in blocks if b.shape[2]):  # each append: one value event
        end = start + block.shape[2]
        channel = None if tier.v_channel is None else tier.v_channel[:, :, chunk:chunk + 1]
        bound = value_bound(-block, tier.v_scale[:, :, start:end], tier.v_min[:, :, start:end], channel,
                            tier.value_group_size or dim, tier.value_bits)
        assert_within(-block.float(), values_deq[:, :, start:end], bound, f"tier values {dtype} {kind} {settings}")
        start = end


def rfft_half(x):
    """The half spectrum VidKV binarizes: Re(0..L/2), Im(1..L/2-1) of the real FFT over channels."""
    spectrum = torch.fft.rfft(x.float(), dim=-1)
    return torch.cat([spectrum.real, spectrum.imag[..., 1:-1]], dim=-1)


@given(seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(DTYPES), kind=st.sampled_from(KINDS),
       group=st.integers(1, 24), appends=st.lists(st.integers(0, 30), min_size=1, max_size=3),
       dim=st.sampled_from([16, 32]))
def test_vidkv_tier_round_trip(seed, dtype, kind, group, appends, dim):
    """VidKVTier (1.x bits, not a uniform grid): the wide channels are 2-bit channelwise, within
    the step bound; the narrow channels' half spectrum keeps every component's sign; ternary
    values never flip sign and never exceed their (channel, group)'s largest magnitude."""
    tier = VidKVTier(group)
    blocks = [make_states(seed + i, (1, 2, n, dim), dtype, kind) for i, n in enumerate(appends)]
    for block in blocks:
        tier.append(block, block)
    n = sum(appends)
    assert tier.num_tokens == n
    if n == 0:
        return
    keys_deq, values_deq = tier.dequantize(torch.float32)
    assert bool(torch.isfinite(keys_deq).all()) and bool(torch.isfinite(values_deq).all())
    start = 0
    for block in (b for b in blocks if b.shape[2]):
        end, x = start + block.shape[2], block.float()
        k_deq, v_deq = keys_deq[:, :, start:end], values_deq[:, :, start:end]
        wide = wide_channel_mask(block)[:, :, None, :].expand_as(x)
        local = torch.arange(end - start) // group
        lo, hi = group_range(x, local, int(local.max()) + 1, dim=2)
        grid = torch.arange(start, end)
        scale = torch.zeros_like(x)
        minimum = torch.zeros_like(x)
        scale[wide] = tier.wide_scale[:, :, tier.token_group[grid].long()].float().reshape(-1)
        minimum[wide] = tier.wide_min[:, :, tier.token_group[grid].long()].float().reshape(-1)
        bound = step_bound(x, lo, hi, scale, minimum, 3)
        assert_within(x[wide], k_deq[wide], bound[wide], f"vidkv wide keys {dtype} {kind}")
        narrow = ~wide[:, :, 0]
        y = rfft_half(x.transpose(2, 3)[narrow].reshape(*x.shape[:2], dim // 2, -1).transpose(2, 3))
        y_deq = rfft_half(k_deq.transpose(2, 3)[narrow].reshape(*x.shape[:2], dim // 2, -1).transpose(2, 3))
        # away from 0 on both sides, where float noise picks the sign (a magnitude stored as 0
        # comes back as FFT round-off)
        clear = (y.abs() > 1e-3 * y.abs().amax().clamp_min(1e-30)) & (y_deq.abs() > 1e-3 * y_deq.abs().amax().clamp_min(1e-30))
        # a magnitude below the parameter dtype's range is stored as 0: the sign is then lost, never flipped
        assert bool((torch.sign(y_deq) * torch.sign(y))[clear].ge(0).all()), f"vidkv narrow signs {dtype} {kind}"
        assert bool((v_deq * x >= 0).all()), f"vidkv values flipped a sign {dtype} {kind}"
        largest = group_range(x.abs(), local, int(local.max()) + 1, dim=2)[1]
        # alpha is a mean of magnitudes, stored in fp16 / bf16 (relative rounding <= 2^-8, and
        # 2^-24 absolute: fp16's subnormal spacing)
        assert bool((v_deq.abs() <= largest * (1 + 2 ** -7) + 2 ** -24).all()), f"vidkv values too large {dtype} {kind}"
        start = end


@pytest.mark.parametrize("which", ["keys", "values"])
def test_tiers_reject_nan_naming_keys_or_values(which):
    good = make_states(0, (1, 2, 8, 16), torch.float32, "normal")
    bad = good.clone()
    bad[0, 1, 3, 5] = float("nan")
    keys, values = (bad, good) if which == "keys" else (good, bad)
    for tier in (PackedTier(4, None, None, True), VidKVTier(4)):
        with pytest.raises(ValueError, match=f"cannot quantize {which} that contain NaN or inf"):
            tier.append(keys, values)
