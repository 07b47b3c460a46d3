"""Fused quantize+pack kernel (Triton interpreter) vs zipkv.quant.schemes: bit-exact."""

import pytest
import torch

from triton_mode import interpreter_module_mark

pytestmark = interpreter_module_mark()  # Triton's interpreter; skipped in a compiled GPU session

from zipkv.kernels.quantize_pack import quantize_pack_keys, quantize_pack_values  # noqa: E402
from zipkv.quant.schemes import quantize_keys_channelwise, quantize_values_tokenwise  # noqa: E402


def _equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(x, y), (x.float() - y.float()).abs().max()
        else:
            assert x == y


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_keys_bit_exact(dtype, bits):
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(2, 3, 70, 64, generator=g) * 3 + 1).to(dtype)
    x[0, 0, :, 5] = 0.25  # a constant channel: the step guard
    for group in (None, 32):
        _equal(quantize_pack_keys(x, bits, group, impl="triton"), quantize_keys_channelwise(x, bits, group))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_values_bit_exact(dtype, bits):
    g = torch.Generator().manual_seed(10 + bits)
    x = (torch.randn(2, 2, 45, 64, generator=g) * 2).to(dtype)
    x[1, 1, 3] = -1.5  # a constant token
    for group, cs in ((None, True), (None, False), (16, False)):
        _equal(quantize_pack_values(x, bits, group, cs, impl="triton"), quantize_values_tokenwise(x, bits, group, cs))


def test_validation():
    x = torch.randn(1, 1, 8, 32)
    with pytest.raises(ValueError, match="bits"):
        quantize_pack_keys(x, 3, None)
    with pytest.raises(ValueError, match="value_group_size"):
        quantize_pack_values(x, 4, 5, False)
    with pytest.raises(ValueError, match="NaN"):
        quantize_pack_keys(torch.full((1, 1, 2, 32), float("nan")), 4, None, impl="triton")
