"""Every other compiled Triton kernel on a GPU, through its public wrapper, vs its PyTorch
reference on fresh random inputs; and causal_attention_lse (private aten ops) vs float64.

- quantize_pack_keys / _values (_triton_quantize.py) vs zipkv.quant.schemes (the same device)
- probe_scores (_triton_probe.py), probe_scores_lse (_triton_probe_lse.py) vs attention_scores
- window_append / write_slots / window_scores (_triton_window.py) vs their references
- sparse_prefill_attention (_triton_sparse.py) vs sparse_prefill_reference
- causal_attention_lse (attention_lse.py) vs a float64 reference (also checked on the CPU)

Grid: head dims 64 / 128, GQA ratios 1 / 4 / 8, fp16 / bf16, ragged lengths and padding.
The decode kernels are in tests/test_gpu_decode.py. Failures print the seed and shapes.
"""

import math

import pytest
import torch

from gpu_check import REL_TOL, check_close, check_rel, fresh_generator, randint

DEVICE = "cuda"  # a module constant so that the test bodies can be dry-run on a CPU (the interpreter)
gpu = pytest.mark.gpu
DTYPES = [torch.float16, torch.bfloat16]
GRID = [(d, r, dtype) for d in (64, 128) for r in (1, 4, 8) for dtype in DTYPES]
GRID_IDS = [f"d{d}-r{r}-{str(dtype)[6:]}" for d, r, dtype in GRID]


def _left_padding(g, b, t):
    """[B, T] bool key mask: row 0 unpadded, the others a random left part padded."""
    mask = torch.ones(b, t, dtype=torch.bool)
    pads = [0] + [randint(g, 1, t // 2) for _ in range(b - 1)]
    for row, pad in enumerate(pads):
        mask[row, :pad] = False
    return mask, pads


# ---- quantize + pack --------------------------------------------------------------------

def _check_quantized(got, want, bits, context):
    """Codes may differ on rounding ties (measured on the H100: 4e-6 and 3e-5 of the codes of
    fp16 channel-separable values at 4 / 8 bits, experiments/NOTES.md) in at most 1e-4 of
    them, by one level, or by as many as a scale one unit in the last place away moves the top
    code: (2^bits - 1) x eps levels, 2 for bfloat16 at 8 bits (seen once on the H200, seed
    3122310190, d 128, channel-separable values); scales and minimums to one unit in the last
    place of their dtype."""
    import math

    from zipkv.quant.packing import unpack

    codes, ref_codes = unpack(got[0], bits).int().cpu(), unpack(want[0], bits).int().cpu()
    assert codes.shape == ref_codes.shape, f"{context}: codes {tuple(codes.shape)} != {tuple(ref_codes.shape)}"
    diff = (codes - ref_codes).abs()
    off = (diff > 0).float().mean().item() if diff.numel() else 0.0
    levels = max(1, math.ceil((2**bits - 1) * torch.finfo(got[1].dtype).eps)) if isinstance(got[1], torch.Tensor) else 1
    assert diff.max().item() <= levels, f"{context}: a code differs by {diff.max().item()} levels (allowed {levels})"
    assert off <= 1e-4, f"{context}: {off:.2e} of the codes differ (ties allow <= 1e-4)"
    for name, x, y in zip(("scale", "min", "4th"), got[1:], want[1:]):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape, f"{context}: {name} {x.dtype} {tuple(x.shape)} != {y.dtype} {tuple(y.shape)}"
            eps = torch.finfo(x.dtype).eps
            check_close(x.float(), y.float(), f"{context} {name}", rtol=eps, atol=torch.finfo(x.dtype).tiny)
        else:
            assert x == y, f"{context}: {name} {x} != {y}"


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("d", [64, 128])
def test_quantize_pack_matches_the_quantizer(d, bits, dtype):
    from zipkv.kernels.quantize_pack import quantize_pack_keys, quantize_pack_values
    from zipkv.quant.schemes import quantize_keys_channelwise, quantize_values_tokenwise

    seed, g = fresh_generator()
    b, h, n = 2, 3, randint(g, 1, 600)
    keys = (torch.randn(b, h, n, d, generator=g) * 3 + 1).to(dtype)
    keys[0, 0, :, 5] = 0.25  # a constant channel: the step guard
    keys[1, 2, :, 7] *= 300  # an outlier channel
    values = torch.randn(b, h, n, d, generator=g).to(dtype) * 2
    values[1, 1, 0] = -1.5  # a constant token
    keys, values = keys.to(DEVICE), values.to(DEVICE)
    context = f"seed={seed} d={d} bits={bits} {dtype} n={n}"
    for group in (None, 32, randint(g, 1, 100)):
        _check_quantized(quantize_pack_keys(keys, bits, group, impl="triton"), quantize_keys_channelwise(keys, bits, group), bits,
                         f"{context} keys group={group}")
    for group, cs in ((None, True), (None, False), (16, False), (32, True)):
        _check_quantized(quantize_pack_values(values, bits, group, cs, impl="triton"), quantize_values_tokenwise(values, bits, group, cs),
                         bits, f"{context} values group={group} cs={cs}")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4])
def test_quantize_pack_keys_in_chunks_at_batch_one(bits, dtype):
    """A batch-1 prompt's keys as one group per head (the prefill's case): the auto route splits
    the codes into chunks over the SMs, the min / max from torch; same result as the reference."""
    from zipkv.kernels.quantize_pack import _key_chunk, quantize_pack_keys
    from zipkv.quant.schemes import quantize_keys_channelwise

    seed, g = fresh_generator()
    n = randint(g, 4000, 9000)
    keys = (torch.randn(1, 8, n, 128, generator=g) * 3 + 1).to(dtype)
    keys[0, 3, :, 11] *= 200  # an outlier channel
    keys = keys.to(DEVICE)
    assert _key_chunk(keys, None) is not None
    _check_quantized(quantize_pack_keys(keys, bits, None), quantize_keys_channelwise(keys, bits, None), bits,
                     f"seed={seed} bits={bits} {dtype} n={n} chunked")


# ---- probe scores -----------------------------------------------------------------------

def _check_scores(out, ref, context):
    for name, o, e in zip(("normalized", "accumulated", "counts"), out, ref):
        assert o.shape == e.shape and bool(torch.isfinite(o).all()), f"{context} {name}: {tuple(o.shape)} / non-finite"
        check_close(o, e, f"{context} {name}", rtol=2e-2, atol=2e-4)
    check_close(out[2], ref[2], f"{context} counts", rtol=0, atol=0)  # counts are exact


@gpu
@pytest.mark.parametrize("d,r,dtype", GRID, ids=GRID_IDS)
def test_probe_scores_match_reference(d, r, dtype):
    from zipkv.kernels.probe_scores import probe_scores, probe_scores_reference

    seed, g = fresh_generator()
    b, hkv, t = 3, 2, randint(g, 40, 700)
    q = torch.randn(b, hkv * r, 24, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, t, d, generator=g).to(dtype)
    pos = torch.cat([torch.randperm(t - 12, generator=g)[:12].sort().values, torch.arange(t - 12, t)])
    key_mask, pads = _left_padding(g, b, t)
    ref = probe_scores_reference(q, k, pos, key_mask)
    out = probe_scores(q.to(DEVICE), k.to(DEVICE), pos.to(DEVICE), key_mask.to(DEVICE), impl="triton")
    _check_scores(out, ref, f"seed={seed} d={d} R={r} {dtype} T={t} pads={pads}")


def _causal_lse(query, keys, scaling):
    """[B, Hq, T] float32 log-sum-exp of every query row (row i at key i, causal)."""
    r = query.shape[1] // keys.shape[1]
    logits = torch.einsum("bhqd,bhkd->bhqk", query.float(), keys.float().repeat_interleave(r, 1)) * scaling
    t = keys.shape[2]
    return logits.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf")).logsumexp(-1)


PROBE_LSE_VARIANTS = [dict(kernel="v1"), dict(kernel="v2"), dict(kernel="v2", splits=3),
                      dict(kernel="v2", indexed=True), dict()]


@gpu
@pytest.mark.parametrize("d,r,dtype", GRID, ids=GRID_IDS)
def test_probe_scores_lse_match_reference(d, r, dtype):
    """The one-pass kernels fed the prompt's float32 log-sum-exp: every variant, unsorted
    probe rows, a ragged last key block, keys past the last probe (zero score and count)."""
    from zipkv.kernels.probe_scores import probe_scores_lse, probe_scores_reference

    seed, g = fresh_generator()
    b, hkv, t = 2, 2, randint(g, 60, 600)
    q = (torch.randn(b, hkv * r, t, d, generator=g) * 1.5).to(dtype)
    k = torch.randn(b, hkv, t, d, generator=g).to(dtype)
    scaling = d ** -0.5
    lse = _causal_lse(q, k, scaling)
    last = randint(g, t // 2, t)
    rows = torch.cat([torch.tensor([last]), torch.randperm(last, generator=g)[:randint(g, 1, 40)]])
    rows = rows[torch.randperm(rows.numel(), generator=g)]
    ref = probe_scores_reference(q[:, :, rows], k, rows, None, scaling)
    qd, kd, lsed, rowsd = q.to(DEVICE), k.to(DEVICE), lse.to(DEVICE), rows.to(DEVICE)
    for variant in PROBE_LSE_VARIANTS:
        context = f"seed={seed} d={d} R={r} {dtype} T={t} probes={rows.numel()} last={last} {variant}"
        out = probe_scores_lse(qd, kd, rowsd, lsed, scaling, rows=rowsd, impl="triton", **variant)
        _check_scores(out, ref, context)
        unseen = out[1][..., last + 1:].abs().sum().item() + out[2][..., last + 1:].abs().sum().item()
        assert unseen == 0.0, f"{context}: keys after the last probe got scores or counts"


# ---- the static decode step's window kernels -------------------------------------------

@gpu
@pytest.mark.parametrize("d,r,dtype", GRID, ids=GRID_IDS)
def test_window_kernels_match_reference(d, r, dtype):
    from zipkv.kernels.window_step import window_append, window_append_reference, window_scores, \
        window_scores_reference, write_slots, write_slots_reference

    seed, g = fresh_generator()
    b, hkv, w = 3, 2, randint(g, 8, 300)
    filled = randint(g, 1, w)  # the window's valid slots (the rest not written yet)
    context = f"seed={seed} d={d} R={r} {dtype} W={w} filled={filled}"
    k_win = torch.randn(b, hkv, w, d, generator=g).to(dtype).to(DEVICE)
    v_win = torch.randn(b, hkv, w, d, generator=g).to(dtype).to(DEVICE)
    lengths = torch.tensor([randint(g, 0, 999), filled], dtype=torch.int32, device=DEVICE)
    keys = torch.randn(b, 1, hkv, d, generator=g).to(dtype).to(DEVICE).transpose(1, 2)  # [B, T, H, D] in memory
    values = torch.randn(b, hkv, 1, d, generator=g).to(dtype).to(DEVICE)
    slot = torch.randint(0, w, (b, hkv), generator=g).to(DEVICE)  # streaming_llm's ring / h2o's freed slot
    for name, kernel, reference, where in (("window_append", window_append, window_append_reference, lengths),
                                           ("write_slots", write_slots, write_slots_reference, slot)):
        got = [k_win.clone(), v_win.clone(), torch.zeros((), dtype=torch.bool, device=DEVICE)]
        want = [x.clone() for x in got]
        kernel(keys, values, *got[:2], where, got[2], impl="triton")
        reference(keys, values, *want[:2], where, want[2])
        for field, x, y in zip(("keys", "values", "nonfinite"), got, want):
            assert torch.equal(x, y), f"{context}: {name} {field} differ from the reference"
    values[1, 0, 0, 3] = float("nan")
    flag = torch.zeros((), dtype=torch.bool, device=DEVICE)
    window_append(keys, values, k_win.clone(), v_win.clone(), lengths, flag, impl="triton")
    assert bool(flag), f"{context}: a NaN value did not set the flag"

    q = torch.randn(b, hkv * r, 1, d, generator=g).to(dtype).to(DEVICE)
    real, pads = _left_padding(g, b, w)
    real = real.to(DEVICE)
    base = torch.rand(b, hkv, w, generator=g).to(DEVICE), torch.randint(0, 5, (b, 1, w), generator=g).float().to(DEVICE)
    want, got = [x.clone() for x in base], [x.clone() for x in base]
    window_scores_reference(q, k_win, lengths, real, *want, d ** -0.5)
    window_scores(q, k_win, lengths, real, *got, d ** -0.5, impl="triton")
    check_close(got[0], want[0], f"{context} pads={pads} window_scores sum", rtol=1e-3, atol=1e-5)
    assert torch.equal(got[1], want[1]), f"{context} pads={pads}: window_scores counts differ"


# ---- ZipVL sparse prefill ---------------------------------------------------------------

@gpu
@pytest.mark.parametrize("d,r,dtype", GRID, ids=GRID_IDS)
def test_sparse_prefill_matches_reference(d, r, dtype):
    """Rows keeping different token counts (end-padded index lists, pad_keep_indices): the
    kept rows' outputs equal the reference's, every other row is exactly zero."""
    from zipkv.kernels.sparse_prefill import pad_keep_indices, sparse_prefill_scatter

    seed, g = fresh_generator()
    b, hkv, s = 3, 2, randint(g, 30, 500)
    q = torch.randn(b, hkv * r, s, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, s, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, s, d, generator=g).to(dtype)
    keep = torch.rand(b, s, generator=g) < torch.rand(b, 1, generator=g).clamp(0.1, 0.9)
    keep[:, -1] = True  # the last token is always kept (ZipVL keeps the recent ones)
    idx, counts = pad_keep_indices(keep)
    ref = sparse_prefill_scatter(q, k, v, idx, counts, impl="reference")
    out = sparse_prefill_scatter(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), idx.to(DEVICE), counts.to(DEVICE),
                                 impl="triton")
    context = f"seed={seed} d={d} R={r} {dtype} S={s} kept={counts.tolist()}"
    check_rel(out, ref, REL_TOL[dtype], context)
    assert out.cpu()[~keep[:, None, :].expand(-1, hkv * r, -1)].abs().max().item() == 0.0, f"{context}: rows not kept"


# ---- causal attention with its log-sum-exp (cuDNN / flash through aten) -------------------

def attention_lse_float64(query, key, value, scaling):
    """(output, lse) of causal attention in float64 on the CPU: the reference."""
    r = query.shape[1] // key.shape[1]
    q, k, v = (x.detach().cpu().double() for x in (query, key, value))
    k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    t = q.shape[2]
    s = (q @ k.transpose(-1, -2)) * scaling
    s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def test_causal_attention_lse_reference_and_cpu_refusals():
    """On the CPU: the float64 reference agrees with SDPA and with its own definition (the
    lse turns scores into the probabilities), and causal_attention_lse declines (None) what it
    cannot run: a CPU tensor, float32, q_len != kv_len, heads that do not group."""
    import torch.nn.functional as F

    from zipkv.kernels.attention_lse import causal_attention_lse

    seed, g = fresh_generator()
    b, hkv, r, t, d = 2, 2, 4, 37, 64
    q = torch.randn(b, hkv * r, t, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, t, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, t, d, generator=g, dtype=torch.float64)
    out, lse = attention_lse_float64(q, k, v, 0.125)
    sdpa = F.scaled_dot_product_attention(q, k.repeat_interleave(r, 1), v.repeat_interleave(r, 1), is_causal=True,
                                          scale=0.125)
    check_close(out, sdpa, f"seed={seed} float64 reference vs SDPA", rtol=1e-10, atol=1e-12)
    row = 11  # row i's probabilities over keys <= i sum to one through its lse
    seen = k.repeat_interleave(r, 1)[:, :, :row + 1]
    probs = torch.exp(0.125 * torch.einsum("bhd,bhkd->bhk", q[:, :, row], seen) - lse[:, :, row, None])
    check_close(probs.sum(-1), torch.ones(b, hkv * r, dtype=torch.float64), f"seed={seed} lse", rtol=1e-12, atol=1e-12)
    half = q.half()
    assert causal_attention_lse(half, k.half(), v.half(), 0.125) is None  # a CPU tensor: the caller's SDPA
    if torch.cuda.is_available():
        qc, kc, vc = (x.cuda() for x in (q, k, v))
        assert causal_attention_lse(qc.float(), kc.float(), vc.float(), 0.125) is None  # float32
        assert causal_attention_lse(qc.half()[:, :, 1:], kc.half(), vc.half(), 0.125) is None  # q_len != kv_len
        assert causal_attention_lse(qc.half()[:, :3], kc.half(), vc.half(), 0.125) is None  # 3 heads over 2


LSE_GRID = [(d, r, dtype, t) for d, r, dtype in GRID for t in (77, 512)]


@gpu
@pytest.mark.parametrize("d,r,dtype,t", LSE_GRID, ids=[f"{i}-T{t}" for i in GRID_IDS for t in (77, 512)])
def test_causal_attention_lse_matches_float64(d, r, dtype, t):
    """The op SDPA itself picks (cuDNN on the H100 / H200 with torch 2.11; flash elsewhere):
    output within 16-bit rounding of the float64 reference, lse (natural log) within 2e-3."""
    from zipkv.kernels.attention_lse import causal_attention_lse

    seed, g = fresh_generator()
    b, hkv = 2, 2
    q, k, v = (torch.randn(b, n, t, d, generator=g).to(dtype).to(DEVICE) for n in (hkv * r, hkv, hkv))
    scaling = 1.0 / math.sqrt(d)
    got = causal_attention_lse(q, k, v, scaling)
    context = f"seed={seed} d={d} R={r} {dtype} T={t}"
    assert got is not None, (f"{context}: causal_attention_lse declined (SDPA picks neither cuDNN nor flash here, "
                             f"torch {torch.__version__}); the layer then keeps its two-pass probe scoring")
    out, lse = got
    ref_out, ref_lse = attention_lse_float64(q, k, v, scaling)
    assert lse.shape == (b, hkv * r, t) and lse.dtype == torch.float32, f"{context}: lse {lse.dtype} {tuple(lse.shape)}"
    check_rel(out, ref_out, REL_TOL[dtype], f"{context} output")
    check_close(lse.double(), ref_lse, f"{context} lse", rtol=0, atol=2e-3)
