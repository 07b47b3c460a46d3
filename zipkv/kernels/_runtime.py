"""When the Triton paths run, and how tests switch Triton to its CPU interpreter.

Triton is imported lazily (only when a kernel is about to launch): `TRITON_INTERPRET=1` is
read when `triton` and every `@triton.jit` function are first imported, so importing it
eagerly from `zipkv` would freeze the mode before a test could choose the interpreter.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

IMPLS = ("auto", "triton", "reference")


# Looked up once, without importing triton (see above): a constant that torch.compile can trace
# through, where dynamo refuses to trace importlib's find_spec (a compiled step asked it per call)
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    return TRITON_INSTALLED


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} (got {impl!r})")
    return impl


def use_triton(device: torch.device, impl: str) -> bool:
    """`auto`: Triton on CUDA when it is installed, else the PyTorch path (CPU fallback).
    `triton`: always (on CPU this needs TRITON_INTERPRET=1, which the tests set)."""
    check_impl(impl)
    if impl == "reference":
        return False
    if impl == "triton":
        if not triton_installed():
            raise ValueError("impl='triton' needs the optional dependency triton (pip install zipkv[kernels])")
        if device.type != "cuda" and not interpreter_enabled():
            raise ValueError("impl='triton' on a CPU tensor needs TRITON_INTERPRET=1 (Triton's interpreter)")
        return True
    return device.type == "cuda" and triton_installed()


def enable_interpreter() -> None:
    """Switch this process to Triton's CPU interpreter (tests only).

    Sets TRITON_INTERPRET=1 and, if triton was already imported in compiled mode, drops it
    and zipkv's kernel modules from sys.modules so the next import re-decorates them.
    """
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" in sys.modules and _interpreting(sys.modules["triton"]):
        return
    for name in list(sys.modules):
        # The compiled extension (triton._C) must stay: loading it twice aborts the process.
        if name.startswith("triton._C"):
            continue
        if name == "triton" or name.startswith("triton.") or name.startswith("zipkv.kernels._triton"):
            del sys.modules[name]


def _interpreting(triton_module) -> bool:
    """Whether triton's own @jit library functions were decorated in interpreter mode."""
    try:
        from triton.runtime.interpreter import InterpretedFunction

        return isinstance(triton_module.language.standard.sum, InterpretedFunction)
    except (AttributeError, ImportError):
        return False


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few programs are enough, and faster to run
