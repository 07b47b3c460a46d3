"""The compiled token-append kernel on CUDA (kernels/token_append.py) vs its PyTorch reference on
CUDA: the same bytes in every buffer (codes, scales, zeros), the same counts, NaN/inf flagged;
captured in a CUDA graph; and the time of one append (kernel vs reference) at Llama-3-8B shapes.

Run on the GPU machine (compiled Triton, no TRITON_INTERPRET):
    python -m pytest -q -m gpu tests/test_gpu_token_append.py -s
"""

import pytest
import torch

from gpu_check import fresh_generator, randint
from token_append_cases import (check_same, clone_segment, fp8_tie_states, int4_tie_states, random_buffers,
                                random_states, run_both)

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# the reference on CUDA divides by a Python number through its reciprocal (ATen's
# div_true_kernel_cuda); the kernel's RECIP branch reproduces that: a scale differing by one
# ulp here points there first
HINT = "(a scale one ulp off: torch's division by a Python number on CUDA, _triton_token_append RECIP)"


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", ["dense", "fp8", "int4"])
def test_compiled_kernel_writes_the_references_bytes(form, dtype, d):
    for _ in range(4):  # a few fresh draws per case: each a new seed, printed on failure
        seed, gen = fresh_generator()
        b, h, n = randint(gen, 1, 9), randint(gen, 1, 33), randint(gen, 2, 300)
        case = f"seed {seed}: {form} {dtype} B {b} H {h} D {d} N {n}"
        context = f"{case} {HINT}"
        seg = random_buffers(form, b, h, n, d, dtype, gen, device="cuda")
        lengths = torch.randint(0, n, (b,), generator=gen, dtype=torch.int32).cuda()
        keys = random_states(b, h, d, dtype, gen, device="cuda", transposed=True)
        values = random_states(b, h, d, dtype, gen, device="cuda")
        want, got = run_both(keys, values, seg, lengths)
        check_same(want, got, context)
        assert torch.equal(got[1], lengths + 1), context
        finite = bool(torch.isfinite(keys).all() and torch.isfinite(values).all())
        assert finite and not bool(got[2]), f"{case}: nonfinite {bool(got[2])}, the states finite: {finite}"


def test_compiled_kernel_rounds_every_tie_as_the_reference():
    keys = fp8_tie_states().cuda()
    seg = random_buffers("fp8", 1, keys.shape[1], 2, keys.shape[-1], torch.float32, torch.Generator().manual_seed(0),
                         device="cuda")
    check_same(*run_both(keys, keys.clone(), seg, torch.zeros(1, dtype=torch.int32, device="cuda")), "fp8 ties")
    x = int4_tie_states().cuda()
    for dtype in DTYPES:
        seg = random_buffers("int4", 1, 1, 1, x.shape[-1], dtype, torch.Generator().manual_seed(1), device="cuda")
        check_same(*run_both(x.to(dtype), x.to(dtype), seg, torch.zeros(1, dtype=torch.int32, device="cuda")),
                   f"int4 ties {dtype} {HINT}")


@pytest.mark.parametrize("form", ["dense", "fp8", "int4"])
def test_compiled_kernel_flags_nan_and_inf(form):
    seed, gen = fresh_generator()
    b, h, d = 4, 8, 128
    seg = random_buffers(form, b, h, 16, d, torch.bfloat16, gen, device="cuda")
    lengths = torch.tensor([0, 5, 9, 15], dtype=torch.int32, device="cuda")
    keys, values = (random_states(b, h, d, torch.bfloat16, gen, device="cuda") for _ in range(2))
    for bad in (float("nan"), float("inf"), float("-inf")):
        k = keys.clone()
        k[randint(gen, 0, b), randint(gen, 0, h), 0, randint(gen, 0, d)] = bad
        want, got = run_both(k, values, seg, lengths)
        assert bool(got[2]) and bool(want[2]), f"seed {seed}: {bad} in {form} keys not flagged"


@pytest.mark.parametrize("form", ["dense", "fp8", "int4"])
def test_captured_appends_equal_eager_appends(form):
    """Three appends captured in one CUDA graph, replayed: the counts advance on the device and
    every slot holds what three eager reference appends wrote."""
    from zipkv.kernels.token_append import token_append, token_append_reference

    seed, gen = fresh_generator()
    b, h, d, n = 8, 8, 128, 40
    seg = random_buffers(form, b, h, n, d, torch.bfloat16, gen, device="cuda")
    lengths = torch.randint(0, n - 6, (b,), generator=gen, dtype=torch.int32).cuda()
    steps = [[random_states(b, h, d, torch.bfloat16, gen, device="cuda") for _ in range(2)] for _ in range(3)]
    want = (clone_segment(seg), lengths.clone(), torch.tensor(False, device="cuda"))
    for keys, values in steps:
        token_append_reference(keys, values, *want)
    got = (clone_segment(seg), lengths.clone(), torch.tensor(False, device="cuda"))
    start = got[1].clone()
    token_append(*steps[0], clone_segment(seg), lengths.clone(), torch.tensor(False, device="cuda"))  # compile first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for keys, values in steps:
            token_append(keys, values, *got)
    got[1].copy_(start)  # capture ran nothing; the replay is the run
    graph.replay()
    torch.cuda.synchronize()
    check_same(want, got, f"seed {seed}: {form} captured {HINT}")


def time_appends(append, replays: int = 20) -> float:
    """Microseconds per append: 32 appends (one per layer of Llama-3-8B) captured in a CUDA
    graph, replayed (the counts rewound between replays)."""
    graph = torch.cuda.CUDAGraph()
    append()  # compile / warm up
    with torch.cuda.graph(graph):
        for _ in range(32):
            append()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * 32)


@pytest.mark.parametrize("form", ["dense", "fp8", "int4"])
def test_one_launch_beats_the_reference(form):
    """8 rows x 8 KV heads x d 128, bf16 (Llama-3-8B at batch 8), capacity 32K: the fused
    append is faster than the reference's launches. Prints us per layer and per 32-layer step."""
    from zipkv.kernels.token_append import token_append, token_append_reference

    gen = torch.Generator().manual_seed(0)
    b, h, d, n = 8, 8, 128, 32768
    seg = random_buffers(form, b, h, n, d, torch.bfloat16, None, device="cuda")  # zeros
    keys, values = (random_states(b, h, d, torch.bfloat16, gen, device="cuda") for _ in range(2))
    flag = torch.tensor(False, device="cuda")
    lengths = torch.full((b,), 100, dtype=torch.int32, device="cuda")
    rewind = lengths.clone()

    def fused():
        lengths.copy_(rewind)  # one more launch in both timings: the counts stay in range
        token_append(keys, values, seg, lengths, flag)

    def reference():
        lengths.copy_(rewind)
        token_append_reference(keys, values, seg, lengths, flag)

    t_kernel, t_ref = time_appends(fused), time_appends(reference)
    print(f"\n{form}: append {t_kernel:.1f} us/layer fused vs {t_ref:.1f} us/layer reference "
          f"(32 layers: {32 * t_kernel / 1e3:.3f} vs {32 * t_ref / 1e3:.3f} ms/step; each with a 1-launch rewind)")
    assert t_kernel < t_ref
