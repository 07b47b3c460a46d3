"""Flash-decoding over a per token-head cache (Triton interpreter) vs its PyTorch reference,
the reference vs SDPA over each row's valid tokens, and the per token-head quantizers' bounds."""

import math

import pytest
import torch

from zipkv.kernels._runtime import enable_interpreter, interpreter_enabled, triton_installed

if not triton_installed() or (torch.cuda.is_available() and not interpreter_enabled()):
    # a compiled GPU session owns the process (tests/test_gpu_flash_decode.py covers the kernel there)
    pytestmark = pytest.mark.skip(reason="Triton interpreter test: needs triton, and TRITON_INTERPRET=1 on CUDA")
else:
    enable_interpreter()

from zipkv.kernels.flash_decode import FlashSegment, flash_decode, flash_decode_reference  # noqa: E402
from zipkv.quant.token_head import FP8_MAX, dequantize_token_head, quantize_token_head  # noqa: E402


def segment(form, k, v) -> FlashSegment:
    if form == "dense":
        return FlashSegment("dense", k, v)
    kc, vc = quantize_token_head(k, form), quantize_token_head(v, form)
    return FlashSegment(form, kc.codes, vc.codes, kc.scale, vc.scale, kc.zero, vc.zero)


def random_case(form, b, hkv, r, n, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * r, 1, d, generator=g).to(dtype)
    # a few outlier channels, as real keys have
    k = (torch.randn(b, hkv, n, d, generator=g) * (1 + 4 * (torch.arange(d) % 17 == 0))).to(dtype)
    v = torch.randn(b, hkv, n, d, generator=g).to(dtype)
    return q, segment(form, k, v)


TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


# GQA 1 / 4 / 8 at d 64 in every form; d 128 per form; the three query dtypes
CASES = [(form, r, 64, torch.float32) for form in ("dense", "fp8", "int4") for r in (1, 4, 8)]
CASES += [("dense", 4, 128, torch.bfloat16), ("fp8", 4, 128, torch.float16), ("int4", 2, 128, torch.bfloat16)]


@pytest.mark.parametrize("form,r,d,dtype", CASES)
def test_kernel_matches_reference_on_ragged_rows(form, r, d, dtype):
    b, hkv, n = 4, 2, 70
    q, seg = random_case(form, b, hkv, r, n, d, dtype, seed=r * 1000 + d)
    # a full row, an empty one, one ending inside a block, one ending on a split boundary
    lengths = torch.tensor([70, 0, 23, 32], dtype=torch.int32)
    out = flash_decode(q, seg, lengths, impl="triton", block_n=16, num_splits=3)  # splits of 32 tokens
    ref = flash_decode_reference(q, seg, lengths)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # a row of length 0 attends nothing
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= TOLERANCE[dtype], f"{form} r={r} d={d} {dtype}: max |kernel - reference| = {err:.3g}"


def test_kernel_default_plan_and_scale():
    q, seg = random_case("fp8", 2, 1, 4, 100, 32, torch.float32, seed=5)
    lengths = torch.tensor([100, 57], dtype=torch.int32)
    out = flash_decode(q, seg, lengths, scale=0.3, impl="triton")
    assert (out - flash_decode_reference(q, seg, lengths, scale=0.3)).abs().max() <= 2e-5


def test_reference_equals_sdpa_over_each_rows_valid_tokens():
    """The reference itself, independently: row b attends its first lengths[b] tokens only."""
    q, seg = random_case("dense", 3, 2, 4, 40, 32, torch.float32, seed=9)
    lengths = torch.tensor([40, 1, 17], dtype=torch.int32)
    out = flash_decode_reference(q, seg, lengths)
    for b, n in enumerate(lengths.tolist()):
        want = torch.nn.functional.scaled_dot_product_attention(
            q[b:b + 1], seg.k[b:b + 1, :, :n], seg.v[b:b + 1, :, :n], enable_gqa=True)
        assert torch.allclose(out[b:b + 1], want, atol=1e-6), b
    # tokens past a row's length do not count, whatever they hold
    seg.k[2, :, 17:] = 1e4
    assert torch.equal(flash_decode_reference(q, seg, lengths), out)


def test_fp8_round_trip_within_e4m3_rounding():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 50, 64, generator=g) * torch.logspace(-3, 3, 50)[None, None, :, None]
    codes = quantize_token_head(x, "fp8")
    assert codes.codes.dtype == torch.float8_e4m3fn and codes.scale.dtype == torch.float32 and codes.zero is None
    back = dequantize_token_head(codes, "fp8")
    amax = x.abs().amax(-1, keepdim=True)
    assert torch.allclose(codes.scale, amax[..., 0] / FP8_MAX)
    # 3 mantissa bits: half an ulp is 2^-4 of the value; e4m3's subnormal step is 2^-9 of the scale
    bound = x.abs() * 2 ** -4 + codes.scale[..., None] * 2 ** -9
    assert ((back - x).abs() <= bound * 1.0001).all()
    assert torch.equal(dequantize_token_head(quantize_token_head(torch.zeros(1, 1, 2, 32), "fp8"), "fp8"),
                       torch.zeros(1, 1, 2, 32))  # an all-zero token, no NaN


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_round_trip_within_half_a_step(dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 3, 40, 64, generator=g) * 3 + 1).to(dtype)
    codes = quantize_token_head(x, "int4")
    assert codes.codes.shape == (2, 3, 40, 32) and codes.codes.dtype == torch.uint8
    assert codes.scale.shape == codes.zero.shape == (2, 3, 40)
    back = dequantize_token_head(codes, "int4")
    step = codes.scale.float()[..., None]
    span = x.float().amax(-1, keepdim=True) - x.float().amin(-1, keepdim=True)
    # half a step, plus the clipping the 16-bit step's rounding can cause at the top code
    bound = step / 2 + span * torch.finfo(codes.scale.dtype).eps
    assert ((back - x.float()).abs() <= bound).all()
    constant = torch.full((1, 1, 3, 32), 2.5)
    assert torch.equal(dequantize_token_head(quantize_token_head(constant, "int4"), "int4"), constant)


def test_bad_inputs_name_the_parameter():
    q, seg = random_case("int4", 2, 1, 2, 20, 32, torch.float32, seed=0)
    with pytest.raises(ValueError, match="lengths"):
        flash_decode(q, seg, torch.tensor([3, 4]))  # int64
    with pytest.raises(ValueError, match="form"):
        flash_decode(q, FlashSegment("int8", seg.k, seg.v), torch.tensor([3, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="k_zero"):
        flash_decode(q, FlashSegment("int4", seg.k, seg.v, seg.k_scale, seg.v_scale), torch.tensor([3, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="form"):
        quantize_token_head(q, "nf4")
    with pytest.raises(ValueError, match="query"):
        flash_decode(q.expand(2, 2, 3, 32), seg, torch.tensor([3, 4], dtype=torch.int32))
    assert math.isclose(FP8_MAX, 448.0)
