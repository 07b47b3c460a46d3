"""Launching an NVRTC-compiled kernel (torch.cuda._compile_kernel) with less host work.

torch's `_CudaKernel.__call__` converts each argument with isinstance / pinned-memory checks, a
`ctypes.byref` and a `ctypes.cast` into the argument array: 0.41 ms a call for the packed decode
kernel's 43 arguments on the H200's host (cProfile, experiments/NOTES.md, session 6), once per
layer per eager decode step. Here each argument becomes one ctypes value and the array takes
their addresses in one constructor; the conversion rules are torch's (a tensor: its device
pointer; an int: a C int; a float: a C double), and cuLaunchKernel gets the same call.
"""

from __future__ import annotations

import ctypes

import torch


def pack_arguments(args) -> tuple[list, ctypes.Array]:
    """(the ctypes values, kept alive by the caller until the launch; the void* array of their
    addresses that cuLaunchKernel reads)."""
    values = []
    for i, arg in enumerate(args):
        if isinstance(arg, torch.Tensor):
            values.append(ctypes.c_void_p(arg.data_ptr()))
        elif isinstance(arg, int):  # bool included, as torch's launcher takes it
            values.append(ctypes.c_int(arg))
        elif isinstance(arg, float):
            values.append(ctypes.c_double(arg))
        else:
            raise TypeError(f"kernel argument {i}: a tensor, an int or a float (got {type(arg).__name__})")
    return values, (ctypes.c_void_p * len(values))(*map(ctypes.addressof, values))


def launch(kernel, grid: tuple, block: tuple, args, shared_mem: int = 0) -> None:
    """kernel(grid=grid, block=block, args=args) of torch's compiled kernel, on the current stream."""
    for i, arg in enumerate(args):
        if isinstance(arg, torch.Tensor) and not arg.is_cuda:
            raise ValueError(f"kernel argument {i} is on {arg.device}: every tensor argument must be on the GPU")
    values, array = pack_arguments(args)
    lib = torch.cuda._utils._get_gpu_runtime_library()
    stream = torch.cuda.current_stream()
    torch.cuda._utils._check_cuda(lib.cuLaunchKernel(kernel.func, *grid, *block, shared_mem, stream._as_parameter_,
                                                     array, None))
    del values  # alive through the call above: cuLaunchKernel copies the arguments it reads
