"""The CUDA tensor-core decode kernel (mma_decode.cu) vs the float32 reference, on a GPU.

CI has no GPU: these tests skip there (the Triton kernel's tests cover the same layouts
under the interpreter). Run them on the lent GPU: pytest tests/test_kernels_mma.py.
"""

import pytest
import torch

from packed_segments import in_capacity, make_segment, rel_err, to_cuda

needs_gpu = pytest.mark.gpu  # conftest: skipped without a CUDA device (sm80+) or under TRITON_INTERPRET=1


def _run(q, segs, kf, vf, mask=None, lengths=None, **tuning):
    """(output, launch record) through the CUDA kernel for every tier."""
    from zipkv.kernels.decode_attention import decode_attention

    record = {}
    out = decode_attention(q, segs, kf, vf, mask=mask, lengths=lengths, impl="triton", cuda_kernel=True,
                           record=record, **tuning)
    assert record["cuda_tiers"] == len(segs)  # 8-bit rows of 128 channels: 2 warps' rings fit, 4 do not
    assert len(record["mma"]) == len(segs)
    return out, record


CASES = [  # (d, key bits, value bits, key_group, cs, R, Tq)
    (128, 4, 2, None, True, 4, 1),   # the zipkv preset / ZipCache salient tier
    (128, 2, 2, None, True, 4, 1),   # ZipCache's 2-bit tier
    (128, 4, 4, 24, True, 8, 1),     # key groups straddle 16-token tiles, 8 query rows
    (128, 8, 8, 128, False, 4, 2),   # 8-bit, two query tokens (rows = 8)
    (64, 2, 4, 40, False, 3, 1),     # D=64, odd GQA ratio
    (64, 4, 2, None, True, 1, 1),    # no GQA
    (64, 8, 2, 16, True, 2, 3),
]


TUNINGS = [dict(),  # the defaults: 4 warps x 3 blocks/SM, a 4-stage copy ring
           dict(mma_warps=2, mma_ctas_per_sm=64, mma_ring=2),  # many splits, the shortest ring
           dict(mma_warps=4, mma_ctas_per_sm=1, mma_min_blocks=2, mma_ring=3),  # one split per (row, head)
           dict(mma_warps=1, mma_min_blocks=8, mma_ring=8)]


@needs_gpu
@pytest.mark.parametrize("d,kbits,vbits,key_group,cs,r,tq", CASES)
def test_mma_decode_matches_reference(d, kbits, vbits, key_group, cs, r, tq):
    from zipkv.kernels.decode_attention import decode_attention_reference

    g = torch.Generator().manual_seed(d + kbits * 7 + vbits * 3 + r + tq)
    b, hkv, nf = 3, 2, 37
    segs = [make_segment(b, hkv, 700, d, kbits, key_group=key_group, cs=cs, pieces=5, gen=g, value_bits=vbits),
            make_segment(b, hkv, 261, d, 2, key_group=key_group, cs=cs, pieces=2, gen=g)]
    kf = torch.randn(b, hkv, nf, d, generator=g).half()
    vf = torch.randn(b, hkv, nf, d, generator=g).half()
    q = torch.randn(b, hkv * r, tq, d, generator=g).half()
    nt = 700 + 261 + nf
    keep = torch.ones(b, nt, dtype=torch.bool)
    keep[1, :300] = False   # left padding that ends inside a tile
    keep[2, 500:520] = False
    refs = {True: decode_attention_reference(q, segs, kf, vf, mask=keep), False: decode_attention_reference(q, segs, kf, vf)}
    segs = [to_cuda(s) for s in segs]
    for mask in (None, keep.cuda()):
        want = refs[mask is not None]
        for tuning in TUNINGS if kbits == 4 and d == 128 else TUNINGS[:1]:
            out, record = _run(q.cuda(), segs, kf.cuda(), vf.cuda(), mask=mask, **tuning)
            assert record["mma"][-1]["defines"]["RING"] == min(tuning.get("mma_ring", 4), 8)  # the 2-bit tier
            assert out.shape == want.shape and out.dtype == q.dtype
            assert rel_err(out.cpu(), want) < 3e-3, tuning


@needs_gpu
@pytest.mark.parametrize("kbits,vbits", [(4, 4), (2, 2), (4, 2)])
def test_mma_decode_long_ranges_keep_precision(kbits, vbits):
    """32K tokens in one split per (row, head): each warp sums 8K tokens (512 tiles) in fp32
    tensor-core accumulators, and the scores read the key codes with their fp16 offset (taken
    back once per key group): as close to the reference as the short cases. (The Triton kernel
    is ~2x closer here and in the short cases alike: its probabilities stay fp32, this kernel's
    enter the value mma as fp16; measured in experiments/NOTES.md, v9.)"""
    from zipkv.kernels.decode_attention import decode_attention_reference

    g = torch.Generator().manual_seed(kbits * 5 + vbits)
    b, hkv, r, d, n = 1, 2, 4, 128, 32768
    seg = make_segment(b, hkv, n, d, kbits, cs=True, pieces=8, gen=g, value_bits=vbits)
    kf, vf = torch.randn(b, hkv, 3, d, generator=g).half(), torch.randn(b, hkv, 3, d, generator=g).half()
    q = torch.randn(b, hkv * r, 1, d, generator=g).half()
    ref = decode_attention_reference(q, [seg], kf, vf)
    seg = to_cuda(seg)
    out, _ = _run(q.cuda(), [seg], kf.cuda(), vf.cuda(), mma_ctas_per_sm=1, mma_min_blocks=2)
    assert rel_err(out.cpu(), ref) < 3e-3


@needs_gpu
def test_mma_decode_bf16_and_fully_masked_row():
    from zipkv.kernels.decode_attention import decode_attention_reference

    g = torch.Generator().manual_seed(5)
    b, hkv, r, d = 2, 2, 4, 128
    segs = [to_cuda(make_segment(b, hkv, 333, d, 4, cs=True, pieces=3, gen=g, value_bits=2, dtype=torch.bfloat16))]
    kf = torch.randn(b, hkv, 5, d, generator=g).bfloat16().cuda()
    vf = torch.randn(b, hkv, 5, d, generator=g).bfloat16().cuda()
    q = torch.randn(b, hkv * r, 1, d, generator=g).bfloat16().cuda()
    keep = torch.ones(b, 338, dtype=torch.bool, device="cuda")
    keep[1, :333] = False  # row 1 sees only its fp16 part
    out, _ = _run(q, segs, kf, vf, mask=keep)
    ref = decode_attention_reference(q, segs, kf, vf, mask=keep)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), ref.float()) < 1e-2  # bf16 output rounding
    keep[1, :] = False  # nothing to attend: zeros, as the reference
    out, _ = _run(q, segs, kf, vf, mask=keep)
    assert out[1].abs().max().item() == 0.0


@needs_gpu
def test_mma_decode_reads_device_lengths():
    """Capacity buffers + device lengths (the CUDA-graph layout): the slack is never read."""
    from zipkv.kernels.decode_attention import decode_attention_reference

    g = torch.Generator().manual_seed(11)
    b, hkv, r, d = 2, 2, 4, 128
    seg = make_segment(b, hkv, 150, d, 4, cs=True, pieces=2, gen=g, value_bits=2)
    kf, vf = torch.randn(b, hkv, 9, d, generator=g).half(), torch.randn(b, hkv, 9, d, generator=g).half()
    q = torch.randn(b, hkv * r, 1, d, generator=g).half()
    ref = decode_attention_reference(q, [seg], kf, vf)

    cap = to_cuda(in_capacity(seg, 90, g))
    kf_cap = torch.cat([kf, torch.randn(b, hkv, 7, d, generator=g).half() * 10], dim=2).cuda()
    vf_cap = torch.cat([vf, torch.randn(b, hkv, 7, d, generator=g).half() * 10], dim=2).cuda()
    lengths = torch.tensor([150, 9], dtype=torch.int32, device="cuda")
    out, _ = _run(q.cuda(), [cap], kf_cap, vf_cap, lengths=lengths)
    assert rel_err(out.cpu(), ref) < 3e-3


@needs_gpu
def test_mma_decode_leaves_uncopyable_tiers_to_triton():
    """A tier whose value scales are not contiguous along the tokens cannot be copied in
    16-byte pieces: Triton reads it (still exactly), and cuda_kernel=True says why."""
    from zipkv.kernels.decode_attention import decode_attention, decode_attention_reference

    g = torch.Generator().manual_seed(21)
    b, hkv, r, d = 2, 2, 4, 128
    seg = make_segment(b, hkv, 211, d, 2, cs=True, pieces=2, gen=g)
    kf, vf = torch.randn(b, hkv, 3, d, generator=g).half(), torch.randn(b, hkv, 3, d, generator=g).half()
    q = torch.randn(b, hkv * r, 1, d, generator=g).half()
    ref = decode_attention_reference(q, [seg], kf, vf)
    seg = to_cuda(seg)
    seg.v_scale = torch.cat([seg.v_scale, seg.v_scale], dim=3)[..., :1]  # token stride 2
    seg.v_min = torch.cat([seg.v_min, seg.v_min], dim=3)[..., :1]
    record = {}
    out = decode_attention(q.cuda(), [seg], kf.cuda(), vf.cuda(), impl="triton", record=record)
    assert record["cuda_tiers"] == 0 and "mma" not in record
    assert rel_err(out.cpu(), ref) < 3e-3
    with pytest.raises(ValueError, match="unit token stride"):
        decode_attention(q.cuda(), [seg], kf.cuda(), vf.cuda(), impl="triton", cuda_kernel=True)


@needs_gpu
def test_mma_decode_refuses_what_it_cannot_read():
    from zipkv.kernels.decode_attention import decode_attention
    from zipkv.kernels.mma_decode import mma_supported

    g = torch.Generator().manual_seed(3)
    seg = to_cuda(make_segment(1, 2, 64, 64, 4, value_group=32, cs=False, gen=g))
    q = torch.randn(1, 8, 1, 64, generator=g).half().cuda()
    assert "value_group" in mma_supported(q, seg, 0, False, False)
    with pytest.raises(ValueError, match="cuda_kernel=True"):
        decode_attention(q, [seg], impl="triton", cuda_kernel=True)
    assert "rows" in mma_supported(torch.zeros(1, 18, 1, 64, device="cuda").half(),
                                   to_cuda(make_segment(1, 2, 64, 64, 4, gen=g)), 0, False, False)


def test_cpu_says_why_the_cuda_kernel_cannot_run():
    """On a CPU the CUDA kernel is never chosen; asking for it names the reason."""
    from zipkv.kernels.mma_decode import available, mma_supported

    g = torch.Generator().manual_seed(4)
    seg = make_segment(1, 2, 32, 64, 4, gen=g)
    q = torch.randn(1, 4, 1, 64, generator=g).half()
    assert "CUDA" in available(torch.device("cpu"))
    assert "CUDA" in mma_supported(q, seg, 0, False, False)


def test_ring_stages_follow_alignment_and_shared_memory():
    """The copy ring's depth comes from the 48 KiB of static shared memory and its 16-byte
    pieces from the tier's strides: both decided on the host (no GPU needed)."""
    from zipkv.kernels.mma_decode import copy_alignment, fit_warps, ring_stages

    g = torch.Generator().manual_seed(6)
    q = torch.zeros(1, 8, 1, 128, dtype=torch.float16)
    seg = make_segment(1, 2, 97, 128, 2, cs=True, gen=g)  # odd length: scale rows off 16 bytes (windows)
    assert ring_stages(q, seg, warps=2, requested=4) == 4
    assert copy_alignment(seg) is None
    seg8 = make_segment(1, 2, 96, 128, 8, cs=True, gen=g)
    assert ring_stages(q, seg8, warps=2, requested=8) == 4  # 4.5 KiB stages: 4 of them fit
    assert ring_stages(q, seg8, warps=8, requested=4) == 0  # not even 2 fit beside 8 warps' rows
    assert fit_warps(q, seg, warps=4, min_blocks=3, ring=4) == (4, 3)
    assert fit_warps(q, seg8, warps=4, min_blocks=3, ring=4) == (2, 6)  # 8-bit rows: half the warps, twice the blocks
    seg.v_scale = torch.cat([seg.v_scale, seg.v_scale], dim=3)[..., :1]  # token stride 2
    assert "unit token stride" in copy_alignment(seg)
    seg.token_group = torch.arange(194, dtype=torch.int32)[::2]
    assert "token_group" in copy_alignment(seg)
