"""What a CUDA graph cannot hold, seen on the CPU: a TorchDispatchMode that records the ops a
capture would refuse or silently freeze, so a CPU test can check a static step or a device
flush before the GPU run does.

Refused during a capture: a host read of a device value (`.item()`, `float(t)`, `bool(t)`: a
stream sync) and ops whose output size depends on device data (nonzero, masked_select,
unique, repeat_interleave by a tensor of repeats without output_size: a sync); a tensor made
from host data (`torch.tensor([...])`: a copy from pageable memory once it goes to the device).
Frozen: a random draw from a generator (e.g. a sign vector made lazily on first use).

On the CPU every tensor is a host tensor, so "device value" means derived from the device
state: the tensors `track()` is given (a layer's buffers, a step's inputs) and every output of
an op that reads one. Host-side bookkeeping (a count from a tensor made on the host) is not
flagged; a Python scalar made a 0-dim tensor (`t[...] = 0`) is a scalar the kernel takes by
value, not flagged either.
"""

from __future__ import annotations

import os
import traceback
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# op overload packets that read device data on the host (a stream sync)
SYNCING = {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal", "aten.nonzero",
           "aten.masked_select", "aten.unique_consecutive", "aten._unique2", "aten.unique_dim",
           "aten.bincount", "aten.histc"}
HOST_DATA = {"aten.lift_fresh", "aten.lift_fresh_copy"}


def caller() -> str:
    """file:line of the innermost zipkv frame calling the op (where to look)."""
    frames = [f for f in traceback.extract_stack() if f"{os.sep}zipkv{os.sep}" in f.filename]
    return f"{os.path.relpath(frames[-1].filename)}:{frames[-1].lineno}" if frames else "?"


class UncapturableOps(TorchDispatchMode):
    """Records (op at zipkv file:line, why) for every op a CUDA-graph capture would refuse or
    freeze. `track(tensors)` marks device state; without any, every tensor counts as device."""

    def __init__(self, every_tensor_is_device: bool = True):
        super().__init__()
        self.found: list[tuple[str, str]] = []
        self.every_tensor_is_device = every_tensor_is_device
        self.device: dict[int, weakref.ref] = {}  # id -> weak reference (a tensor's == is elementwise)

    def track(self, tensors) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.device[id(t)] = weakref.ref(t)

    def is_device(self, t: torch.Tensor) -> bool:
        ref = self.device.get(id(t))
        return ref is not None and ref() is t

    def _reads_device(self, tensors) -> bool:
        return bool(tensors) and (self.every_tensor_is_device or any(self.is_device(t) for t in tensors))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        out = func(*args, **kwargs)
        why = None
        if name in SYNCING and self._reads_device(inputs):
            why = "reads a device value on the host (a sync)"
        elif name == "aten.repeat_interleave" and func._overloadname != "self_int" \
                and kwargs.get("output_size") is None and self._reads_device(inputs):
            why = "repeat_interleave by a tensor of repeats without output_size (a sync)"
        elif name in HOST_DATA and out.dim() > 0:
            why = "a tensor from host data (torch.tensor of a list: a host-to-device copy)"
        elif any(isinstance(a, torch.Generator) for a in tree_leaves((args, kwargs))):
            why = "a random draw from a generator (frozen into the graph)"
        if why is not None:
            self.found.append((f"{func} at {caller()}", why))
        if any(self.is_device(t) for t in inputs):
            self.track(t for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def record_layer_calls(layers, names=("update", "attend", "flush_on_device")):
    """Wrap `names` of each layer instance so their calls run under one UncapturableOps, with
    the layer's held tensors and the call's tensor arguments as the device state (what a static
    decode step and a device flush of these layers put in a graph); returns the mode."""
    mode = UncapturableOps(every_tensor_is_device=False)

    def wrapped(layer, method, method_name):
        def call(*args, **kwargs):
            mode.track(layer.held_tensors())
            mode.track(tree_leaves((args, kwargs)))
            before = len(mode.found)
            with mode:
                out = method(*args, **kwargs)
            mode.found[before:] = [(f"layer {layer.layer_idx} {method_name}: {op}", why)
                                   for op, why in mode.found[before:]]
            return out
        return call

    for layer in layers:
        for name in names:
            if hasattr(layer, name):
                setattr(layer, name, wrapped(layer, getattr(layer, name), name))
    return mode
