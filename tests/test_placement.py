"""device_map placement (zipkv/parallel/placement.py): each cache layer holds its tensors on its
decoder layer's device, the layer devices read from a (mocked) hf_device_map, and the static
path's clear refusal of a model split over devices. The real split (layer 0 on the CPU, layer 1
on the GPU, every registry method) is the gpu test at the end."""

import pytest
import torch

import zipkv
from tiny_models import generate_new_tokens, padded_batch, tiny_model
from zipkv.parallel import cache_layer_devices, check_one_device, check_placement, layer_device_map

SPLIT = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": 1, "model.norm": 1,
         "model.rotary_emb": 1, "lm_head": 1}


def test_layer_devices_from_the_device_map():
    model = tiny_model("llama")
    assert layer_device_map(model) == [torch.device("cpu")] * 2  # no map: the parameters' device
    model.hf_device_map = SPLIT
    assert layer_device_map(model) == [torch.device("cpu"), torch.device("cuda", 1)]
    model.hf_device_map = {"": 0}
    assert layer_device_map(model) == [torch.device("cuda", 0)] * 2
    model.hf_device_map = {"model": "cpu", "model.layers.1": "disk"}
    assert layer_device_map(model) == [torch.device("cpu"), torch.device("meta")]


@pytest.mark.parametrize("method", ["full", "zipkv", "kivi", "snapkv", "zipvl", "minicache"])
def test_cache_layers_live_where_their_states_came_from(method):
    model = tiny_model("llama")
    cache = zipkv.make_cache(method, model.config, **({"budget": 40} if method == "snapkv" else {}))
    ids, mask = padded_batch(64, 5)
    generate_new_tokens(model, cache, ids, mask, 3)
    assert all(held == {torch.device("cpu")} for held in cache_layer_devices(cache))
    check_placement(cache, model)
    model.hf_device_map = SPLIT  # the map says layer 1 runs on cuda:1: its cache is on the wrong device
    with pytest.raises(ValueError, match=r"layer 1: on \['cpu'\], its decoder layer on cuda:1"):
        check_placement(cache, model)


def test_static_path_refuses_a_split_model_naming_the_devices():
    model = tiny_model("llama", num_hidden_layers=4)
    assert check_one_device(model) == torch.device("cpu")
    model.hf_device_map = {"model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 1, "model.layers.3": 1}
    with pytest.raises(ValueError, match=r"cuda:0 \(layers 0-1\), cuda:1 \(layers 2-3\)"):
        check_one_device(model)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["full", "zipkv", "kivi", "zipcache", "snapkv", "adakv", "cake", "zipvl"])
def test_split_cpu_gpu_model_decodes_as_one_device(method, tmp_path):
    """Layer 0 on the CPU, layer 1 on cuda:0 (accelerate hooks move the hidden states): every
    cache layer lives on its layer's device and the tokens equal the one-device run."""
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
    assert torch.equal(tokens[0], tokens[1])
