"""H2O's per-step kernels compiled on a GPU (kernels/attention_mass.py, _triton_attention_mass.py)
vs their PyTorch references on fresh random inputs (seed in every failure message), with the
log-sum-exp from the Triton decode attention as the static layer gets it; a CUDA-graph replay;
a static h2o decode past 1024 slots (window_scores' old limit); the step's time printed at
Llama-3-8B shapes (8 rows x 6554 slots x 8 KV heads, GQA 4, d 128, bf16) beside the eager
reference it replaced.

Run: pytest -q -s -m gpu tests/test_gpu_attention_mass.py (-s prints the GB/s line).
"""

import pytest
import torch

from gpu_check import check_close, fresh_generator, randint

DEVICE = "cuda"  # a module constant: the bodies can be dry-run on the CPU under the interpreter
gpu = pytest.mark.gpu
GRID = [(d, r, dtype) for d in (64, 128) for r in (1, 4, 8) for dtype in (torch.float16, torch.bfloat16)]
GRID_IDS = [f"d{d}-r{r}-{str(dtype)[6:]}" for d, r, dtype in GRID]
MAX_SLOTS = 9000  # past 1024 (window_scores' kernel limit) and past several blocks of every size


def step(g, b, hkv, r, n, d, dtype):
    """query, keys, lengths (ragged count), real (left padding), and the Triton decode
    attention's lse over the visible slots, on DEVICE."""
    from zipkv.kernels.attention_mass import visible_slots
    from zipkv.kernels.decode_attention import decode_attention

    query = torch.randn(b, hkv * r, 1, d, generator=g).to(dtype).to(DEVICE)
    keys = torch.randn(b, hkv, n, d, generator=g).to(dtype).to(DEVICE)
    count = randint(g, n // 2, n + 1)
    lengths = torch.tensor([count], dtype=torch.int32, device=DEVICE)
    real = torch.rand(b, n, generator=g) > 0.1
    for row in range(1, b):
        real[row, :randint(g, 1, count // 2)] = False
    real[:, count - 1] = True
    real = real.to(DEVICE)
    mask = real & (torch.arange(n, device=DEVICE) < count)
    _, lse = decode_attention(query, [], keys, keys, mask=mask, scale=d ** -0.5, impl="triton", return_lse=True)
    assert visible_slots(real, lengths, n)[:, 0].equal(mask)
    return query, keys, lengths, real, lse


@gpu
@pytest.mark.parametrize("d,r,dtype", GRID, ids=GRID_IDS)
def test_attention_mass_and_choice_match_reference(d, r, dtype):
    from zipkv.kernels.attention_mass import (attention_mass, attention_mass_and_lowest_slot,
                                              attention_mass_reference, lowest_slot_reference)

    seed, g = fresh_generator()
    b, hkv, n = 3, 2, randint(g, 2, MAX_SLOTS)
    context = f"seed={seed} d={d} R={r} {dtype} N={n}"
    query, keys, lengths, real, lse = step(g, b, hkv, r, n, d, dtype)
    base = (torch.randint(0, 3, (b, hkv, n), generator=g).float() / 2).to(DEVICE)
    want, got = base.clone(), base.clone()
    attention_mass_reference(query, keys, lengths, real, lse, want, d ** -0.5)
    attention_mass(query, keys, lengths, real, lse, got, d ** -0.5, impl="triton")
    check_close(got, want, context + " totals", rtol=1e-4, atol=1e-6)
    # the decode kernel's lse (q rounded to the key dtype) normalizes the float32 scores to ~1
    sums = (got - base).sum(-1)
    check_close(sums, torch.ones_like(sums), context + " probabilities sum to 1", rtol=0, atol=3e-2)

    stamp = torch.stack([torch.randperm(n, generator=g) for _ in range(b * hkv)]).view(b, hkv, n)
    stamp = stamp.to(torch.int32).to(DEVICE)
    newest = torch.tensor([n - 1], dtype=torch.int32, device=DEVICE)
    recent = torch.randint(0, max(1, n // 2), (b,), generator=g).to(DEVICE)
    fused_t, fused_f = base.clone(), torch.full((b, hkv), -1, device=DEVICE)
    attention_mass_and_lowest_slot(query, keys, lengths, real, lse, fused_t, stamp, newest, recent, fused_f,
                                   d ** -0.5, impl="triton")
    assert torch.equal(fused_t, got), f"{context}: the fused pass's totals differ from attention_mass's"
    want_f = torch.full((b, hkv), -1, device=DEVICE)
    lowest_slot_reference(fused_t, stamp, real, lengths, newest, recent, want_f)
    assert torch.equal(fused_f, want_f), f"{context}: slot {fused_f.tolist()} != reference {want_f.tolist()}"


@gpu
@pytest.mark.parametrize("n", [37, 5000, 600_000])  # 600K slots: 1172 blocks of 512, two merge chunks
def test_lowest_slot_matches_reference_exactly(n):
    from zipkv.kernels.attention_mass import lowest_slot, lowest_slot_reference

    seed, g = fresh_generator()
    b, h = 3, 2
    totals = (torch.randint(0, 4, (b, h, n), generator=g).float() / 4).to(DEVICE)  # many exact ties
    stamp = torch.stack([torch.randperm(n, generator=g) for _ in range(b * h)]).view(b, h, n).to(torch.int32)
    stamp = stamp.to(DEVICE)
    real = (torch.rand(b, n, generator=g) > 0.1).to(DEVICE)
    lengths = torch.tensor([randint(g, n // 2, n + 1)], dtype=torch.int32, device=DEVICE)
    newest = torch.tensor([n - 1], dtype=torch.int32, device=DEVICE)
    recent = torch.tensor([0, randint(g, 0, n // 2), n], device=DEVICE)  # the last row: nothing old enough
    want, got = torch.full((b, h), -1, device=DEVICE), torch.full((b, h), -1, device=DEVICE)
    lowest_slot_reference(totals, stamp, real, lengths, newest, recent, want)
    lowest_slot(totals, stamp, real, lengths, newest, recent, got, impl="triton")
    assert torch.equal(got, want), f"seed={seed} n={n}: {got.tolist()} != {want.tolist()}"


@gpu
def test_a_cuda_graph_replays_the_fused_step_with_new_device_counts():
    """Captured once; the count, newest stamp and totals change on the device between replays
    (as in the static decode), and each replay equals an uncaptured call."""
    from zipkv.kernels.attention_mass import attention_mass_and_lowest_slot

    seed, g = fresh_generator()
    b, hkv, r, n, d = 2, 2, 4, 3000, 128
    query, keys, lengths, real, lse = step(g, b, hkv, r, n, d, torch.bfloat16)
    totals = torch.zeros(b, hkv, n, device=DEVICE)
    stamp = torch.arange(n, dtype=torch.int32, device=DEVICE).expand(b, hkv, -1).contiguous()
    newest = torch.tensor([n - 1], dtype=torch.int32, device=DEVICE)
    recent = torch.tensor([100, 7], device=DEVICE)
    free = torch.zeros(b, hkv, dtype=torch.int64, device=DEVICE)
    args = lambda t, f: (query, keys, lengths, real, lse, t, stamp, newest, recent, f, d ** -0.5)
    attention_mass_and_lowest_slot(*args(totals.clone(), free.clone()))  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attention_mass_and_lowest_slot(*args(totals, free))
    for count in (n, n // 2, 1500):
        lengths.fill_(count)
        newest.fill_(count - 1)
        before = totals.clone()
        want_t, want_f = before.clone(), free.clone()
        attention_mass_and_lowest_slot(*args(want_t, want_f))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(totals, want_t) and torch.equal(free, want_f), f"seed={seed} count={count}"


@gpu
def test_static_h2o_past_1024_slots_equals_the_uncaptured_step_and_generate():
    """A tiny Llama (fp32, d 32) whose h2o layers hold ~1250 slots: the captured decode equals
    the uncaptured one, and its first tokens model.generate's with the eager cache."""
    import zipkv
    from tiny_models import generate_new_tokens, padded_batch, tiny_model

    model = tiny_model("llama", hidden_size=128).to(DEVICE)
    ids, mask = padded_batch(length=2500, pad=40)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    expected = generate_new_tokens(model, zipkv.make_cache("h2o", model.config, ratio=0.5), ids, mask, 12)
    cache = zipkv.make_cache("h2o", model.config, ratio=0.5)
    graph = zipkv.greedy_decode(model, cache, ids, mask, max_new_tokens=12, cuda_graph=True)
    assert cache.layers[0].k_buf.shape[2] > 1024
    plain = zipkv.greedy_decode(model, zipkv.make_cache("h2o", model.config, ratio=0.5), ids, mask,
                                max_new_tokens=12, cuda_graph=False)
    assert torch.equal(graph, plain)
    assert torch.equal(graph[:, :4], expected[:, :4])  # later tokens may part at a near tie (fp16 q . k)


def _time_ms(fn, reps: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


@gpu
def test_the_step_at_llama_3_8b_shapes_beats_the_reference_and_prints_its_bandwidth():
    """One layer's bookkeeping at 8 x 32K, ratio 0.2 (6554 slots per row and KV head): bytes
    read = keys once + totals read and written + stamps + real; printed as GB/s beside the
    eager path it replaced (float32 scores and softmax, masked_fill / amin / argmin)."""
    from zipkv.kernels.attention_mass import attention_mass_and_lowest_slot, attention_mass_reference, \
        lowest_slot_reference

    seed, g = fresh_generator()
    b, hkv, r, n, d = 8, 8, 4, 6554, 128
    query, keys, lengths, real, lse = step(g, b, hkv, r, n, d, torch.bfloat16)
    lengths.fill_(n)
    real.fill_(True)
    totals = torch.rand(b, hkv, n, generator=g).to(DEVICE)
    stamp = torch.arange(n, dtype=torch.int32, device=DEVICE).expand(b, hkv, -1).contiguous()
    newest = torch.tensor([n - 1], dtype=torch.int32, device=DEVICE)
    recent = torch.full((b,), n // 2, device=DEVICE)
    free = torch.zeros(b, hkv, dtype=torch.int64, device=DEVICE)

    def kernel():
        attention_mass_and_lowest_slot(query, keys, lengths, real, lse, totals, stamp, newest, recent, free,
                                       d ** -0.5, impl="triton")

    def reference():
        attention_mass_reference(query, keys, lengths, real, lse, totals, d ** -0.5)
        lowest_slot_reference(totals, stamp, real, lengths, newest, recent, free)

    def first_kernel():  # one block of slots per program, float32 dots
        from zipkv.kernels._triton_attention_mass import mass_and_choice_triton

        mass_and_choice_triton(query, keys, lengths, real, lse, totals, d ** -0.5,
                               choice=(stamp, newest, recent, free), dot=False)

    ms, ref_ms, first_ms = _time_ms(kernel), _time_ms(reference), _time_ms(first_kernel)
    read = keys.numel() * keys.element_size() + 2 * totals.numel() * 4 + stamp.numel() * 4 + real.numel()
    print(f"\nh2o step bookkeeping, one layer, 8 x {n} slots x 8 KV heads, GQA {r}, d {d} bf16: "
          f"kernel {ms * 1e3:.1f} us ({read / ms / 1e6:.0f} GB/s of {read / 1e6:.1f} MB), "
          f"first kernel {first_ms * 1e3:.1f} us ({read / first_ms / 1e6:.0f} GB/s), "
          f"reference {ref_ms * 1e3:.1f} us (seed {seed})")
    assert ms < ref_ms, f"the kernel ({ms:.3f} ms) is not faster than the reference ({ref_ms:.3f} ms)"
