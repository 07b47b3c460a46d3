"""Shared pieces of the compiled-kernel tests (tests/test_gpu_*.py): fresh random inputs whose
seed every failure prints, and comparisons that say what was compared.

The lead runs these on a lent GPU and sends nothing back but the pytest output, so a failure
message carries the seed, the shapes and the measured error: enough to reproduce it on the
CPU reference side (`torch.Generator().manual_seed(seed)` rebuilds the inputs)."""

from __future__ import annotations

import os

import torch

# relative (Frobenius) error bounds of a 16-bit kernel output against a float32 reference:
# the interpreter tests' bounds (tests/test_kernels_decode.py); bf16 keeps 8 mantissa bits
REL_TOL = {torch.float16: 3e-3, torch.bfloat16: 1e-2}


def fresh_generator() -> tuple[int, torch.Generator]:
    """(seed, CPU generator seeded with it): new inputs on every run, reproducible from the seed."""
    seed = int.from_bytes(os.urandom(4), "little")
    return seed, torch.Generator().manual_seed(seed)


def randint(gen: torch.Generator, lo: int, hi: int) -> int:
    """One integer in [lo, hi) from gen (ragged lengths, paddings)."""
    return int(torch.randint(lo, hi, (1,), generator=gen))


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().float().cpu(), ref.detach().float().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_rel(out: torch.Tensor, ref: torch.Tensor, tol: float, context: str) -> float:
    """Asserts shape, finiteness and relative error; the message names the case."""
    assert tuple(out.shape) == tuple(ref.shape), f"{context}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    bad = (~torch.isfinite(out.detach().float().cpu())).sum().item()
    assert bad == 0, f"{context}: {bad} non-finite outputs of {out.numel()}"
    err = rel_error(out, ref)
    assert err < tol, f"{context}: relative error {err:.3e} >= {tol:.1e} (max abs {max_abs(out, ref):.3e})"
    return err


def max_abs(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.detach().float().cpu() - ref.detach().float().cpu()).abs().max().item() if out.numel() else 0.0


def check_close(out: torch.Tensor, ref: torch.Tensor, context: str, rtol: float, atol: float) -> None:
    """torch.testing.assert_close with the case named in the message."""
    try:
        torch.testing.assert_close(out.detach().cpu(), ref.detach().cpu(), rtol=rtol, atol=atol)
    except AssertionError as caught:
        raise AssertionError(f"{context}: {caught}") from None
