"""One-pass probe-score kernel (Triton interpreter), fed a float32 log-sum-exp, vs the reference."""

import pytest
import torch

from triton_mode import interpreter_module_mark

pytestmark = interpreter_module_mark()  # Triton's interpreter; skipped in a compiled GPU session

from zipkv.kernels.probe_scores import probe_scores_lse, probe_scores_reference  # noqa: E402


def causal_lse(query, keys, scaling):
    """[B, Hq, T] float32 log-sum-exp of every query row (row i at key i, causal)."""
    r = query.shape[1] // keys.shape[1]
    logits = torch.einsum("bhqd,bhkd->bhqk", query.float(), keys.float().repeat_interleave(r, 1)) * scaling
    t = keys.shape[2]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    return logits.masked_fill(~causal, float("-inf")).logsumexp(-1)


def _inputs(seed, b, hkv, r, t, d, dtype):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, hkv * r, t, d, generator=g) * 1.5).to(dtype)
    k = torch.randn(b, hkv, t, d, generator=g).to(dtype)
    return g, q, k


@pytest.mark.parametrize("dtype,r", [(torch.bfloat16, 2), (torch.float16, 4)])
@pytest.mark.parametrize("gathered", [False, True])
def test_one_pass_matches_reference(dtype, r, gathered):
    t, d = 150, 64
    g, q, k = _inputs(int(gathered) + r, 2, 2, r, t, d, dtype)
    scaling = d**-0.5
    lse = causal_lse(q, k, scaling)
    # random probes (unsorted on purpose) + the recent tail; keys past the last random probe
    # and before the tail are seen only by the tail, and no probe sits below key 20
    rows = torch.cat([torch.arange(140, 150), torch.randperm(100, generator=g)[:12] + 20])
    ref = probe_scores_reference(q[:, :, rows], k, rows, None, scaling)
    if gathered:  # the probe rows handed over as their own tensors
        out = probe_scores_lse(q[:, :, rows], k, rows, lse[:, :, rows], scaling, impl="triton", block_p=16, block_t=32)
    else:  # the whole prompt's queries and LSE, rows picked inside the kernel
        out = probe_scores_lse(q, k, rows, lse, scaling, rows=rows, impl="triton", block_p=16, block_t=32)
    for o, e in zip(out, ref):
        assert o.shape == e.shape and torch.isfinite(o).all()
        torch.testing.assert_close(o, e, rtol=2e-2, atol=2e-4)
    torch.testing.assert_close(out[2], ref[2], rtol=0, atol=0)  # counts are exact


def test_one_pass_rows_that_see_nothing_of_a_block():
    """Every probe before the last key blocks: those blocks get zero score and zero count."""
    t, d = 100, 32
    _, q, k = _inputs(7, 1, 1, 2, t, d, torch.float16)
    lse = causal_lse(q, k, d**-0.5)
    rows = torch.tensor([3, 17, 40, 41])
    out = probe_scores_lse(q, k, rows, lse, rows=rows, impl="triton", block_p=16, block_t=16)
    ref = probe_scores_reference(q[:, :, rows], k, rows)
    for o, e in zip(out, ref):
        torch.testing.assert_close(o, e, rtol=2e-2, atol=2e-4)
    assert float(out[1][..., 42:].abs().max()) == 0.0 and float(out[2][..., 42:].abs().max()) == 0.0


def test_one_pass_validation():
    q, k = torch.randn(1, 2, 5, 32), torch.randn(1, 1, 5, 32)
    with pytest.raises(ValueError, match="lse"):
        probe_scores_lse(q, k, torch.arange(5), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="probe_pos"):
        probe_scores_lse(q, k, torch.arange(2), torch.zeros(1, 2, 5), rows=torch.arange(3))


def _prompt_through_layer(monkeypatch, q, k, v, lse_op, impl):
    """One ZipCacheLayer: the prompt forward (update + attend), then a 5-token chunk with its
    mask. Returns (prompt output, layer, how often the LSE op was asked)."""
    from zipkv.attention import forget
    from zipkv.cache import layer as layer_mod
    from zipkv.cache.config import CompressionConfig

    asked = []
    monkeypatch.setattr(layer_mod, "causal_attention_lse", lambda *a: asked.append(1) or lse_op(*a))
    monkeypatch.setattr(layer_mod, "PROBE_IMPL", impl)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups, module.layer_idx = True, q.shape[1] // k.shape[1], 0
    # residual_length above the prompt: nothing is quantized, so the scores stay readable
    layer = layer_mod.ZipCacheLayer(CompressionConfig(residual_length=1000), 0)
    t, n = q.shape[2], 5
    out, _ = layer.attend(module, q, *layer.update(k, v), None, None)
    scores = layer.score_sum.clone(), layer.score_count.clone()
    mask = (torch.arange(t + n)[None, :] <= torch.arange(t, t + n)[:, None])[None, None]
    layer.attend(module, q[:, :, :n], *layer.update(k[:, :, :n], v[:, :, :n]), mask, None)
    forget(layer)
    return out, scores, len(asked)


def test_first_prompt_scores_with_attention_lse(monkeypatch):
    """The CUDA prompt path, on CPU: a stand-in for the flash op (SDPA output + float32 LSE)
    feeds the one-pass kernel; outputs and scores equal the SDPA + reference path, and only
    the first forward (q_len == kv_len, no mask) asks for the LSE."""
    import torch.nn.functional as F

    t, d, r = 120, 32, 2
    _, q, k = _inputs(11, 2, 2, r, t, d, torch.bfloat16)
    v = torch.randn(k.shape).to(torch.bfloat16)

    def flash_stand_in(query, key, value, scaling):
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        return out, causal_lse(query, key, scaling)

    out, (summed, counts), asked = _prompt_through_layer(monkeypatch, q, k, v, flash_stand_in, "triton")
    ref_out, (ref_summed, ref_counts), _ = _prompt_through_layer(monkeypatch, q, k, v, lambda *a: None, "auto")
    assert asked == 1
    from zipkv.kernels.attention_lse import causal_attention_lse

    assert causal_attention_lse(q, k, v, d**-0.5) is None  # off CUDA the layer keeps SDPA
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(summed, ref_summed, rtol=2e-2, atol=2e-4)
    torch.testing.assert_close(counts, ref_counts, rtol=0, atol=0)
    assert float(counts.min()) >= 1  # the recent probes see every key


@pytest.mark.parametrize("r", [2, 4])
@pytest.mark.parametrize("variant", [dict(kernel="v1"), dict(kernel="v2"), dict(kernel="v2", splits=2),
                                     dict(kernel="v2", splits=4), dict(kernel="v2", indexed=True),
                                     dict(kernel="v2", splits=3, indexed=True)])
def test_kernel_variants_match_reference(r, variant):
    """Every kernel variant on fresh random data: GQA R = 2 and 4, unsorted probe positions,
    a ragged last key block, keys past the last probe (no probe sees them: zero score and
    count), key blocks that rows see partly, and more row blocks than splits."""
    t, d = 203, 32
    seed = int(torch.randint(0, 1 << 30, (1,)))
    g, q, k = _inputs(seed, 2, 2, r, t, d, torch.bfloat16)
    scaling = d**-0.5
    lse = causal_lse(q, k, scaling)
    last = 150  # keys 151.. are seen by no probe
    rows = torch.cat([torch.tensor([last]), torch.randperm(last, generator=g)[:40]])
    rows = rows[torch.randperm(rows.numel(), generator=g)]
    ref = probe_scores_reference(q[:, :, rows], k, rows, None, scaling)
    out = probe_scores_lse(q, k, rows, lse, scaling, rows=rows, impl="triton", block_p=16, block_t=32, **variant)
    for o, e in zip(out, ref):
        assert o.shape == e.shape and torch.isfinite(o).all()
        torch.testing.assert_close(o, e, rtol=2e-2, atol=2e-4)
    torch.testing.assert_close(out[2], ref[2], rtol=0, atol=0)
    assert float(out[1][..., last + 1:].abs().max()) == 0.0 and float(out[2][..., last + 1:].abs().max()) == 0.0
    # sorted positions handed over as such (the layer's call) give the same sums
    srt, order = rows.sort()
    out2 = probe_scores_lse(q, k, srt, lse, scaling, rows=srt, impl="triton", positions_sorted=True,
                            block_p=16, block_t=32, **variant)
    torch.testing.assert_close(out2[1], out[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out2[2], out[2], rtol=0, atol=0)


def test_unknown_kernel_is_refused():
    q, k = torch.randn(1, 2, 5, 32), torch.randn(1, 1, 5, 32)
    with pytest.raises(ValueError, match="kernel"):
        probe_scores_lse(q, k, torch.arange(5), torch.zeros(1, 2, 5), impl="triton", kernel="v9")
