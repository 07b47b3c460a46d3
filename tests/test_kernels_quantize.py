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
@pytest.mark.parametrize("bits", [2, 4])
def test_keys_in_chunks_bit_exact(dtype, bits):
    """One group per head with the min / max from torch and the codes in chunks of tokens (a
    batch-1 prompt's path on the GPU): the same bytes as the reference."""
    from zipkv.kernels._triton_quantize import quantize_keys

    g = torch.Generator().manual_seed(20 + bits)
    x = (torch.randn(1, 2, 77, 64, generator=g) * 3 - 1).to(dtype)
    x[0, 1, :, 9] = -0.5  # a constant channel
    for chunk in (32, 40, 77, 100):
        _equal(quantize_keys(x, bits, 77, x.dtype, chunk=chunk), quantize_keys_channelwise(x, bits, None))
    with pytest.raises(ValueError, match="one key group per head"):
        quantize_keys(x, bits, 32, x.dtype, chunk=32)


def test_key_chunks_only_for_one_group_and_few_programs():
    from zipkv.kernels.quantize_pack import _key_chunk

    # the interpreter counts 4 SMs: 8 programs wanted
    assert _key_chunk(torch.empty(1, 2, 4096, 64), None) == 1024  # 2 heads -> 4 chunks each
    assert _key_chunk(torch.empty(1, 2, 200, 64), None) is None  # one chunk of >= 256 tokens
    assert _key_chunk(torch.empty(4, 2, 4096, 64), None) is None  # 8 programs already
    assert _key_chunk(torch.empty(1, 2, 4096, 64), 1024) is None  # several groups


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
