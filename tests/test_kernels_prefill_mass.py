"""kernels/prefill_mass.py: H2O's prefill totals. The Triton kernels (under the interpreter
on the CPU) against the reference, and the reference against the eviction scorer's chunked
accumulate (the eager h2o policy's path), on fresh random inputs with left padding and GQA."""

import pytest
import torch
from triton_mode import use_interpreter_or_skip

from zipkv.kernels.prefill_mass import prefill_attention_mass, prefill_attention_mass_reference


def _inputs(b, hq, hkv, t, d, pad, dtype, g):
    query = torch.randn(b, hq, t, d, generator=g).to(dtype)
    keys = (torch.randn(b, hkv, t, d, generator=g) * 2).to(dtype)
    real = torch.ones(b, t, dtype=torch.bool)
    if b > 1:
        real[1, :pad] = False  # a left-padded row
    return query, keys, real


def _seed():
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    return seed, torch.Generator().manual_seed(seed)


def test_reference_equals_the_h2o_scorers_accumulate():
    """The reference in chunks of 23 queries = H2OScorer.accumulate over the whole prompt
    (the eviction scorer, one [B, Hkv, G, T, T] matrix)."""
    from zipkv.eviction import H2OScorer

    seed, g = _seed()
    query, keys, real = _inputs(2, 8, 2, 70, 16, 9, torch.float32, g)
    want = H2OScorer(recent=0, query_chunk=10**6).accumulate(keys, query, real, scaling=0.25)
    got = prefill_attention_mass_reference(query, keys, real, 0.25, query_chunk=23)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (seed, (got - want).abs().max())
    assert torch.isneginf(got[1, :, :9]).all()


@pytest.mark.parametrize("shape", [(2, 8, 2, 70, 16, 9), (1, 4, 4, 33, 32, 0), (3, 6, 1, 130, 64, 40)])
def test_triton_equals_the_reference(shape):
    use_interpreter_or_skip()
    seed, g = _seed()
    b, hq, hkv, t, d, pad = shape
    query, keys, real = _inputs(b, hq, hkv, t, d, pad, torch.float32, g)
    want = prefill_attention_mass_reference(query, keys, real, 0.2)
    got = prefill_attention_mass(query, keys, real, 0.2, impl="triton")
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    finite = ~torch.isneginf(want)
    assert torch.allclose(got[finite], want[finite], atol=1e-4, rtol=1e-4), (seed, (got - want)[finite].abs().max())
    # each real query's probabilities sum to one: the totals of a row sum to its real query count
    assert torch.allclose(got.nan_to_num(neginf=0.0).sum(-1), real.sum(-1, keepdim=True).float().expand(b, hkv),
                          atol=1e-3)


def test_bad_inputs_name_what_is_wrong():
    q, k, real = torch.zeros(1, 4, 8, 16), torch.zeros(1, 3, 8, 16), torch.ones(1, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        prefill_attention_mass(q, k, real, 0.25)
    with pytest.raises(ValueError, match="real must be bool"):
        prefill_attention_mass(q, torch.zeros(1, 2, 8, 16), real.int(), 0.25)
    with pytest.raises(ValueError, match="share B, T and D"):
        prefill_attention_mass(q, torch.zeros(1, 2, 9, 16), real, 0.25)


@pytest.mark.parametrize("shape", [(2, 8, 2, 70, 16, 0), (1, 6, 3, 129, 64, 0), (2, 4, 1, 40, 32, 7)])
def test_triton_given_the_prompt_lse_equals_the_reference(shape):
    """The one-pass path: the log-sum-exp handed in (as the prompt's flash attention returns
    it, natural log) instead of the kernel's own first pass."""
    use_interpreter_or_skip()
    seed, g = _seed()
    b, hq, hkv, t, d, pad = shape
    query, keys, real = _inputs(b, hq, hkv, t, d, pad, torch.float32, g)
    s = (query.reshape(b, hkv, hq // hkv, t, d) @ keys[:, :, None].transpose(-1, -2)).reshape(b, hq, t, t) * 0.2
    visible = torch.ones(t, t, dtype=torch.bool).tril()[None] & real[:, None, :] & real[:, :, None]
    lse = s.masked_fill(~visible[:, None], float("-inf")).logsumexp(-1)  # padding queries: -inf
    want = prefill_attention_mass_reference(query, keys, real, 0.2)
    got = prefill_attention_mass(query, keys, real, 0.2, impl="triton", lse=lse)
    finite = ~torch.isneginf(want)
    assert torch.equal(torch.isneginf(got), ~finite)
    assert torch.allclose(got[finite], want[finite], atol=1e-4, rtol=1e-4), (seed, (got - want)[finite].abs().max())


def test_a_wrong_lse_shape_is_refused():
    q, k, real = torch.zeros(1, 4, 8, 16), torch.zeros(1, 2, 8, 16), torch.ones(1, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"lse must be \[B, Hq, T\] = \(1, 4, 8\)"):
        prefill_attention_mass(q, k, real, 0.25, lse=torch.zeros(1, 4, 7))


@pytest.mark.parametrize("blocks", [(16, 32), (32, 16), (16, 16)])
@pytest.mark.parametrize("pad", [0, 5])
def test_triton_tiles_of_other_sizes_equal_the_reference(blocks, pad):
    """Query and key blocks of unequal sizes, many blocks below the diagonal (the unmasked
    loop of an unpadded prompt) and a partial last block."""
    use_interpreter_or_skip()
    from zipkv.kernels._triton_prefill_mass import prefill_mass_triton

    seed, g = _seed()
    query, keys, real = _inputs(2, 4, 2, 75, 16, pad, torch.float32, g)
    want = prefill_attention_mass_reference(query, keys, real, 0.3)
    got = prefill_mass_triton(query, keys, real, 0.3, block_m=blocks[0], block_n=blocks[1])
    finite = ~torch.isneginf(want)
    assert torch.allclose(got[finite], want[finite], atol=1e-4, rtol=1e-4), (seed, (got - want)[finite].abs().max())
