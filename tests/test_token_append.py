"""The fused token append of the static baselines (kernels/token_append.py; Triton interpreter)
vs its PyTorch reference: the same bytes in every buffer, the same counts, NaN/inf flagged."""

import pytest
import torch

from triton_mode import interpreter_module_mark

pytestmark = interpreter_module_mark()  # Triton's interpreter; skipped in a compiled GPU session

from gpu_check import fresh_generator, randint  # noqa: E402
from token_append_cases import (  # noqa: E402
    check_same, clone_segment, differences, fp8_tie_states, int4_tie_states, random_buffers, random_states,
    run_both)

from zipkv.kernels.flash_decode import FlashSegment  # noqa: E402
from zipkv.kernels.token_append import token_append  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def test_random_states_are_finite_at_every_magnitude():
    """The inputs' own check: the H200's failing draw (seed 2607220460, the gpu test's draw order:
    dense fp16, B 2, H 27, D 256, N 196) had one key at inf before the states were bounded, and
    both sides rightly flagged it; it and other draws of every dtype are finite now, the largest
    magnitudes still reach the bound's octave, and the small ones stay."""
    gen = torch.Generator().manual_seed(2607220460)
    b, h, n = randint(gen, 1, 9), randint(gen, 1, 33), randint(gen, 2, 300)
    random_buffers("dense", b, h, n, 256, torch.float16, gen)
    torch.randint(0, n, (b,), generator=gen, dtype=torch.int32)
    assert (b, h, n) == (2, 27, 196)
    assert torch.isfinite(random_states(b, h, 256, torch.float16, gen, transposed=True)).all()
    for dtype in DTYPES:
        for seed in range(20):
            assert torch.isfinite(random_states(8, 32, 256, dtype, torch.Generator().manual_seed(seed))).all()
    x = torch.cat([random_states(8, 32, 256, torch.float16, torch.Generator().manual_seed(s)) for s in range(8)])
    peaks = x.float().abs().amax(dim=-1).flatten()
    assert peaks.max() > torch.finfo(torch.float16).max / 8 and peaks[peaks > 0].min() < 2.0 ** -8


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", ["dense", "fp8", "int4"])
def test_kernel_writes_the_references_bytes(form, dtype, d):
    seed, gen = fresh_generator()
    b, h, n = randint(gen, 1, 5), randint(gen, 1, 9), randint(gen, 2, 20)
    context = f"seed {seed}: {form} {dtype} B {b} H {h} D {d} N {n}"
    seg = random_buffers(form, b, h, n, d, dtype, gen)
    lengths = torch.randint(0, n, (b,), generator=gen, dtype=torch.int32)  # ragged, one slot free at least
    keys = random_states(b, h, d, dtype, gen, transposed=True)
    values = random_states(b, h, d, dtype, gen)
    want, got = run_both(keys, values, seg, lengths)
    check_same(want, got, context)
    assert torch.equal(got[1], lengths + 1) and not bool(got[2]), context
    slots = torch.arange(n)[None, :] != lengths.long()[:, None]  # every other slot keeps its bytes
    assert torch.equal(got[0].k[slots[:, None].expand(b, h, n)].view(torch.uint8),
                       seg.k[slots[:, None].expand(b, h, n)].view(torch.uint8)), context


def test_fp8_codes_round_every_tie_and_neighbour_as_torch():
    """Scale exactly 1 (amax 448), the elements at every rounding case of e4m3 (ties, one
    float32 step off them, subnormals, -0.0): the kernel's bit-level encoding rounds each as
    torch's cast (ties to even)."""
    keys = fp8_tie_states()
    rows = keys.shape[1]
    seg = random_buffers("fp8", 1, rows, 2, keys.shape[-1], torch.float32, torch.Generator().manual_seed(0))
    want, got = run_both(keys, keys.clone(), seg, torch.zeros(1, dtype=torch.int32))
    assert torch.equal(want[0].k_scale[:, :, 0], torch.ones(1, rows))
    check_same(want, got, "fp8 ties")


def test_int4_codes_round_ties_to_even():
    x = int4_tie_states()
    for dtype in DTYPES:
        seg = random_buffers("int4", 1, 1, 1, x.shape[-1], dtype, torch.Generator().manual_seed(1))
        want, got = run_both(x.to(dtype), x.to(dtype), seg, torch.zeros(1, dtype=torch.int32))
        assert want[0].k_scale.float().item() == 1.0 and want[0].k_zero.float().item() == 0.0
        check_same(want, got, f"int4 ties {dtype}")


@pytest.mark.parametrize("form", ["dense", "fp8", "int4"])
def test_nan_and_inf_are_flagged(form):
    seed, gen = fresh_generator()
    b, h, d = 2, 3, 64
    seg = random_buffers(form, b, h, 4, d, torch.bfloat16, gen)
    lengths = torch.tensor([1, 3], dtype=torch.int32)
    keys, values = (random_states(b, h, d, torch.bfloat16, gen) for _ in range(2))
    for bad in (float("nan"), float("inf"), float("-inf")):
        for side in ("keys", "values"):
            k, v = keys.clone(), values.clone()
            (k if side == "keys" else v)[randint(gen, 0, b), randint(gen, 0, h), 0, randint(gen, 0, d)] = bad
            want, got = run_both(k, v, seg, lengths)
            assert bool(got[2]) and bool(want[2]), f"seed {seed}: {bad} in {form} {side} not flagged"
            assert torch.equal(got[1], lengths + 1)
    # finite states leave a raised flag raised (nonfinite |= ...)
    _, got = run_both(keys, values, seg, lengths, flag=True)
    assert bool(got[2])


def test_a_full_row_is_left_alone():
    """The host refuses a step past the capacity; were one run, the kernel writes nothing into
    a full row and leaves its count (the reference's scatter would fail)."""
    gen = torch.Generator().manual_seed(3)
    seg = random_buffers("int4", 2, 2, 4, 64, torch.float16, gen)
    lengths = torch.tensor([4, 2], dtype=torch.int32)
    keys = random_states(2, 2, 64, torch.float16, gen)
    s, n, f = clone_segment(seg), lengths.clone(), torch.tensor(False)
    token_append(keys, keys, s, n, f, impl="triton")
    assert n.tolist() == [4, 3]
    assert differences(FlashSegment("int4", *(t[:1] for t in s.tensors())),
                       FlashSegment("int4", *(t[:1] for t in seg.tensors()))) == {}


def test_routing_and_bad_inputs():
    gen = torch.Generator().manual_seed(4)
    seg = random_buffers("fp8", 2, 2, 4, 48, torch.float16, gen)
    keys = random_states(2, 2, 48, torch.float16, gen)
    lengths, flag = torch.zeros(2, dtype=torch.int32), torch.tensor(False)
    with pytest.raises(ValueError, match="head_dim 48"):
        token_append(keys, keys, seg, lengths, flag, impl="triton")
    token_append(keys, keys, seg, lengths, flag)  # auto on the CPU: the reference
    assert lengths.tolist() == [1, 1]
    fp32_params = FlashSegment("int4", *random_buffers("int4", 2, 2, 4, 64, torch.float32, gen).tensors()[:2],
                               *(torch.zeros(2, 2, 4) for _ in range(4)))
    with pytest.raises(ValueError, match="never casts"):  # int4 of fp32 states keeps fp16 parameters
        token_append(*(random_states(2, 2, 64, torch.float32, gen) for _ in range(2)), fp32_params, lengths, flag,
                     impl="triton")
    with pytest.raises(ValueError, match="keys and values"):
        token_append(keys[:, :1], keys, seg, lengths, flag)
    with pytest.raises(ValueError, match="lengths"):
        token_append(keys, keys, seg, lengths.long(), flag)
    with pytest.raises(ValueError, match="nonfinite"):
        token_append(keys, keys, seg, lengths, torch.zeros(1, dtype=torch.bool))
    with pytest.raises(ValueError, match="impl"):
        token_append(keys, keys, seg, lengths, flag, impl="cuda")


def test_custom_op_passes_opcheck():
    """The torch.compile op (kernels/ops.py): its declared mutations, fake implementation and
    schema (opcheck); the compiled step below traces it."""
    from zipkv.kernels import ops

    gen = torch.Generator().manual_seed(5)
    seg = random_buffers("int4", 2, 2, 4, 64, torch.bfloat16, gen)
    keys, values = (random_states(2, 2, 64, torch.bfloat16, gen) for _ in range(2))
    fields = [seg.k, seg.v, seg.k_scale, seg.v_scale, seg.k_zero, seg.v_zero]
    torch.library.opcheck(ops.token_append_op, (keys, values, "int4", *fields, torch.tensor([0, 2], dtype=torch.int32),
                                                torch.tensor(False)))
    query = random_states(2, 4, 64, torch.bfloat16, gen)  # [B, Hq, 1, D]: two query heads per KV head
    lengths = torch.tensor([0, 2], dtype=torch.int32)
    torch.library.opcheck(ops.flash_decode_op, (query, "int4", *fields, lengths, 0.125))
    from zipkv.kernels.flash_decode import FlashSegment, flash_decode_reference

    assert torch.equal(ops.flash_decode_op(query, "int4", *fields, lengths, 0.125),
                       flash_decode_reference(query, FlashSegment("int4", *fields), lengths, 0.125))


def test_compiled_static_baseline_step_is_one_graph_per_layer():
    """greedy_decode(compile=...) of the fp8 baseline (the op and the check are the same for
    int4 and full): the eager static tokens, one graph per decoder layer for every step (the
    append's host capacity check is skipped while compiling, as the evicting layers' is: its
    changing count recompiled each step), the append a custom op in each."""
    from test_compiled_decode import counting_backend
    from tiny_models import padded_batch, tiny_model

    import zipkv

    method = "fp8"
    model = tiny_model("llama", num_hidden_layers=2)
    ids, mask = padded_batch(length=24, pad=5)
    run = dict(max_new_tokens=6, cuda_graph=False, eos_token_id=False)
    expected = zipkv.greedy_decode(model, zipkv.make_cache(method, model.config), ids, mask, **run)
    graphs = []
    torch._dynamo.reset()
    tokens = zipkv.greedy_decode(model, zipkv.make_cache(method, model.config), ids, mask,
                                 compile=counting_backend(graphs), **run)
    model.set_attn_implementation("sdpa")
    assert torch.equal(tokens, expected)
    assert len(graphs) == 2, f"{len(graphs)} graphs for 2 layers: a recompile or graph break"
    for graph in graphs:
        ops = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
        assert {"zipkv.token_append.default", "zipkv.flash_decode.default"} <= ops, sorted(ops)
