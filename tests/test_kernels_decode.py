"""Decode attention kernel (Triton, under its CPU interpreter) vs the float32 reference.

Segments are built with zipkv.quant (the lead's quantizer), so these tests also pin the
packed layout the kernel reads to the one the cache writes.
"""

import pytest
import torch

from triton_mode import interpreter_module_mark

pytestmark = interpreter_module_mark()  # Triton's interpreter; skipped in a compiled GPU session

from zipkv.kernels.decode_attention import decode_attention, decode_attention_reference  # noqa: E402
from zipkv.kernels.packed import PackedSegment, dequantize_segment  # noqa: E402
from packed_segments import in_capacity, make_segment, rel_err  # noqa: E402


def test_segment_dequantization_matches_quant_module():
    from zipkv.quant.schemes import dequantize_keys_channelwise, dequantize_values_tokenwise

    g = torch.Generator().manual_seed(1)
    seg = make_segment(1, 2, 40, 32, 4, key_group=16, value_group=None, cs=True, pieces=2, gen=g)
    k, v = dequantize_segment(seg)
    k2 = dequantize_keys_channelwise(seg.k_codes, seg.k_scale, seg.k_min, seg.token_group, 4)
    v2 = dequantize_values_tokenwise(seg.v_codes, seg.v_scale, seg.v_min, seg.v_channel, seg.token_chunk, 4)
    torch.testing.assert_close(k, k2)
    torch.testing.assert_close(v, v2)


@pytest.mark.parametrize("bits,value_bits", [(4, 2), (2, 4), (8, 2)])
@pytest.mark.parametrize("cs,value_group", [(True, None), (False, 16)])
def test_segment_with_value_bits_dequantizes_like_quant_module(bits, value_bits, cs, value_group):
    """Keys and values of different widths: the reference unpacks each with its own width."""
    from zipkv.cache.tier import PackedTier
    from zipkv.kernels.packed import as_segment, validate_segment
    from zipkv.quant.schemes import dequantize_keys_channelwise, dequantize_values_tokenwise

    g = torch.Generator().manual_seed(bits * 10 + value_bits)
    d = 64
    seg = make_segment(2, 2, 40, d, bits, key_group=16, value_group=value_group, cs=cs, pieces=2, gen=g,
                       value_bits=value_bits)
    assert seg.v_codes.shape[-1] == d * value_bits // 8 and seg.head_dim == d
    validate_segment(seg, 2, 2, d)
    k, v = dequantize_segment(seg)
    k2 = dequantize_keys_channelwise(seg.k_codes, seg.k_scale, seg.k_min, seg.token_group, bits)
    v2 = dequantize_values_tokenwise(seg.v_codes, seg.v_scale, seg.v_min, seg.v_channel, seg.token_chunk, value_bits)
    torch.testing.assert_close(k, k2)
    torch.testing.assert_close(v, v2)
    # the cache's PackedTier carries its value width into the segment
    tier = PackedTier(bits, 16, value_group, cs, value_bits)
    tier.append(torch.randn(2, 2, 24, d, generator=g).half(), torch.randn(2, 2, 24, d, generator=g).half())
    tier_seg = as_segment(tier)
    assert (tier_seg.bits, tier_seg.value_bits) == (bits, value_bits)
    validate_segment(tier_seg, 2, 2, d)
    for got, want in zip(dequantize_segment(tier_seg), tier.dequantize(torch.float32)):
        torch.testing.assert_close(got, want)
    # a segment whose v_codes do not have the value width is refused
    with pytest.raises(ValueError, match="v_codes"):
        validate_segment(PackedSegment(bits, seg.k_codes, seg.k_scale, seg.k_min, seg.token_group, seg.v_codes,
                                       seg.v_scale, seg.v_min, seg.v_channel, seg.token_chunk), 2, 2, d)


@pytest.mark.parametrize(
    "d,low,high,tq,nf",
    [
        (64, dict(bits=2, cs=True, pieces=2), dict(bits=4, key_group=32, value_group=32, cs=False), 1, 20),
        (128, dict(bits=2, key_group=32, value_group=32, cs=False), dict(bits=8, cs=True, pieces=3), 2, 9),
        (64, dict(bits=4, value_group=16, cs=False, pieces=3), None, 3, 0),
        # key groups of 4 tokens: a 32-token block spans more than two groups (general path)
        (64, dict(bits=4, key_group=4, cs=True, pieces=2), dict(bits=2, key_group=8, cs=False), 1, 5),
    ],
)
@pytest.mark.parametrize("dequant", [False, True])  # v5 / v6 (fp16 dequantization before the dots)
def test_decode_matches_reference(d, low, high, tq, nf, dequant):
    g = torch.Generator().manual_seed(d + tq)
    b, hkv, r = 2, 2, 3
    segs = [make_segment(b, hkv, 70, d, gen=g, **low)]
    if high is not None:
        segs.append(make_segment(b, hkv, 45, d, gen=g, **high))
    kf = torch.randn(b, hkv, nf, d, generator=g).half() if nf else None
    vf = torch.randn(b, hkv, nf, d, generator=g).half() if nf else None
    q = torch.randn(b, hkv * r, tq, d, generator=g).half()
    ref = decode_attention_reference(q, segs, kf, vf, causal=tq > 1)
    out = decode_attention(q, segs, kf, vf, causal=tq > 1, impl="triton", block_n=32, block_n_fp=16, dequant=dequant)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert rel_err(out, ref) < 3e-3


@pytest.mark.parametrize(
    "d,tier,other,tq",
    [
        # the zipkv preset's tier: 4-bit keys, 2-bit channel-separable values
        (64, dict(bits=4, value_bits=2, key_group=24, cs=True, pieces=2), dict(bits=2, value_group=32, cs=False), 1),
        (64, dict(bits=2, value_bits=4, value_group=16, cs=False, pieces=2), dict(bits=4, value_bits=2, cs=True), 3),
        (64, dict(bits=8, value_bits=2, key_group=32, value_group=32, cs=False), dict(bits=8, cs=True), 3),
        # 2-bit values in 16-channel groups at D=128: two value units per plane
        (128, dict(bits=4, value_bits=2, value_group=16, cs=False, pieces=2), None, 1),
    ],
)
@pytest.mark.parametrize("dequant", [False, True])  # v5 / v6 (fp16 dequantization before the dots)
def test_decode_keys_and_values_of_different_bits(d, tier, other, tq, dequant):
    """A tier whose keys and values have different widths, next to a tier of other widths in
    the same launch, GQA, an fp16 part, a padding mask (with per-row limits and causal for Tq > 1)."""
    g = torch.Generator().manual_seed(d + tq + tier["bits"] * 10 + tier["value_bits"])
    b, hkv, r, nf = 2, 2, 3, 11
    segs = [make_segment(b, hkv, 70, d, gen=g, **tier)]
    if other is not None:
        segs.append(make_segment(b, hkv, 45, d, gen=g, **other))
    kf = torch.randn(b, hkv, nf, d, generator=g).half()
    vf = torch.randn(b, hkv, nf, d, generator=g).half()
    q = torch.randn(b, hkv * r, tq, d, generator=g).half()
    nt = sum(s.num_tokens for s in segs) + nf
    keep = torch.ones(b, tq, nt, dtype=torch.bool)
    keep[1, :, :23] = False  # left padding of row 1
    keep[0, 0, nt - 4:] = False  # a per-row limit
    for mask in (keep[:, :1, :], keep):
        ref = decode_attention_reference(q, segs, kf, vf, mask=mask, causal=tq > 1)
        out = decode_attention(q, segs, kf, vf, mask=mask, causal=tq > 1, impl="triton", block_n=32,
                               block_n_fp=16, dequant=dequant)
        assert out.shape == ref.shape and out.dtype == q.dtype
        assert rel_err(out, ref) < 3e-3


def test_value_bits_too_narrow_for_the_kernel_is_refused():
    """2-bit values at D=32 make 8-byte rows: the kernel refuses them (auto falls back)."""
    from zipkv.kernels._triton_decode import supported

    g = torch.Generator().manual_seed(2)
    seg = make_segment(1, 1, 20, 32, 8, value_bits=2, gen=g)
    q = torch.randn(1, 2, 1, 32, generator=g).half()
    assert "value" in supported(q, [seg])
    with pytest.raises(ValueError, match="value_group"):
        decode_attention(q, [seg], impl="triton")


@pytest.mark.parametrize("dequant", [False, True])  # v5 / v6 (fp16 dequantization before the dots)
def test_decode_value_chunks_finer_than_key_groups(dequant):
    """Channel-factor chunks that cut through key groups (the per-chunk slow path)."""
    g = torch.Generator().manual_seed(11)
    seg = make_segment(2, 2, 90, 64, 4, cs=True, pieces=1, gen=g)
    seg.token_chunk = (torch.arange(90) // 7).int()
    seg.v_channel = torch.rand(2, 2, 13, 64, generator=g).half() + 0.5
    q = torch.randn(2, 8, 1, 64, generator=g).half()
    ref = decode_attention_reference(q, [seg])
    out = decode_attention(q, [seg], impl="triton", block_n=32, dequant=dequant)
    assert rel_err(out, ref) < 3e-3


@pytest.mark.parametrize("dequant", [False, True])  # v5 / v6 (fp16 dequantization before the dots)
def test_decode_masks_and_bf16(dequant):
    """Left padding as a bool mask, the same as an additive mask, per-query-row masks; bf16."""
    g = torch.Generator().manual_seed(7)
    b, hkv, r, d, tq = 3, 1, 4, 64, 2
    segs = [make_segment(b, hkv, 50, d, 4, dtype=torch.bfloat16, gen=g), make_segment(b, hkv, 30, d, 2, dtype=torch.bfloat16, gen=g)]
    kf = torch.randn(b, hkv, 6, d, generator=g).bfloat16()
    vf = torch.randn(b, hkv, 6, d, generator=g).bfloat16()
    nt = 86
    q = torch.randn(b, hkv * r, tq, d, generator=g).bfloat16()
    keep = torch.ones(b, nt, dtype=torch.bool)
    keep[1, :37] = False  # left padding, crossing the first tier's end
    keep[2, :70] = False
    additive = torch.zeros(b, nt).masked_fill(~keep, torch.finfo(torch.float32).min)
    rows = keep[:, None, :].repeat(1, tq, 1)
    rows[0, 0, 80:] = False  # a per-row mask (4-D, HF style)
    for mask in (keep, additive, rows[:, None]):
        ref = decode_attention_reference(q, segs, kf, vf, mask=mask)
        out = decode_attention(q, segs, kf, vf, mask=mask, impl="triton", block_n=32, block_n_fp=16, dequant=dequant)
        assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("dequant", [False, True])  # v5 / v6 (fp16 dequantization before the dots)
def test_decode_splits_and_fully_masked_rows(dequant):
    """Many splits (merge path) and a batch row that attends nothing (output 0, no NaN)."""
    g = torch.Generator().manual_seed(3)
    b, hkv, r, d = 2, 2, 2, 32
    segs = [make_segment(b, hkv, 300, d, 4, key_group=32, gen=g, pieces=4)]
    q = torch.randn(b, hkv * r, 1, d, generator=g).half()
    keep = torch.ones(b, 300, dtype=torch.bool)
    keep[1] = False
    ref = decode_attention_reference(q, segs, mask=keep)
    out = decode_attention(q, segs, mask=keep, impl="triton", block_n=32, programs_per_sm=8, dequant=dequant)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert rel_err(out[0], ref[0]) < 3e-3


def test_cpu_auto_falls_back_to_reference_and_validates():
    g = torch.Generator().manual_seed(5)
    segs = [make_segment(1, 1, 10, 32, 4, gen=g)]
    q = torch.randn(1, 2, 1, 32, generator=g).half()
    torch.testing.assert_close(decode_attention(q, segs), decode_attention_reference(q, segs))
    with pytest.raises(ValueError, match="impl"):
        decode_attention(q, segs, impl="cuda")
    with pytest.raises(ValueError, match="mask"):
        decode_attention(q, segs, mask=torch.ones(1, 11, dtype=torch.bool))


@pytest.mark.parametrize("dequant", [False, True])  # v5 / v6 (fp16 dequantization before the dots)
def test_decode_one_launch_per_tier_three_tiers(dequant):
    """Three tiers (two launches by default, three with tiers_per_launch=1), blocks that
    straddle key groups of 24 tokens and channel-factor chunks."""
    g = torch.Generator().manual_seed(13)
    b, hkv, r, d = 1, 2, 4, 64
    segs = [make_segment(b, hkv, 50, d, 2, key_group=24, cs=True, pieces=2, gen=g),
            make_segment(b, hkv, 40, d, 4, key_group=24, cs=True, pieces=1, gen=g),
            make_segment(b, hkv, 20, d, 8, cs=False, gen=g)]
    kf = torch.randn(b, hkv, 7, d, generator=g).half()
    vf = torch.randn(b, hkv, 7, d, generator=g).half()
    q = torch.randn(b, hkv * r, 1, d, generator=g).half()
    ref = decode_attention_reference(q, segs, kf, vf)
    for tpl in (1, 2):
        out = decode_attention(q, segs, kf, vf, impl="triton", block_n=32, block_n_fp=16, tiers_per_launch=tpl,
                               dequant=dequant)
        assert rel_err(out, ref) < 3e-3


def test_per_step_arguments_name_real_kernel_arguments():
    """The unspecialized argument list must follow the kernel's signature when it changes
    (a stale name is ignored or rejected depending on the Triton version)."""
    import inspect

    from zipkv.kernels import _triton_decode as kernel

    names = inspect.signature(kernel._decode_kernel.fn).parameters
    assert [a for a in kernel._PER_STEP_ARGS if a not in names] == []
    assert {"NA", "NC", "NF", "nt_total", "a_svs_b", "smb"} <= set(kernel._PER_STEP_ARGS)
    # code and fp16-part strides stay specialized (aligned 16-byte loads; they never flip)
    assert not {"a_skc_b", "a_svc_h", "c_skc_h", "f_sk_b", "f_sv_h"} & set(kernel._PER_STEP_ARGS)


@pytest.mark.parametrize("with_mask,high_value_bits", [(False, 4), (True, 4), (True, 2)])
@pytest.mark.parametrize("dequant", [False, True])  # v5 / v6 (fp16 dequantization before the dots)
def test_decode_reads_token_counts_from_device_lengths(with_mask, high_value_bits, dequant):
    """Capacity buffers + int32 lengths (the CUDA-graph layout): the same output as the
    reference over the valid tokens alone, whatever the slack holds."""
    g = torch.Generator().manual_seed(7 + with_mask)
    b, hkv, r, d = 2, 2, 4, 64
    low = make_segment(b, hkv, 70, d, 2, cs=True, pieces=2, gen=g)
    high = make_segment(b, hkv, 45, d, 4, key_group=32, value_group=32, cs=False, gen=g, value_bits=high_value_bits)
    kf, vf = torch.randn(b, hkv, 9, d, generator=g).half(), torch.randn(b, hkv, 9, d, generator=g).half()
    q = torch.randn(b, hkv * r, 1, d, generator=g).half()
    mask = None
    if with_mask:  # row 1: its first 5 tokens are padding
        mask = torch.ones(b, 70 + 45 + 9, dtype=torch.bool)
        mask[1, :5] = False
    ref = decode_attention_reference(q, [low, high], kf, vf, mask=mask)
    caps = [in_capacity(low, 30, g), in_capacity(high, 19, g)]
    kf_cap = torch.cat([kf, torch.randn(b, hkv, 7, d, generator=g).half() * 10], dim=2)
    vf_cap = torch.cat([vf, torch.randn(b, hkv, 7, d, generator=g).half() * 10], dim=2)
    mask_cap = None
    if with_mask:
        mask_cap = torch.ones(b, 100 + 64 + 16, dtype=torch.bool)
        mask_cap[1, :5] = False
    lengths = torch.tensor([70, 45, 9], dtype=torch.int32)
    out = decode_attention(q, caps, kf_cap, vf_cap, mask=mask_cap, impl="triton", block_n=32, block_n_fp=16,
                           lengths=lengths, dequant=dequant)
    assert rel_err(out, ref) < 3e-3
    # the reference path cuts the buffers by the same counts
    torch.testing.assert_close(decode_attention(q, caps, kf_cap, vf_cap, mask=mask_cap, impl="reference",
                                                lengths=lengths), ref)
    with pytest.raises(ValueError, match="lengths must be int32"):
        decode_attention(q, caps, kf_cap, vf_cap, lengths=lengths.long())
    with pytest.raises(ValueError, match="causal"):
        decode_attention(q, caps, kf_cap, vf_cap, lengths=lengths, causal=True)


def test_dequant_default_follows_key_group_size():
    """dequant=None: v6 (fp16 dequantization before the dots) for tiers with >= block_n tokens
    per key group, v5 for finer groups (KIVI's 32), per launch; both match the reference."""
    g = torch.Generator().manual_seed(21)
    q = torch.randn(1, 8, 1, 64, generator=g).half()
    for key_group, expect in ((None, True), (16, False)):
        segs = [make_segment(1, 2, 80, 64, 4, key_group=key_group, value_bits=2, gen=g)]
        record = {}
        out = decode_attention(q, segs, impl="triton", block_n=32, record=record)
        assert record["route"] == "kernels" and [t["dequant"] for t in record["triton"]] == [expect]
        assert rel_err(out, decode_attention_reference(q, segs)) < 3e-3


def test_decode_route_is_chosen_in_one_place_and_recorded_per_call():
    """decode_attention routes (reference / Triton / CUDA kernel) and, asked with record=,
    says which way it went: a value of the call, not state left in a module."""
    g = torch.Generator().manual_seed(31)
    q = torch.randn(1, 4, 1, 64, generator=g).half()
    segs = [make_segment(1, 2, 40, 64, 4, value_bits=2, gen=g)]
    ref = decode_attention_reference(q, segs)
    on_cpu = {}
    torch.testing.assert_close(decode_attention(q, segs, record=on_cpu), ref)  # impl="auto" on a CPU tensor
    assert on_cpu == {"route": "reference", "reason": None, "cuda_tiers": 0}
    kernels = {}
    out = decode_attention(q, segs, impl="triton", block_n=32, record=kernels)
    assert rel_err(out, ref) < 3e-3
    # no CUDA kernel on a CPU: one Triton launch over the tier, one program column per (row, KV head)
    assert kernels["route"] == "kernels" and kernels["cuda_tiers"] == 0 and "mma" not in kernels
    assert len(kernels["triton"]) == 1 and kernels["triton"][0]["grid"][1] == 2
    assert decode_attention(q, segs, impl="triton", block_n=32).shape == out.shape  # no record: nothing kept
    with pytest.raises(ValueError, match="cuda_kernel=True cannot read this tier: .*CUDA"):
        decode_attention(q, segs, impl="triton", cuda_kernel=True)


def _head_slice(seg, h):
    """KV head h of a segment (every per-head tensor sliced; token indices are shared)."""
    import dataclasses

    return dataclasses.replace(seg, **{name: getattr(seg, name)[:, h:h + 1] for name in
                                       ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min", "v_channel")
                                       if getattr(seg, name) is not None})


@pytest.mark.parametrize("tq", [1, 2])
@pytest.mark.parametrize("dequant", [False, True])  # v5 / v6 (fp16 dequantization before the dots)
def test_per_head_masks(tq, dequant):
    """A bool mask per KV head [B, Hkv, 1 or Tq, Nt] (AdaKV's head budgets leave each head its own
    holes): the reference equals each KV head attended alone under its own [B, Nt] mask, the
    Triton kernel equals the reference, also over capacity buffers with device lengths."""
    g = torch.Generator().manual_seed(41 + tq)
    b, hkv, r, d, nf = 2, 3, 2, 64, 13
    segs = [make_segment(b, hkv, 50, d, 2, cs=True, pieces=2, gen=g),
            make_segment(b, hkv, 30, d, 4, key_group=16, value_group=32, cs=False, gen=g)]
    kf, vf = torch.randn(b, hkv, nf, d, generator=g).half(), torch.randn(b, hkv, nf, d, generator=g).half()
    q = torch.randn(b, hkv * r, tq, d, generator=g).half()
    nt = 50 + 30 + nf
    keep = torch.rand(b, hkv, 1, nt, generator=g) > 0.4
    keep[0, 1] = False  # a head that attends nothing: zeros, as a fully masked row
    keep[..., -1] = keep[..., -1] | (torch.arange(b * hkv).reshape(b, hkv, 1) != 1)
    rows = keep.expand(b, hkv, tq, nt).clone()
    rows[1, 2, 0, -3:] = False  # per query row too
    for mask in (keep, rows):
        ref = decode_attention_reference(q, segs, kf, vf, mask=mask)
        for h in range(hkv):
            alone = decode_attention_reference(q[:, h * r:(h + 1) * r], [_head_slice(s, h) for s in segs],
                                               kf[:, h:h + 1], vf[:, h:h + 1], mask=mask[:, h])
            torch.testing.assert_close(ref[:, h * r:(h + 1) * r], alone)
        assert (ref[0, r:2 * r] == 0).all()
        out = decode_attention(q, segs, kf, vf, mask=mask, impl="triton", block_n=32, block_n_fp=16, dequant=dequant)
        assert rel_err(out, ref) < 3e-3
    # capacity buffers: the mask is laid out over the capacities, the counts read on the device
    caps = [in_capacity(segs[0], 14, g), in_capacity(segs[1], 18, g)]
    kf_cap = torch.cat([kf, torch.randn(b, hkv, 5, d, generator=g).half() * 10], dim=2)
    vf_cap = torch.cat([vf, torch.randn(b, hkv, 5, d, generator=g).half() * 10], dim=2)
    mask_cap = torch.ones(b, hkv, tq, 64 + 48 + nf + 5, dtype=torch.bool)
    for (lo, hi), (clo, chi) in zip(((0, 50), (50, 80), (80, nt)), ((0, 50), (64, 94), (112, 112 + nf))):
        mask_cap[..., clo:chi] = rows[..., lo:hi]
    lengths = torch.tensor([50, 30, nf], dtype=torch.int32)
    out = decode_attention(q, caps, kf_cap, vf_cap, mask=mask_cap, impl="triton", block_n=32, block_n_fp=16,
                           lengths=lengths, dequant=dequant)
    assert rel_err(out, decode_attention_reference(q, segs, kf, vf, mask=rows)) < 3e-3


def test_per_head_masks_are_checked():
    g = torch.Generator().manual_seed(43)
    segs = [make_segment(1, 2, 10, 32, 4, gen=g)]
    q = torch.randn(1, 4, 1, 32, generator=g).half()
    with pytest.raises(ValueError, match="KV heads"):
        decode_attention(q, segs, mask=torch.ones(1, 4, 1, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="per-head mask must be bool"):
        decode_attention(q, segs, mask=torch.zeros(1, 2, 1, 10))


@pytest.mark.parametrize("with_lengths", [False, True])
def test_decode_returns_the_log_sum_exp(with_lengths):
    """return_lse: each query row's log-sum-exp of the scaled scores, so exp(scale * q.k - lse)
    is a key's attention probability (what a tiered layer's window scores need); the kernel's
    equals the reference's, -inf for a row that attends nothing."""
    g = torch.Generator().manual_seed(47)
    b, hkv, r, d, nf = 2, 2, 2, 64, 9
    segs = [make_segment(b, hkv, 40, d, 2, cs=True, pieces=2, gen=g)]
    kf, vf = torch.randn(b, hkv, nf, d, generator=g).half(), torch.randn(b, hkv, nf, d, generator=g).half()
    q = torch.randn(b, hkv * r, 1, d, generator=g).half()
    keep = torch.ones(b, hkv, 1, 40 + nf, dtype=torch.bool)
    keep[1, :, :, :7] = False
    keep[0, 1] = False
    ref_out, ref_lse = decode_attention_reference(q, segs, kf, vf, mask=keep, scale=0.2, return_lse=True)
    keys = torch.cat([dequantize_segment(segs[0])[0], kf.float()], 2).repeat_interleave(r, 1)
    scores = (q.float() @ keys.transpose(-1, -2) * 0.2).masked_fill(~keep.repeat_interleave(r, 1), float("-inf"))
    torch.testing.assert_close(ref_lse, torch.logsumexp(scores, -1))
    kwargs = dict(mask=keep, scale=0.2, impl="triton", block_n=32, block_n_fp=16, return_lse=True)
    if with_lengths:
        kwargs["lengths"] = torch.tensor([40, nf], dtype=torch.int32)
    out, lse = decode_attention(q, segs, kf, vf, **kwargs)
    assert rel_err(out, ref_out) < 3e-3
    assert lse.shape == (b, hkv * r, 1) and lse.dtype == torch.float32
    assert torch.isneginf(lse[0, r:]).all() and torch.isfinite(lse[0, :r]).all() and torch.isfinite(lse[1]).all()
    torch.testing.assert_close(lse[torch.isfinite(lse)], ref_lse[torch.isfinite(ref_lse)], atol=2e-2, rtol=0)
