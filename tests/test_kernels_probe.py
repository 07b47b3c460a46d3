"""Probe-score kernels (Triton interpreter) vs zipkv.saliency.attention_scores."""

import pytest
import torch

from triton_mode import interpreter_module_mark

pytestmark = interpreter_module_mark()  # Triton's interpreter; skipped in a compiled GPU session

from zipkv.kernels.probe_scores import probe_scores, probe_scores_reference  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_probe_scores_match_reference(dtype):
    g = torch.Generator().manual_seed(0)
    b, hkv, r, t, d = 2, 2, 3, 150, 64
    q = torch.randn(b, hkv * r, 20, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, t, d, generator=g).to(dtype)
    pos = torch.cat([torch.randperm(130, generator=g)[:10].sort().values + 10, torch.arange(140, 150)])
    key_mask = torch.ones(b, t, dtype=torch.bool)
    key_mask[1, :17] = False  # left padding
    out = probe_scores(q, k, pos, key_mask, impl="triton", block_p=16, block_t=32)
    ref = probe_scores_reference(q, k, pos, key_mask)
    for o, e in zip(out, ref):
        assert o.shape == e.shape and torch.isfinite(o).all()
        torch.testing.assert_close(o, e, rtol=2e-2, atol=2e-4)
    torch.testing.assert_close(out[2], ref[2], rtol=0, atol=0)  # counts are exact
    assert float(out[0][1, :, :17].abs().max()) == 0.0  # padding never salient


def test_probe_validation():
    q = torch.randn(1, 2, 3, 32)
    k = torch.randn(1, 1, 10, 32)
    with pytest.raises(ValueError, match="probe_pos"):
        probe_scores(q, k, torch.arange(2))
    with pytest.raises(ValueError, match="key_mask"):
        probe_scores(q, k, torch.arange(3), key_mask=torch.ones(1, 9, dtype=torch.bool))
