"""H2O's per-step kernels (kernels/attention_mass.py; Triton interpreter) vs their PyTorch
references on fresh random inputs (the seed is in every failure message): attention mass from
the decode attention's log-sum-exp, the lowest eligible slot (ties: the oldest), both fused."""

import pytest
import torch
from gpu_check import check_close, fresh_generator, randint

from triton_mode import interpreter_module_mark

pytestmark = interpreter_module_mark()  # Triton's interpreter; skipped in a compiled GPU session

from zipkv.kernels import _triton_attention_mass as triton_mass  # noqa: E402
from zipkv.kernels.attention_mass import (  # noqa: E402
    attention_mass, attention_mass_and_lowest_slot, attention_mass_and_lowest_slot_op, attention_mass_op,
    attention_mass_reference, lowest_slot, lowest_slot_op, lowest_slot_reference, visible_slots)
from zipkv.kernels.decode_attention import decode_attention_reference  # noqa: E402


def step_inputs(g, b, hkv, r, n, d, dtype, per_head=False):
    """A decode step over n slots: query, keys, lengths (ragged count), real (left padding, a
    row that sees nothing, holes), lse of the decode attention over the same visible slots."""
    query = torch.randn(b, hkv * r, 1, d, generator=g).to(dtype)
    keys = (torch.randn(b, hkv, n, d, generator=g) * 1.5).to(dtype)
    count = randint(g, n // 2, n + 1)
    lengths = torch.tensor([randint(g, 0, 99), count], dtype=torch.int32)  # an earlier tier, then the slots
    real = torch.rand(b, hkv, n, generator=g) > 0.2 if per_head else torch.rand(b, n, generator=g) > 0.2
    real[0, ..., :randint(g, 1, count // 2)] = False  # left padding
    real[:2, ..., count - 1] = True  # rows 0 and 1 see at least their newest slot
    if b > 2:
        real[2] = False  # sees nothing: lse -inf, adds nothing
    visible = visible_slots(real, lengths, n)
    mask = visible[:, :, None, :] if per_head else visible[:, 0]
    _, lse = decode_attention_reference(query, [], keys, keys, mask=mask, scale=d ** -0.5, return_lse=True)
    return query, keys, lengths, real, lse


@pytest.mark.parametrize("r", [1, 4, 8])
@pytest.mark.parametrize("dtype,d,n", [(torch.float16, 64, 150), (torch.bfloat16, 32, 37), (torch.float32, 128, 70)])
def test_attention_mass_matches_reference(r, dtype, d, n):
    """Slot counts off the block size (64 at d 128, 128 at d 64, 256 at d 32), ragged counts,
    padding, GQA 1/4/8; the probabilities of a head sum to 1 over its visible slots."""
    seed, g = fresh_generator()
    b, hkv = 3, 2
    query, keys, lengths, real, lse = step_inputs(g, b, hkv, r, n, d, dtype)
    base = torch.rand(b, hkv, n, generator=g) * 3
    want, got = base.clone(), base.clone()
    attention_mass_reference(query, keys, lengths, real, lse, want, d ** -0.5)
    attention_mass(query, keys, lengths, real, lse, got, d ** -0.5, impl="triton")
    context = f"seed={seed} r={r} {dtype} d={d} n={n} count={int(lengths[-1])}"
    check_close(got, want, context, rtol=1e-5, atol=1e-6)
    added = got - base
    visible = visible_slots(real, lengths, n).expand(-1, hkv, -1)
    assert float(added[~visible].abs().max()) == 0.0, context  # nothing on holes, pads, slots past the count
    sums = added.sum(-1)
    check_close(sums[:2], torch.ones(2, hkv), context + " probabilities sum to 1", rtol=1e-4, atol=1e-5)
    assert float(sums[2].abs().max()) == 0.0, context


def test_attention_mass_takes_a_mask_per_kv_head():
    seed, g = fresh_generator()
    query, keys, lengths, real, lse = step_inputs(g, 2, 4, 2, 90, 64, torch.float16, per_head=True)
    want, got = torch.zeros(2, 4, 90), torch.zeros(2, 4, 90)
    attention_mass_reference(query, keys, lengths, real, lse, want, 0.125)
    attention_mass(query, keys, lengths, real, lse, got, 0.125, impl="triton")
    check_close(got, want, f"seed={seed} per-head real", rtol=1e-5, atol=1e-6)
    assert float(got[~visible_slots(real, lengths, 90)].abs().max()) == 0.0


def choice_inputs(g, b, h, n):
    """Totals from a few values (many exact ties), stamps a permutation per (row, head) (the
    slots' arrival order is not their index), a newest stamp and recent counts per row."""
    totals = torch.randint(0, 4, (b, h, n), generator=g).float() / 4
    stamp = torch.stack([torch.randperm(n, generator=g) for _ in range(b * h)]).view(b, h, n).to(torch.int32)
    real = torch.rand(b, n, generator=g) > 0.1
    lengths = torch.tensor([randint(g, n // 2, n + 1)], dtype=torch.int32)
    newest = torch.tensor([n - 1], dtype=torch.int32)
    recent = torch.randint(0, n // 2, (b,), generator=g)
    recent[-1] = n  # nothing is old enough: slot 0, as the reference
    return totals, stamp, real, lengths, newest, recent


@pytest.mark.parametrize("n,chunk", [(37, 1024), (1100, 1024), (1100, 2)])
def test_lowest_slot_matches_reference_exactly(n, chunk, monkeypatch):
    """One block (37), three blocks of 512 (1100); chunk 2: the merge loops over its partials."""
    monkeypatch.setattr(triton_mass, "MERGE_CHUNK", chunk)
    seed, g = fresh_generator()
    b, h = 3, 2
    totals, stamp, real, lengths, newest, recent = choice_inputs(g, b, h, n)
    want, got = torch.full((b, h), -1), torch.full((b, h), -1)
    lowest_slot_reference(totals, stamp, real, lengths, newest, recent, want)
    lowest_slot(totals, stamp, real, lengths, newest, recent, got, impl="triton")
    assert torch.equal(got, want), f"seed={seed} n={n}: {got.tolist()} != {want.tolist()}"
    assert torch.equal(want[-1], torch.zeros(h, dtype=torch.int64))
    # what the reference picks is what its definition says: the lowest total among the
    # eligible, the lowest stamp among those
    eligible = visible_slots(real, lengths, n) & (stamp <= (newest - recent)[:, None, None])
    for row in range(b - 1):
        for head in range(h):
            ok = eligible[row, head].nonzero().flatten()
            low = totals[row, head, ok].min()
            ties = ok[totals[row, head, ok] == low]
            assert int(want[row, head]) == int(ties[stamp[row, head, ties].argmin()]), f"seed={seed}"


@pytest.mark.parametrize("r,n", [(1, 200), (4, 200), (8, 200), (4, 1100)])
def test_fused_mass_and_choice_match_the_two_references(r, n):
    """n 1100: three chunks of the tensor-core kernel (512 slots each), merged."""
    seed, g = fresh_generator()
    b, hkv, d = 3, 2, 64
    query, keys, lengths, real, lse = step_inputs(g, b, hkv, r, n, d, torch.bfloat16)
    _, stamp, _, _, newest, recent = choice_inputs(g, b, hkv, n)
    totals = torch.randint(0, 3, (b, hkv, n), generator=g).float()
    want_t, got_t = totals.clone(), totals.clone()
    want_f, got_f = torch.full((b, hkv), -1), torch.full((b, hkv), -1)
    attention_mass_reference(query, keys, lengths, real, lse, want_t, d ** -0.5)
    lowest_slot_reference(want_t, stamp, real, lengths, newest, recent, want_f)
    attention_mass_and_lowest_slot(query, keys, lengths, real, lse, got_t, stamp, newest, recent, got_f, d ** -0.5,
                                   impl="triton")
    check_close(got_t, want_t, f"seed={seed} r={r} totals", rtol=1e-5, atol=1e-6)
    # the choice over the kernel's own totals is exact (the totals may differ in the last bit)
    from_got = torch.full((b, hkv), -1)
    lowest_slot_reference(got_t, stamp, real, lengths, newest, recent, from_got)
    assert torch.equal(got_f, from_got), f"seed={seed} r={r}: {got_f.tolist()} != {from_got.tolist()}"
    # the auto route on the CPU is the two references
    auto_t, auto_f = totals.clone(), torch.full((b, hkv), -1)
    attention_mass_and_lowest_slot(query, keys, lengths, real, lse, auto_t, stamp, newest, recent, auto_f, d ** -0.5)
    assert torch.equal(auto_t, want_t) and torch.equal(auto_f, want_f)
    # the first kernel (float32 dots, one block per program) agrees with the default one
    old_t, old_f = totals.clone(), torch.full((b, hkv), -1)
    triton_mass.mass_and_choice_triton(query, keys, lengths, real, lse, old_t, d ** -0.5,
                                       choice=(stamp, newest, recent, old_f), dot=False)
    check_close(old_t, got_t, f"seed={seed} r={r} first kernel", rtol=1e-5, atol=1e-6)


def test_bad_arguments_name_the_parameter():
    g = torch.Generator().manual_seed(0)
    query, keys, lengths, real, lse = step_inputs(g, 2, 2, 2, 20, 32, torch.float16)
    totals = torch.zeros(2, 2, 20)
    stamp, newest, recent, free = (torch.zeros(2, 2, 20, dtype=torch.int32), torch.tensor([19]),
                                   torch.tensor([3, 3]), torch.zeros(2, 2, dtype=torch.int64))
    cases = [
        ("query", lambda: attention_mass(query[:, :3], keys, lengths, real, lse, totals, 0.1)),
        ("lse", lambda: attention_mass(query, keys, lengths, real, lse[:, :, :, None], totals, 0.1)),
        ("totals", lambda: attention_mass(query, keys, lengths, real, lse, totals.double(), 0.1)),
        ("real", lambda: attention_mass(query, keys, lengths, real.int(), lse, totals, 0.1)),
        ("lengths", lambda: attention_mass(query, keys, lengths.long(), real, lse, totals, 0.1)),
        ("stamp", lambda: lowest_slot(totals, stamp.long(), real, lengths, newest, recent, free)),
        ("newest", lambda: lowest_slot(totals, stamp, real, lengths, newest.float(), recent, free)),
        ("recent", lambda: lowest_slot(totals, stamp, real, lengths, newest, recent[:1], free)),
        ("free", lambda: attention_mass_and_lowest_slot(query, keys, lengths, real, lse, totals, stamp, newest,
                                                        recent, free.int(), 0.1)),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=f"^{name} must"):
            call()


def test_custom_ops_trace_and_equal_the_wrappers():
    """The ops torch.compile emits (schema, fake implementation, declared mutations), and
    they compute what the eager wrappers do."""
    g = torch.Generator().manual_seed(3)
    query, keys, lengths, real, lse = step_inputs(g, 2, 2, 4, 30, 32, torch.float32)
    totals, stamp, _, _, newest, recent = choice_inputs(g, 2, 2, 30)
    free = torch.zeros(2, 2, dtype=torch.int64)
    torch.library.opcheck(attention_mass_op, (query, keys, lengths, real, lse, totals.clone(), 0.2))
    torch.library.opcheck(lowest_slot_op, (totals, stamp, real, lengths, newest, recent, free.clone()))
    from zipkv.kernels.attention_mass import attention_mass_from_scores_op

    scores = torch.randn(totals.shape[0], query.shape[1], totals.shape[2], generator=g)
    torch.library.opcheck(attention_mass_from_scores_op, (scores, lengths, real, lse, totals.clone(), stamp, newest,
                                                          recent, free.clone()))
    torch.library.opcheck(attention_mass_and_lowest_slot_op,
                          (query, keys, lengths, real, lse, totals.clone(), stamp, newest, recent, free.clone(), 0.2))
    want_t, want_f = totals.clone(), free.clone()
    attention_mass_and_lowest_slot(query, keys, lengths, real, lse, want_t, stamp, newest, recent, want_f, 0.2)
    got_t, got_f = totals.clone(), free.clone()
    attention_mass_and_lowest_slot_op(query, keys, lengths, real, lse, got_t, stamp, newest, recent, got_f, 0.2)
    assert torch.equal(got_t, want_t) and torch.equal(got_f, want_f)


def test_static_h2o_through_the_kernels_equals_the_eager_policy(monkeypatch):
    """The static h2o step with its bookkeeping in these kernels (interpreted: ~0.3 s a launch
    here, hence one layer and few steps; the decode attention's reference gives the lse and the
    scores) keeps what the eager policy keeps and decodes its tokens, a left-padded batch, GQA 4."""
    import zipkv
    from tiny_models import generate_new_tokens, padded_batch, tiny_model
    from zipkv.kernels import attention_mass as wrapper

    launches = []
    monkeypatch.setattr(wrapper, "use_triton", lambda device, impl: True)
    real_launch = triton_mass.scores_mass_and_choice_triton
    monkeypatch.setattr(triton_mass, "scores_mass_and_choice_triton",
                        lambda *a, **k: launches.append(1) or real_launch(*a, **k))
    kv_heads, new = 1, 8
    model = tiny_model("llama", num_key_value_heads=kv_heads, num_hidden_layers=1)
    ids, mask = padded_batch(length=40, pad=6)
    eager = zipkv.make_cache("h2o", model.config, ratio=0.5)
    expected = generate_new_tokens(model, eager, ids, mask, new)
    cache = zipkv.make_cache("h2o", model.config, ratio=0.5)
    tokens = zipkv.greedy_decode(model, cache, ids, mask, max_new_tokens=new, cuda_graph=False, eos_token_id=False)
    assert torch.equal(tokens, expected)
    assert len(launches) == new - 1  # every step after the prompt's token
    projection = torch.linspace(-1, 1, 16)
    for static_layer, eager_layer in zip(cache.layers, eager.layers):
        keys, _, ok = eager_layer.parts[0].padded()
        held = static_layer.held_slots()
        for b in range(2):
            for h in range(kv_heads):
                got = (static_layer.k_buf[b, h][held[b, h]].float() @ projection).sort().values
                want = (keys[b, h][ok[b, h]].float() @ projection).sort().values
                assert got.shape == want.shape and torch.allclose(got, want, atol=2e-3, rtol=0)


@pytest.mark.parametrize("decode_impl", ["reference", "triton"])
@pytest.mark.parametrize("r,n", [(1, 37), (4, 200), (8, 1100)])
def test_mass_from_the_attention_scores_equals_the_key_pass(r, n, decode_impl):
    """attention_mass_from_scores (the scores decode_attention wrote, its lse) = the fused key
    pass and choice, on the kernel (interpreted) and on the reference; n 1100: two chunks;
    the scores from the decode kernel (interpreted) or its reference."""
    from zipkv.kernels.attention_mass import attention_mass_from_scores, attention_mass_from_scores_reference
    from zipkv.kernels.decode_attention import decode_attention

    seed, g = fresh_generator()
    b, hkv, d = 3, 2, 64
    query, keys, lengths, real, lse = step_inputs(g, b, hkv, r, n, d, torch.float32)
    _, stamp, _, _, newest, recent = choice_inputs(g, b, hkv, n)
    scores = torch.full((b, hkv * r, n), float("nan"))  # slots past the count stay unread
    mask = visible_slots(real, lengths, n)[:, 0]
    _, lse2 = decode_attention(query, [], keys, keys, mask=mask, scale=d ** -0.5, lengths=lengths[1:].contiguous(),
                               return_lse=True, scores_out=scores, impl=decode_impl)
    assert torch.isnan(scores[..., int(lengths[-1]):]).all()
    finite = torch.isfinite(lse)
    check_close(lse2[finite], lse[finite], f"seed={seed} lse", rtol=1e-5, atol=1e-5)
    totals = torch.randint(0, 3, (b, hkv, n), generator=g).float()
    want_t, want_f = totals.clone(), torch.full((b, hkv), -1)
    attention_mass_and_lowest_slot(query, keys, lengths, real, lse, want_t, stamp, newest, recent, want_f, d ** -0.5)
    for name, run in (("reference", attention_mass_from_scores_reference),
                      ("kernel", lambda *a: attention_mass_from_scores(*a, impl="triton"))):
        got_t, got_f = totals.clone(), torch.full((b, hkv), -1)
        run(scores, lengths, real, lse, got_t, stamp, newest, recent, got_f)
        context = f"seed={seed} r={r} n={n} {name}"
        check_close(got_t, want_t, context, rtol=1e-5, atol=1e-6)
        from_got = torch.full((b, hkv), -1)
        lowest_slot_reference(got_t, stamp, real, lengths, newest, recent, from_got)
        assert torch.equal(got_f, from_got), context


def test_scores_out_names_what_is_wrong():
    from zipkv.kernels.decode_attention import decode_attention

    q, k = torch.zeros(1, 4, 1, 16), torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"scores_out must be float32 \[B, Hq, Nf\] = \(1, 4, 8\)"):
        decode_attention(q, [], k, k, scores_out=torch.zeros(1, 4, 7))
    with pytest.raises(ValueError, match="one query token"):
        decode_attention(torch.zeros(1, 4, 2, 16), [], k, k, scores_out=torch.zeros(1, 4, 8))
    from zipkv.kernels.attention_mass import attention_mass_from_scores

    with pytest.raises(ValueError, match="scores must be float32"):
        attention_mass_from_scores(torch.zeros(1, 4, 7), torch.tensor([8], dtype=torch.int32),
                                   torch.ones(1, 8, dtype=torch.bool), torch.zeros(1, 4, 1), torch.zeros(1, 2, 8),
                                   torch.zeros(1, 2, 8, dtype=torch.int32), torch.tensor([7], dtype=torch.int32),
                                   torch.tensor([2]), torch.zeros(1, 2, dtype=torch.int64))
