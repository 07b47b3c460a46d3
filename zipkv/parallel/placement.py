"""Pipeline placement (`device_map=...`, accelerate): which device each decoder layer runs on,
whether each cache layer holds its tensors there, and why the static / CUDA-graph path takes
one device only.

zipkv's cache layers allocate lazily, on their first update, on the device of the states they
receive (and every later tensor follows the held ones), so a cache built from the config needs
no device: under a device map each layer's cache lives with its layer and its decode kernel runs
there. `check_placement` verifies that after a forward; `check_one_device` is the static path's
refusal: `StaticDecoder` captures one CUDA graph on one device's stream with one set of input
buffers, so a cache spread over several devices is refused with the devices named (segmenting
the graph per device is not implemented).
"""

from __future__ import annotations

import re

import torch

from ..cache.stats import held_tensors_of

_LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)$")


def as_device(value) -> torch.device:
    """accelerate's device-map values (an int GPU index, 'cpu', 'cuda:1', 'meta', 'disk') as a torch.device;
    'disk' offload is reported as 'meta' (the weights are not on any compute device)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return torch.device("cuda", value)
    if value == "disk":
        return torch.device("meta")
    return torch.device(value)


def layer_device_map(model) -> list[torch.device]:
    """The device of every decoder layer of `model` in order: from its `hf_device_map` (the
    longest entry naming the layer or a module above it), else the device of its parameters."""
    names = {}
    for name, _ in model.named_modules():
        match = _LAYER_NAME.search(name)
        if match and "." not in name[match.end():]:
            names.setdefault(int(match.group(1)), name)
    if not names:
        raise ValueError("the model has no decoder layers named '...layers.<i>'")
    device_map = getattr(model, "hf_device_map", None) or {}
    devices = []
    for index in range(len(names)):
        name = names[index]
        owners = [key for key in device_map if key == "" or name == key or name.startswith(key + ".")]
        if owners:
            devices.append(as_device(device_map[max(owners, key=len)]))
        else:
            module = model.get_submodule(name)
            devices.append(next(module.parameters()).device)
    return devices


def cache_layer_devices(cache) -> list[set]:
    """The set of devices each cache layer's held tensors are on (empty: holds nothing yet)."""
    return [{t.device for t in held_tensors_of(layer) if t is not None} for layer in cache.layers]


def check_placement(cache, model) -> None:
    """ValueError naming every cache layer that holds tensors off its decoder layer's device."""
    expected = layer_device_map(model)
    if len(expected) != len(cache.layers):
        raise ValueError(f"the cache has {len(cache.layers)} layers, the model {len(expected)}")
    wrong = [f"layer {i}: on {sorted(map(str, held))}, its decoder layer on {device}"
             for i, (held, device) in enumerate(zip(cache_layer_devices(cache), expected))
             if held and held != {device}]
    if wrong:
        raise ValueError("cache layers off their decoder layer's device: " + "; ".join(wrong))


def describe_devices(devices: list[torch.device]) -> str:
    """'cuda:0 (layers 0-15), cuda:1 (layers 16-31)'."""
    runs, start = [], 0
    for i in range(1, len(devices) + 1):
        if i == len(devices) or devices[i] != devices[start]:
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            runs.append(f"{devices[start]} (layers {span})")
            start = i
    return ", ".join(runs)


def check_one_device(model) -> torch.device:
    """The one device of a model the static / CUDA-graph path can decode, or a ValueError
    naming the devices its layers are split over."""
    devices = layer_device_map(model)
    if len(set(devices)) > 1:
        raise ValueError("static (CUDA-graph) decoding captures one device; this model's layers are split over "
                         f"{describe_devices(devices)} (device_map). Decode it eagerly (model.generate with the "
                         "zipkv cache), or load it on one device")
    return devices[0]
