"""Inputs of the token-append tests (tests/test_token_append.py on the interpreter,
tests/test_gpu_token_append.py on CUDA): capacity buffers full of random bytes (so a write
outside the slot shows), states of every magnitude, and a bitwise comparison of the buffers."""

from __future__ import annotations

import torch

from zipkv.kernels.flash_decode import FlashSegment
from zipkv.kernels.token_append import token_append, token_append_reference
from zipkv.quant.token_head import FP8_MAX, int4_param_dtype


def random_bytes(shape, dtype, gen, device) -> torch.Tensor:
    """A tensor of `dtype` whose bytes are random, NaN/inf of 16/32-bit floats made 0 (Triton's
    interpreter copies a buffer through numpy, which may quiet a signalling NaN it never wrote)."""
    width = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (*shape, width), dtype=torch.uint8, generator=gen)
    t = raw.view(dtype).reshape(shape)
    if dtype in (torch.float16, torch.bfloat16, torch.float32):
        t = t.masked_fill(~torch.isfinite(t), 0)
    return t.to(device)


def random_buffers(form, b, h, n, d, dtype, gen, device="cpu") -> FlashSegment:
    """Capacity buffers of `form` for states of `dtype`, as TokenHeadBuffers holds them, full of
    random bytes (gen None: zeros, made on the device: the timing's 32K buffers)."""
    def make(shape, dt):
        return torch.zeros(shape, dtype=dt, device=device) if gen is None else random_bytes(shape, dt, gen, device)

    if form == "dense":
        return FlashSegment("dense", *(make((b, h, n, d), dtype) for _ in range(2)))
    if form == "fp8":
        codes = [make((b, h, n, d), torch.float8_e4m3fn) for _ in range(2)]
        return FlashSegment("fp8", *codes, *(make((b, h, n), torch.float32) for _ in range(2)))
    codes = [make((b, h, n, d // 2), torch.uint8) for _ in range(2)]
    return FlashSegment("int4", *codes, *(make((b, h, n), int4_param_dtype(dtype)) for _ in range(4)))


def clone_segment(seg: FlashSegment) -> FlashSegment:
    return FlashSegment(seg.form, *(None if t is None else t.clone()
                                    for t in (seg.k, seg.v, seg.k_scale, seg.v_scale, seg.k_zero, seg.v_zero)))


def random_states(b, h, d, dtype, gen, device="cpu", transposed=False) -> torch.Tensor:
    """[B, H, 1, D] finite states of `dtype`, each token-head with its own magnitude (2^-12 ..
    2^12) and offset (the int4 zero), one token-head all zeros and one constant (the scale
    floors). A token-head past a quarter of the dtype's largest value is halved until it is not
    (exact powers of two): at 2^12 x randn x (1 + offset) fp16 overflowed to inf (seed 2607220460,
    fp16 D 256 on the H200: both sides rightly flagged it, the test expected finite states), and
    a quarter leaves max - min and the rounding to the dtype finite. transposed: laid out
    [B, 1, H, D] in memory, as a model's projections are."""
    x = torch.randn(b, h, 1, d, generator=gen) * torch.exp2(torch.randint(-12, 13, (b, h, 1, 1), generator=gen).float())
    x = x + torch.randn(b, h, 1, 1, generator=gen) * x.abs().amax(dim=-1, keepdim=True)
    limit = torch.finfo(dtype).max / 4
    halvings = torch.log2(x.abs().amax(dim=-1, keepdim=True) / limit).ceil().clamp_min(0)
    x = x * torch.exp2(-halvings)
    x[0, 0] = 0.0
    if b * h > 1:
        x.view(b * h, 1, d)[-1] = torch.randn(()).item()
    if transposed:
        return x.transpose(1, 2).contiguous().to(dtype).transpose(1, 2).to(device)
    return x.to(dtype).to(device)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of t as integers (bit equality, NaN payloads and -0.0 included)."""
    return t.contiguous().view(torch.uint8).cpu()


def differences(got: FlashSegment, want: FlashSegment) -> dict[str, int]:
    """Per buffer, how many bytes differ (empty: bit-exact)."""
    out = {}
    for name in ("k", "v", "k_scale", "v_scale", "k_zero", "v_zero"):
        a, b = getattr(got, name), getattr(want, name)
        if a is not None:
            n = int((bits(a) != bits(b)).sum())
            if n:
                out[name] = n
    return out


def e4m3_values() -> torch.Tensor:
    """Every positive finite e4m3 value (subnormals included), as float32."""
    return torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


def fp8_tie_states(d: int = 128) -> torch.Tensor:
    """[1, H, 1, d] token-heads with amax 448 (scale 1 where division is IEEE) whose other
    elements sit at every midpoint between two e4m3 values, one float32 step either side of it
    and on the values themselves, both signs, 0 and -0.0: every rounding case of the cast."""
    v = e4m3_values()
    mids = torch.cat([torch.zeros(1), (v[:-1] + v[1:]) / 2, v[:1] / 2])
    up, down = torch.nextafter(mids, torch.tensor(1.0)), torch.nextafter(mids, torch.tensor(-1.0)).abs()
    near = torch.cat([mids, up, down, v, torch.tensor([-0.0])])
    values = torch.cat([near, -near])
    rows = (values.numel() + d - 2) // (d - 1)
    x = torch.zeros(rows * (d - 1))
    x[:values.numel()] = values
    return torch.cat([x.view(rows, d - 1), torch.full((rows, 1), FP8_MAX)], dim=1).view(1, rows, 1, d)


def int4_tie_states(d: int = 64) -> torch.Tensor:
    """[1, 1, 1, d]: a token-head spanning 0..15 (step 1, zero 0) with k + 1/2 elements: ties."""
    x = torch.cat([torch.tensor([0.0, 15.0]), torch.arange(0, 15) + 0.5, torch.arange(0, 16).float()])
    return torch.cat([x, torch.full((d - x.numel(),), 7.25)]).view(1, 1, 1, d)


def run_both(keys, values, seg, lengths, flag=False):
    """(reference, kernel) results: (segment, lengths, nonfinite) of each."""
    out = []
    for impl in ("reference", "triton"):
        s, n, f = clone_segment(seg), lengths.clone(), torch.tensor(flag, device=lengths.device)
        if impl == "reference":
            token_append_reference(keys, values, s, n, f)
        else:
            token_append(keys, values, s, n, f, impl="triton")
        out.append((s, n, f))
    return out


def check_same(want, got, context):
    assert differences(got[0], want[0]) == {}, f"{context}: bytes differ {differences(got[0], want[0])}"
    assert torch.equal(got[1], want[1]), f"{context}: lengths {got[1].tolist()} != {want[1].tolist()}"
    assert bool(got[2]) == bool(want[2]), f"{context}: nonfinite {bool(got[2])} != {bool(want[2])}"
