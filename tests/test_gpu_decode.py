"""The compiled decode kernels on a GPU vs the float32 reference, over a shape grid.

decode_attention (zipkv/kernels/decode_attention.py) routes a step to the Triton kernel
(_triton_decode.py: the packed tiers, the fp16 part, the log-sum-exp merge) and to the CUDA
tensor-core kernel (mma_decode.py / .cu) for the tiers it can read. Every case: fresh random
tiers built by the cache's own quantizer (tests/packed_segments.py), head dims 64 / 128,
GQA ratios 1 / 4 / 8, fp16 / bf16, ragged token counts (not multiples of any block or tile)
and ragged left padding per batch row; the reference runs on the CPU in float32.
Failures print the seed and shapes (tests/gpu_check.py). Run: pytest -m gpu tests.
"""

import dataclasses

import pytest
import torch

from gpu_check import REL_TOL, check_close, check_rel, fresh_generator, randint
from packed_segments import in_capacity, make_segment

pytestmark = pytest.mark.gpu
DEVICE = "cuda"  # a module constant so that the test bodies can be dry-run on a CPU (the interpreter)

DTYPES = [torch.float16, torch.bfloat16]
GRID = [(d, r, dtype) for d in (64, 128) for r in (1, 4, 8) for dtype in DTYPES]
GRID_IDS = [f"d{d}-r{r}-{str(dtype)[6:]}" for d, r, dtype in GRID]
B, HKV = 3, 2


def _ragged_keep(g, lengths):
    """[B, Nt] bool: row 0 sees everything, row 1 loses a random left part of the first
    tier, row 2 a left part reaching into the second tier (left padding of uneven prompts)."""
    nt = sum(lengths)
    keep = torch.ones(B, nt, dtype=torch.bool)
    pads = [0, randint(g, 1, lengths[0]), randint(g, lengths[0], lengths[0] + lengths[1])]
    for row, pad in enumerate(pads):
        keep[row, :pad] = False
    return keep, pads


def _two_tiers(g, d, dtype):
    """A ZipCache/zipkv-style tier (4-bit keys, 2-bit channel-separable values, several
    appended blocks) and a KIVI-style one (2-bit, 32-token key groups, 32-channel value
    groups), ragged lengths, and an fp16/bf16 part."""
    n_a, n_b, nf = randint(g, 70, 700), randint(g, 17, 300), randint(g, 1, 64)
    segs = [make_segment(B, HKV, n_a, d, 4, value_bits=2, cs=True, pieces=3, dtype=dtype, gen=g),
            make_segment(B, HKV, n_b, d, 2, key_group=32, value_group=32, cs=False, dtype=dtype, gen=g)]
    kf = torch.randn(B, HKV, nf, d, generator=g).to(dtype)
    vf = torch.randn(B, HKV, nf, d, generator=g).to(dtype)
    return segs, kf, vf, (n_a, n_b, nf)


def _on_device(seg):
    return dataclasses.replace(seg, **{f.name: getattr(seg, f.name).to(DEVICE) for f in dataclasses.fields(seg)
                                       if isinstance(getattr(seg, f.name), torch.Tensor)})


def _decode(q, segs, kf, vf, **kwargs):
    from zipkv.kernels.decode_attention import decode_attention

    record = {}
    mask = kwargs.pop("mask", None)
    out = decode_attention(q.to(DEVICE), [_on_device(s) for s in segs], kf.to(DEVICE), vf.to(DEVICE),
                           mask=None if mask is None else mask.to(DEVICE), impl="triton", record=record, **kwargs)
    assert record["route"] == "kernels", f"decode_attention took the reference: {record}"
    return out, record


@pytest.mark.parametrize("cuda_kernel", [False, None], ids=["triton-only", "auto-route"])
@pytest.mark.parametrize("d,r,dtype", GRID, ids=GRID_IDS)
def test_decode_kernels_match_reference_over_the_grid(d, r, dtype, cuda_kernel):
    """Two tiers + the fp16 part, ragged padding: every tier in Triton (cuda_kernel=False),
    or the tier the CUDA kernel can read through it (None: the product's default route)."""
    from zipkv.kernels.decode_attention import decode_attention_reference

    seed, g = fresh_generator()
    segs, kf, vf, lengths = _two_tiers(g, d, dtype)
    keep, pads = _ragged_keep(g, lengths)
    q = torch.randn(B, HKV * r, 1, d, generator=g).to(dtype)
    ref = decode_attention_reference(q, segs, kf, vf, mask=keep)
    out, record = _decode(q, segs, kf, vf, mask=keep, cuda_kernel=cuda_kernel)
    context = f"seed={seed} d={d} R={r} {dtype} tokens={lengths} pads={pads} cuda_tiers={record['cuda_tiers']}"
    assert out.dtype == dtype, context
    check_rel(out, ref, REL_TOL[dtype], context)
    if cuda_kernel is False:
        assert record["cuda_tiers"] == 0 and "mma" not in record, context


MMA_BITS = [(4, 2), (2, 2), (8, 8)]


@pytest.mark.parametrize("kbits,vbits", MMA_BITS, ids=[f"k{k}v{v}" for k, v in MMA_BITS])
@pytest.mark.parametrize("d,r,dtype", GRID, ids=GRID_IDS)
def test_cuda_mma_kernel_matches_reference_over_the_grid(d, r, dtype, kbits, vbits):
    """One tier forced through the CUDA tensor-core kernel (cuda_kernel=True), ragged length
    and padding, with and without the mask; the fp16 part and the merge in Triton."""
    from zipkv.kernels.decode_attention import decode_attention_reference

    seed, g = fresh_generator()
    n, nf = randint(g, 40, 900), randint(g, 1, 40)
    cs = bool(randint(g, 0, 2))
    key_group = [None, 24, 128][randint(g, 0, 3)]
    seg = make_segment(B, HKV, n, d, kbits, key_group=key_group, cs=cs, pieces=randint(g, 1, 5), dtype=dtype,
                       gen=g, value_bits=vbits)
    kf = torch.randn(B, HKV, nf, d, generator=g).to(dtype)
    vf = torch.randn(B, HKV, nf, d, generator=g).to(dtype)
    q = torch.randn(B, HKV * r, 1, d, generator=g).to(dtype)
    keep, pads = _ragged_keep(g, (n, nf, 0))
    context = f"seed={seed} d={d} R={r} {dtype} k{kbits}v{vbits} cs={cs} key_group={key_group} n={n} nf={nf} pads={pads}"
    for mask in (None, keep):
        ref = decode_attention_reference(q, [seg], kf, vf, mask=mask)
        out, record = _decode(q, [seg], kf, vf, mask=mask, cuda_kernel=True)
        assert record["cuda_tiers"] == 1 and len(record["mma"]) == 1, f"{context}: {record}"
        check_rel(out, ref, REL_TOL[dtype], f"{context} mask={mask is not None}")


@pytest.mark.parametrize("tq", [2, 3])
@pytest.mark.parametrize("d,r", [(64, 1), (64, 4), (128, 4), (128, 8)])
def test_chunked_decode_causal_and_per_row_masks(d, r, tq):
    """Tq > 1 query tokens (chunked / speculative decode): causal=True, and a per-query-row
    mask [B, Tq, Nt] (both read by Triton; the CUDA kernel takes neither)."""
    from zipkv.kernels.decode_attention import decode_attention_reference

    if r * tq > 16:
        pytest.skip("more than 16 query rows per KV head")
    seed, g = fresh_generator()
    segs, kf, vf, lengths = _two_tiers(g, d, torch.float16)
    q = torch.randn(B, HKV * r, tq, d, generator=g).half()
    context = f"seed={seed} d={d} R={r} Tq={tq} tokens={lengths}"
    ref = decode_attention_reference(q, segs, kf, vf, causal=True)
    out, _ = _decode(q, segs, kf, vf, causal=True)
    check_rel(out, ref, REL_TOL[torch.float16], f"{context} causal")
    keep, pads = _ragged_keep(g, lengths)
    rows = keep[:, None, :].repeat(1, tq, 1)
    rows[0, 0, -randint(g, 1, lengths[2] + 1):] = False  # the first query row stops earlier
    ref = decode_attention_reference(q, segs, kf, vf, mask=rows)
    out, record = _decode(q, segs, kf, vf, mask=rows)
    assert record["cuda_tiers"] == 0, f"{context}: a per-row mask went to the CUDA kernel: {record}"
    check_rel(out, ref, REL_TOL[torch.float16], f"{context} per-row mask pads={pads}")


@pytest.mark.parametrize("d,r,dtype", [(64, 1, torch.float16), (128, 4, torch.bfloat16), (128, 8, torch.float16)])
def test_device_lengths_over_capacity_buffers(d, r, dtype):
    """The CUDA-graph layout: capacity buffers whose slack holds junk, int32 counts on the
    device; the product's route (CUDA kernel where it can) and Triton only."""
    from zipkv.kernels.decode_attention import decode_attention_reference

    seed, g = fresh_generator()
    segs, kf, vf, lengths = _two_tiers(g, d, dtype)
    keep, pads = _ragged_keep(g, lengths)
    q = torch.randn(B, HKV * r, 1, d, generator=g).to(dtype)
    ref = decode_attention_reference(q, segs, kf, vf, mask=keep)
    slack = [randint(g, 1, 64), randint(g, 1, 64), randint(g, 1, 32)]
    caps = [in_capacity(s, extra, g) for s, extra in zip(segs, slack)]
    kf_cap = torch.cat([kf, torch.randn(B, HKV, slack[2], d, generator=g).to(dtype) * 10], dim=2)
    vf_cap = torch.cat([vf, torch.randn(B, HKV, slack[2], d, generator=g).to(dtype) * 10], dim=2)
    keep_cap = torch.cat([torch.cat([part, torch.ones(B, extra, dtype=torch.bool)], 1)
                          for part, extra in zip(keep.split(list(lengths), 1), slack)], 1)
    counts = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    context = f"seed={seed} d={d} R={r} {dtype} tokens={lengths} slack={slack} pads={pads}"
    for cuda_kernel in (None, False):
        out, record = _decode(q, caps, kf_cap, vf_cap, mask=keep_cap, lengths=counts, cuda_kernel=cuda_kernel)
        check_rel(out, ref, REL_TOL[dtype], f"{context} cuda_tiers={record['cuda_tiers']}")


@pytest.mark.parametrize("d,r", [(64, 1), (64, 4), (128, 8)])
def test_per_head_masks_and_log_sum_exp(d, r):
    """AdaKV-style per-KV-head masks [B, Hkv, 1, Nt] (Triton only), a head that attends
    nothing (zeros, lse -inf), and return_lse against the reference's log-sum-exp."""
    from zipkv.kernels.decode_attention import decode_attention_reference

    seed, g = fresh_generator()
    segs, kf, vf, lengths = _two_tiers(g, d, torch.float16)
    nt = sum(lengths)
    keep = torch.rand(B, HKV, 1, nt, generator=g) > 0.4
    keep[..., -1] = True
    keep[0, 1] = False  # nothing to attend for KV head 1 of row 0
    q = torch.randn(B, HKV * r, 1, d, generator=g).half()
    ref, ref_lse = decode_attention_reference(q, segs, kf, vf, mask=keep, return_lse=True)
    (out, lse), record = _decode(q, segs, kf, vf, mask=keep, return_lse=True)
    context = f"seed={seed} d={d} R={r} tokens={lengths}"
    assert record["cuda_tiers"] == 0, f"{context}: {record}"
    check_rel(out, ref, REL_TOL[torch.float16], context)
    assert out[0, r:2 * r].abs().max().item() == 0.0, f"{context}: a fully masked head is not zero"
    lse = lse.cpu()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), f"{context}: -inf rows differ"
    finite = torch.isfinite(ref_lse)
    check_close(lse[finite], ref_lse[finite], f"{context} lse", rtol=0, atol=2e-2)
