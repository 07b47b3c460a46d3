"""Pipeline placement (`device_map=...`, accelerate): which device each decoder layer runs on,
whether each cache layer holds its tensors there, and why the static / CUDA-graph path takes
one device only.

zipkv's cache layers allocate lazily, on their first update, on the device of the states they
receive (and every later tensor follows the held ones), so a cache built from the config needs
no device: under a device map each layer's cache lives with its layer and its decode kernel runs
there. A layer's device is where it executes: a layer that device_map puts on 'cpu' (or
'disk') beside a GPU is offloaded by accelerate (weights on meta, copied in by hooks that run it
on the main GPU), so its cache lives on that GPU. `check_placement` verifies that after a forward; `check_one_device` is the static path's
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


def accelerate_hooks(module) -> list:
    """The accelerate hooks on `module` (`_hf_hook`, a SequentialHook's parts unfolded), in order."""
    pending, hooks = [getattr(module, "_hf_hook", None)], []
    while pending:
        hook = pending.pop(0)
        if hook is not None:
            hooks.append(hook)
            pending.extend(getattr(hook, "hooks", ()))
    return hooks


def hook_execution_device(module) -> torch.device | None:
    """Where accelerate runs `module`: the `execution_device` of its own hook, else of the first
    hooked submodule's (`cpu_offload` hooks only the modules holding weights); None: no hook."""
    for part in module.modules():
        for hook in accelerate_hooks(part):
            if getattr(hook, "execution_device", None) is not None:
                return as_device(hook.execution_device)
    return None


def decoder_layer_names(model) -> list[str]:
    """The module names of the decoder layers ('...layers.<i>'), in index order."""
    names = {}
    for name, _ in model.named_modules():
        match = _LAYER_NAME.search(name)
        if match and "." not in name[match.end():]:
            names.setdefault(int(match.group(1)), name)
    if not names:
        raise ValueError("the model has no decoder layers named '...layers.<i>'")
    return [names[index] for index in range(len(names))]


def layer_device_map(model) -> list[torch.device]:
    """The device every decoder layer of `model` executes on, in order (where its cache layer
    allocates, since the states it receives are computed there): the accelerate hook's
    `execution_device` when the layer has one (a layer that device_map puts on 'cpu' or 'disk'
    beside a GPU is offloaded: weights on meta, run on the main GPU), else the device of its
    parameters, else (no parameters, or all on meta) its `hf_device_map` entry (the longest
    one naming the layer or a module above it)."""
    device_map = getattr(model, "hf_device_map", None) or {}
    devices = []
    for name in decoder_layer_names(model):
        module = model.get_submodule(name)
        device = hook_execution_device(module)
        if device is None:
            device = next((p.device for p in module.parameters() if p.device.type != "meta"), None)
        if device is None:
            owners = [key for key in device_map if key == "" or name == key or name.startswith(key + ".")]
            if not owners:
                raise ValueError(f"{name}: no accelerate hook, no parameters off the meta device and no "
                                 "hf_device_map entry: where it runs is unknown")
            device = as_device(device_map[max(owners, key=len)])
        devices.append(device)
    return devices


def offloaded_layers(model) -> list[int]:
    """Decoder layers whose weights accelerate loads onto the execution device at every forward
    (a hook with offload=True, or parameters on meta)."""
    layers = [model.get_submodule(name) for name in decoder_layer_names(model)]
    return [index for index, layer in enumerate(layers)
            if any(getattr(hook, "offload", False) for part in layer.modules() for hook in accelerate_hooks(part))
            or any(p.device.type == "meta" for p in layer.parameters())]


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
    offloaded = offloaded_layers(model)
    if offloaded:
        raise ValueError("static (CUDA-graph) decoding needs every weight resident; device_map offloads layers "
                         f"{offloaded} ('cpu' / 'disk' beside a GPU: accelerate copies their weights in at every "
                         "forward, which a captured graph cannot replay). Decode it eagerly, or load it on one device")
    if len(set(devices)) > 1:
        raise ValueError("static (CUDA-graph) decoding captures one device; this model's layers are split over "
                         f"{describe_devices(devices)} (device_map). Decode it eagerly (model.generate with the "
                         "zipkv cache), or load it on one device")
    return devices[0]
