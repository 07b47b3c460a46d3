"""The fused decode-step window kernels (Triton interpreter) vs their PyTorch references."""

import pytest
import torch

from triton_mode import interpreter_module_mark

pytestmark = interpreter_module_mark()  # Triton's interpreter; skipped in a compiled GPU session

from zipkv.kernels.window_step import (  # noqa: E402
    window_append, window_append_reference, window_scores, window_scores_reference, write_slots, write_slots_reference)


def _window(b, h, w, d, dtype, g):
    return torch.randn(b, h, w, d, generator=g).to(dtype), torch.randn(b, h, w, d, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_write_slots_matches_reference(dtype):
    """The slot writer (streaming_llm's ring, h2o's freed slot): each (row, head) its own slot,
    an expanded per-row slot too (stride 0 over heads), the NaN / inf flag."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    g = torch.Generator().manual_seed(seed)
    b, h, n, d = 3, 4, 17, 64
    k_buf, v_buf = _window(b, h, n, d, dtype, g)
    keys = torch.randn(b, 1, h, d, generator=g).to(dtype).transpose(1, 2)  # a model's [B, T, H, D] layout
    values = torch.randn(b, h, 1, d, generator=g).to(dtype)
    for slot in (torch.randint(0, n, (b, h), generator=g), torch.randint(0, n, (b,), generator=g)[:, None].expand(b, h)):
        want = [k_buf.clone(), v_buf.clone(), torch.zeros((), dtype=torch.bool)]
        got = [k_buf.clone(), v_buf.clone(), torch.zeros((), dtype=torch.bool)]
        write_slots_reference(keys, values, *want[:2], slot, want[2])
        write_slots(keys, values, *got[:2], slot, got[2], impl="triton")
        for x, y in zip(got, want):
            assert torch.equal(x, y), seed
        assert not bool(got[2])
    bad = values.clone()
    bad[2, 1, 0, 3] = float("nan")
    flag = torch.zeros((), dtype=torch.bool)
    write_slots(keys, bad, *got[:2], slot, flag, impl="triton")
    assert bool(flag)
    with pytest.raises(ValueError, match="slot must be int64"):
        write_slots(keys, values, *got[:2], slot.int(), flag)


# fp32 states into a bf16 window take the reference (the kernel copies, never casts)
@pytest.mark.parametrize("state_dtype,win_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                                   (torch.float32, torch.bfloat16)])
def test_window_append_matches_reference(state_dtype, win_dtype):
    g = torch.Generator().manual_seed(1)
    b, h, w, d = 2, 3, 20, 32
    k_win, v_win = _window(b, h, w, d, win_dtype, g)
    lengths = torch.tensor([50, 7, 11], dtype=torch.int32)  # two tiers, then the window's count
    # keys laid out [B, T, H, D] in memory, as a model's transposed projections are
    keys = torch.randn(b, 1, h, d, generator=g).to(state_dtype).transpose(1, 2)
    values = torch.randn(b, h, 1, d, generator=g).to(state_dtype)
    want = [k_win.clone(), v_win.clone(), torch.zeros((), dtype=torch.bool)]
    got = [k_win.clone(), v_win.clone(), torch.zeros((), dtype=torch.bool)]
    window_append_reference(keys, values, *want[:2], lengths, want[2])
    window_append(keys, values, *got[:2], lengths, got[2], impl="triton")
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    assert not bool(got[2]) and torch.equal(got[0][:, :, 11], keys[:, :, 0].to(win_dtype))
    for bad in (float("nan"), float("inf")):  # one bad element anywhere sets the flag
        v_bad = values.clone()
        v_bad[1, 2, 0, 5] = bad
        flag = torch.zeros((), dtype=torch.bool)
        window_append(keys, v_bad, *got[:2], lengths, flag, impl="triton")
        assert bool(flag)
    with pytest.raises(ValueError, match="keys and values"):
        window_append(keys[:, :, :, :16], values, *got[:2], lengths, flag)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_window_scores_match_reference(dtype):
    g = torch.Generator().manual_seed(2)
    b, hkv, r, w, d = 3, 2, 4, 37, 64
    k_win, _ = _window(b, hkv, w, d, dtype, g)
    q = torch.randn(b, hkv * r, 1, d, generator=g).to(dtype)
    lengths = torch.tensor([100, 30], dtype=torch.int32)  # slots >= 30 are not written yet
    real = torch.ones(b, w, dtype=torch.bool)
    real[1, :9] = False     # left padding
    real[2, :] = False      # a row that sees nothing: adds zeros
    base = torch.rand(b, hkv, w, generator=g), torch.randint(0, 5, (b, 1, w), generator=g).float()
    want = [base[0].clone(), base[1].clone()]
    got = [base[0].clone(), base[1].clone()]
    window_scores_reference(q, k_win, lengths, real, *want, 0.125)
    window_scores(q, k_win, lengths, real, *got, 0.125, impl="triton")
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-6)
    assert torch.equal(got[1], want[1])  # visibility counts are exact
    added = got[0] - base[0]
    assert float(added[:, :, 30:].abs().max()) == 0.0 and float(added[2].abs().max()) == 0.0
    torch.testing.assert_close(added[0].sum(-1), torch.ones(hkv))  # a softmax per head, averaged over its queries
    with pytest.raises(ValueError, match="query"):
        window_scores(q[:, :3], k_win, lengths, real, *got, 0.125)
