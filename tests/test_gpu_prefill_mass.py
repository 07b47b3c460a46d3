"""H2O's prefill totals compiled on a GPU (kernels/prefill_mass.py, _triton_prefill_mass.py) vs
the float32 reference on fresh random inputs (seed in every failure message), left padding and
GQA; the time at one Llama-3-8B layer (1 x 8K, 32 query / 8 KV heads, d 128, bf16) printed
beside the reference's.

Run: pytest -q -s -m gpu tests/test_gpu_prefill_mass.py
"""

import time

import pytest
import torch

from gpu_check import check_rel, fresh_generator, randint

DEVICE = "cuda"
gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_mass_matches_the_reference(d, dtype):
    from zipkv.kernels.prefill_mass import prefill_attention_mass, prefill_attention_mass_reference

    seed, g = fresh_generator()
    b, hkv, groups, t = 2, 2, 4, randint(g, 100, 1500)
    pad = randint(g, 1, t // 2)
    query = torch.randn(b, hkv * groups, t, d, generator=g).to(dtype).to(DEVICE)
    keys = torch.randn(b, hkv, t, d, generator=g).to(dtype).to(DEVICE)
    real = torch.ones(b, t, dtype=torch.bool)
    real[1, :pad] = False
    real = real.to(DEVICE)
    got = prefill_attention_mass(query, keys, real, d ** -0.5, impl="triton")
    want = prefill_attention_mass_reference(query, keys, real, d ** -0.5)
    context = f"seed={seed} d={d} {dtype} t={t} pad={pad}"
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), context
    finite = ~torch.isneginf(want)
    check_rel(got[finite], want[finite], 1e-2, context)


@gpu
def test_prefill_mass_time_at_llama3_8b_layer_shapes():
    from zipkv.kernels.prefill_mass import prefill_attention_mass, prefill_attention_mass_reference

    t, d = 8192, 128
    query = torch.randn(1, 32, t, d, device=DEVICE, dtype=torch.bfloat16)
    keys = torch.randn(1, 8, t, d, device=DEVICE, dtype=torch.bfloat16)
    real = torch.ones(1, t, dtype=torch.bool, device=DEVICE)
    times = {}
    for name, fn in (("triton", lambda: prefill_attention_mass(query, keys, real, d ** -0.5, impl="triton")),
                     ("reference", lambda: prefill_attention_mass_reference(query, keys, real, d ** -0.5))):
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(3):
            out = fn()
        torch.cuda.synchronize()
        times[name] = (time.perf_counter() - start) / 3 * 1e3
    print(f"prefill mass 1 x {t}, 32/8 heads, d {d}: triton {times['triton']:.2f} ms, "
          f"reference {times['reference']:.2f} ms")
    assert torch.isfinite(out).all()


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_mass_from_the_fused_attention_lse_matches_the_reference(dtype):
    """The h2o prefill's one-pass path: the lse the prompt's own fused attention returned
    (causal_attention_lse) in place of the kernel's first pass, unpadded GQA prompt."""
    from zipkv.kernels.attention_lse import causal_attention_lse
    from zipkv.kernels.prefill_mass import prefill_attention_mass, prefill_attention_mass_reference

    seed, g = fresh_generator()
    b, hkv, groups, t, d = 2, 2, 4, randint(g, 100, 1500), 128
    query = torch.randn(b, hkv * groups, t, d, generator=g).to(dtype).to(DEVICE)
    keys = torch.randn(b, hkv, t, d, generator=g).to(dtype).to(DEVICE)
    values = torch.randn(b, hkv, t, d, generator=g).to(dtype).to(DEVICE)
    real = torch.ones(b, t, dtype=torch.bool, device=DEVICE)
    fused = causal_attention_lse(query, keys, values, d ** -0.5)
    if fused is None:
        pytest.skip("SDPA's choice here returns no lse (neither cuDNN nor flash)")
    got = prefill_attention_mass(query, keys, real, d ** -0.5, impl="triton", lse=fused[1])
    want = prefill_attention_mass_reference(query, keys, real, d ** -0.5)
    check_rel(got, want, 1e-2, f"seed={seed} {dtype} t={t}")
