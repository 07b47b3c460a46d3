"""zipkv/kernels/cuda_launch.py: the argument array cuLaunchKernel reads holds, for fresh random
arguments, what torch's own launcher would put there (a tensor's data pointer, a C int, a C
double), in order; wrong arguments raise naming their position. The launch itself runs in the
GPU tests of the packed decode kernel (tests/test_kernels_mma.py)."""

import ctypes
import random

import pytest
import torch

from zipkv.kernels.cuda_launch import launch, pack_arguments


def test_packed_arguments_hold_what_torch_would_pass():
    rng = random.Random()
    seed = rng.randrange(2**31)
    rng.seed(seed)
    args = []
    for _ in range(rng.randrange(1, 50)):
        kind = rng.choice(("tensor", "int", "float", "bool"))
        if kind == "tensor":
            args.append(torch.empty(rng.randrange(1, 64)))
        elif kind == "int":
            args.append(rng.randrange(-2**31, 2**31))
        elif kind == "float":
            args.append(rng.uniform(-1e6, 1e6))
        else:
            args.append(rng.random() < 0.5)
    values, array = pack_arguments(args)
    assert len(array) == len(args)
    for i, arg in enumerate(args):
        if isinstance(arg, torch.Tensor):
            got = ctypes.c_void_p.from_address(array[i]).value
            assert got == arg.data_ptr(), (seed, i)
        elif isinstance(arg, float):
            assert ctypes.c_double.from_address(array[i]).value == arg, (seed, i)
        else:
            assert ctypes.c_int.from_address(array[i]).value == int(arg), (seed, i)


def test_bad_arguments_are_refused_by_position():
    with pytest.raises(TypeError, match="argument 1: a tensor, an int or a float"):
        pack_arguments([3, "x"])
    with pytest.raises(ValueError, match="argument 0 is on cpu"):
        launch(None, (1, 1, 1), (32, 1, 1), [torch.zeros(2)])
