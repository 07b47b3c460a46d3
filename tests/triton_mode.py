"""Which Triton a test process runs: its CPU interpreter, or compiled kernels on a GPU.

One process can hold only one of the two: `TRITON_INTERPRET` is read when triton and each
`@triton.jit` function are imported, and `enable_interpreter()` re-imports them in
interpreter mode. On a CUDA machine run without TRITON_INTERPRET=1 the process belongs to the
compiled kernels (the `gpu` tests: tests/test_gpu_*.py); an interpreter test module that
switched it there (as they all did at import, during collection) turned every compiled launch
after it into an interpreted one and, by setting TRITON_INTERPRET=1 before conftest's marker
check, skipped every `gpu` test of `pytest -m gpu tests`. So the interpreter tests pin
themselves to the interpreter: they run where it can be had (a CPU machine, or
TRITON_INTERPRET=1 asked for), and skip, saying why, in a compiled GPU session.
"""

from __future__ import annotations

import pytest
import torch

from zipkv.kernels._runtime import enable_interpreter, interpreter_enabled, triton_installed

COMPILED_SESSION_REASON = ("Triton interpreter test: this process runs compiled Triton on CUDA (the gpu tests, "
                           "tests/test_gpu_*.py, cover these kernels compiled); run it with TRITON_INTERPRET=1")


def compiled_gpu_session() -> bool:
    """CUDA is here and TRITON_INTERPRET=1 was not asked for: compiled kernels own the process."""
    return torch.cuda.is_available() and not interpreter_enabled()


def switch_to_interpreter() -> str | None:
    """Switches the process to Triton's interpreter where that is safe and returns None;
    else returns why not (a skip reason)."""
    if not triton_installed():
        return "triton not installed"
    if compiled_gpu_session():
        return COMPILED_SESSION_REASON
    enable_interpreter()
    return None


def interpreter_module_mark():
    """The `pytestmark` of an interpreter test module, called at its import: the interpreter,
    or a skip naming why not."""
    reason = switch_to_interpreter()
    return pytest.mark.skip(reason=reason) if reason else []


def use_interpreter_or_skip() -> None:
    """The same inside one test (a module whose other tests need no Triton)."""
    reason = switch_to_interpreter()
    if reason:
        pytest.skip(reason)
