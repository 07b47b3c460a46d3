"""device_map placement (zipkv/parallel/placement.py): each cache layer holds its tensors on the
device its decoder layer executes on (an accelerate hook's execution_device, else the layer's
parameters, else a (mocked) hf_device_map), a real accelerate disk offload on the CPU, and the
static path's clear refusal of a model split over devices or offloaded. The real split (layer 0
'cpu' = offloaded to cuda:0, layer 1 on cuda:0, every registry method) is the gpu test at the end."""

from types import SimpleNamespace

import pytest
import torch

import zipkv
from tiny_models import generate_new_tokens, padded_batch, tiny_model
from zipkv.parallel import cache_layer_devices, check_one_device, check_placement, layer_device_map
from zipkv.parallel.placement import offloaded_layers

SPLIT = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": 1, "model.norm": 1,
         "model.rotary_emb": 1, "lm_head": 1}


def test_layer_devices_from_the_device_map_when_the_weights_are_on_meta():
    model = tiny_model("llama")
    assert layer_device_map(model) == [torch.device("cpu")] * 2  # no map, no hook: the parameters' device
    model.hf_device_map = SPLIT  # resident parameters say where the layer runs, not the map
    assert layer_device_map(model) == [torch.device("cpu")] * 2
    model.to("meta")  # no weights anywhere: the map is all there is
    assert layer_device_map(model) == [torch.device("cpu"), torch.device("cuda", 1)]
    model.hf_device_map = {"": 0}
    assert layer_device_map(model) == [torch.device("cuda", 0)] * 2
    model.hf_device_map = {"model": "cpu", "model.layers.1": "disk"}
    assert layer_device_map(model) == [torch.device("cpu"), torch.device("meta")]
    del model.hf_device_map
    with pytest.raises(ValueError, match=r"model\.layers\.0: no accelerate hook"):
        layer_device_map(model)


def test_layer_device_is_the_accelerate_hooks_execution_device():
    """device_map 'cpu' beside a GPU: accelerate offloads the layer (weights on meta) and its hook
    runs it on cuda:0, where its cache layer then allocates; a SequentialHook's parts are read,
    and a layer without its own hook takes its first hooked submodule's device."""
    model = tiny_model("llama")
    model.hf_device_map = {"model.layers.0": "cpu", "model.layers.1": 0}
    layers = model.model.layers
    layers[0]._hf_hook = SimpleNamespace(execution_device=0, offload=True)
    layers[1]._hf_hook = SimpleNamespace(hooks=(SimpleNamespace(execution_device=None), SimpleNamespace(
        hooks=(SimpleNamespace(execution_device="cuda:0"),))))
    assert layer_device_map(model) == [torch.device("cuda", 0)] * 2
    assert offloaded_layers(model) == [0]
    del layers[0]._hf_hook
    layers[0].self_attn.q_proj._hf_hook = SimpleNamespace(execution_device=torch.device("cuda", 1))
    assert layer_device_map(model)[0] == torch.device("cuda", 1)
    assert offloaded_layers(model) == []


def test_real_disk_offload_on_the_cpu_runs_and_caches_where_the_hooks_execute(tmp_path):
    """accelerate's dispatch_model with layer 0 on 'disk' (weights on meta, loaded by its hooks
    at each forward onto the CPU): the map says 'disk', the layer executes on the CPU, and its
    cache layer is there; the tokens equal the resident model's; the static path refuses it."""
    from accelerate import dispatch_model

    model = tiny_model("llama", seed=2)
    ids, mask = padded_batch(64, 5)
    cache = zipkv.make_cache("kivi", model.config)
    want = generate_new_tokens(model, cache, ids, mask, 3)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path))
    assert next(model.model.layers[0].parameters()).device.type == "meta"
    assert layer_device_map(model) == [torch.device("cpu")] * 2
    assert offloaded_layers(model) == [0]
    cache = zipkv.make_cache("kivi", model.config)
    assert torch.equal(generate_new_tokens(model, cache, ids, mask, 3), want)
    check_placement(cache, model)
    with pytest.raises(ValueError, match=r"offloads layers \[0\]"):
        check_one_device(model)


@pytest.mark.parametrize("method", ["full", "zipkv", "kivi", "snapkv", "zipvl", "minicache"])
def test_cache_layers_live_where_their_states_came_from(method):
    model = tiny_model("llama")
    cache = zipkv.make_cache(method, model.config, **({"budget": 40} if method == "snapkv" else {}))
    ids, mask = padded_batch(64, 5)
    generate_new_tokens(model, cache, ids, mask, 3)
    assert all(held == {torch.device("cpu")} for held in cache_layer_devices(cache))
    check_placement(cache, model)
    model.model.layers[1]._hf_hook = SimpleNamespace(execution_device=1)  # it runs on cuda:1: its cache is off it
    with pytest.raises(ValueError, match=r"layer 1: on \['cpu'\], its decoder layer on cuda:1"):
        check_placement(cache, model)


def test_static_path_refuses_a_split_model_naming_the_devices():
    model = tiny_model("llama", num_hidden_layers=4)
    assert check_one_device(model) == torch.device("cpu")
    for layer, gpu in zip(model.model.layers, (0, 0, 1, 1)):  # what accelerate's hooks say under a 2-GPU map
        layer._hf_hook = SimpleNamespace(execution_device=gpu, offload=False)
    with pytest.raises(ValueError, match=r"cuda:0 \(layers 0-1\), cuda:1 \(layers 2-3\)"):
        check_one_device(model)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["full", "zipkv", "kivi", "zipcache", "snapkv", "adakv", "cake", "zipvl"])
def test_split_cpu_gpu_model_decodes_as_one_device(method, tmp_path):
    """device_map puts layer 0 on 'cpu', layer 1 on cuda:0. Beside a GPU accelerate offloads a
    'cpu' layer (its weights on meta, hooks that copy them to cuda:0 and run it there, the H200 log:
    "Some parameters are on the meta device because they were offloaded to the cpu"), so both
    layers execute on cuda:0: every cache layer lives there, where its layer runs, and the tokens
    equal the one-device run."""
    from transformers import AutoModelForCausalLM

    tiny_model("llama", seed=2).save_pretrained(tmp_path)
    split = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": 0, "model.norm": 0,
             "model.rotary_emb": 0, "lm_head": 0}
    settings = {"budget": 40} if method in ("snapkv", "adakv", "cake") else {}
    ids, mask = padded_batch(64, 5)
    tokens = []
    for device_map in ({"": 0}, split):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, device_map=device_map, dtype=torch.float32).eval()
        cache = zipkv.make_cache(method, model.config, **settings)
        tokens.append(generate_new_tokens(model, cache, ids.cuda(), mask.cuda(), 6).cpu())
        check_placement(cache, model)
        assert layer_device_map(model) == [torch.device("cuda", 0)] * 2
        assert cache_layer_devices(cache) == [{torch.device("cuda", 0)}] * 2
    assert offloaded_layers(model) == [0]
    assert torch.equal(tokens[0], tokens[1])
