"""ZipVL sparse prefill: gather+SDPA and the Triton kernel (interpreter) vs the reference."""

import pytest
import torch

from triton_mode import switch_to_interpreter

NO_INTERPRETER = switch_to_interpreter()  # None: Triton's interpreter is on (skipped in a compiled GPU session)

from zipkv.kernels.sparse_prefill import sparse_prefill_attention, sparse_prefill_reference  # noqa: E402


def _inputs(dtype):
    g = torch.Generator().manual_seed(2)
    b, hkv, r, s, d = 2, 2, 2, 90, 32
    q = torch.randn(b, hkv * r, s, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, s, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, s, d, generator=g).to(dtype)
    keep = torch.stack([torch.randperm(s, generator=g)[:37].sort().values for _ in range(b)])
    return q, k, v, keep


@pytest.mark.parametrize("impl", ["gather", pytest.param("triton", marks=pytest.mark.skipif(NO_INTERPRETER is not None, reason=str(NO_INTERPRETER)))])
def test_sparse_prefill_matches_reference(impl):
    q, k, v, keep = _inputs(torch.float16 if impl == "triton" else torch.float32)
    ref = sparse_prefill_reference(q, k, v, keep)
    out = sparse_prefill_attention(q, k, v, keep, impl=impl, block_m=16, block_n=16) if impl == "triton" else \
        sparse_prefill_attention(q, k, v, keep, impl=impl)
    assert out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=2e-3)


def test_sparse_prefill_validation():
    q, k, v, keep = _inputs(torch.float32)
    with pytest.raises(ValueError, match="keep_idx"):
        sparse_prefill_attention(q, k, v, keep[0])
    with pytest.raises(ValueError, match="impl"):
        sparse_prefill_attention(q, k, v, keep, impl="flash")
