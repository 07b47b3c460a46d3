"""The captured parts of static decoding hold nothing a CUDA graph refuses (tests/capture_ops.py),
checked on the CPU: every layer's decode step (update + attend) and its device-side block flush
(flush_on_device, the second graph), for each quantizing method with a static form. The H200
run found rotated / rotated_2bit failing the capture ("operation failed due to a previous error
during capture"): their rotated float32 states made the block's quantizer choose its parameter
dtype from the data's range on the host (a sync) inside the flush graph."""

import pytest
import torch

import zipkv
from capture_ops import UncapturableOps, record_layer_calls
from tiny_models import padded_batch, tiny_model
from zipkv.graph_decode import StaticDecoder, prompt_positions
from zipkv.transformers_support import cache_kwargs

METHODS = ["rotated", "rotated_2bit", "zipkv", "zipcache", "kivi", "uniform"]


def test_the_checker_sees_a_sync_a_host_tensor_and_a_lazy_sign_vector():
    x = torch.randn(4, 8)
    with UncapturableOps() as mode:
        x.repeat_interleave(2, dim=0)  # an int: an expand, capturable
        x * 0.5 + torch.arange(8)
    assert mode.found == []
    with UncapturableOps() as mode:
        float(x.amax())
        torch.tensor([1.0, 2.0])
        torch.randint(0, 2, (3,), generator=torch.Generator().manual_seed(0))
        x.repeat_interleave(torch.tensor([1, 2, 1, 0]), dim=0)
    whys = [why for _, why in mode.found]
    assert any("sync" in w for w in whys) and any("host data" in w for w in whys)
    assert any("generator" in w for w in whys) and any("repeat_interleave" in w for w in whys)


@pytest.mark.parametrize("method", METHODS)
def test_static_steps_and_device_flushes_are_capturable(method):
    model = tiny_model("llama")
    ids, mask = padded_batch(length=40, pad=0)
    cache = zipkv.make_cache(method, model.config, decode_path="packed", stream_interval=8, residual_length=4)
    positions = prompt_positions(mask)
    with torch.inference_mode():
        first = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                      **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
    decoder = StaticDecoder(model, cache, first, positions[:, -1] + 1, 20, mask, cuda_graph=False, device_flush=True)
    mode = record_layer_calls(cache.layers)
    for _ in range(20):
        decoder.step()
    assert decoder.device_flushes >= 2 and decoder.flushes == decoder.device_flushes  # every block on the device
    assert mode.found == [], mode.found[:8]


def decode_static(model, method, ids, mask, steps, device_flush):
    """(tokens, cache) of `steps` static steps (no graph) after a prefill of the padded batch."""
    cache = zipkv.make_cache(method, model.config, decode_path="packed", stream_interval=8, residual_length=4)
    positions = prompt_positions(mask)
    with torch.inference_mode():
        first = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                      **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
    decoder = StaticDecoder(model, cache, first, positions[:, -1] + 1, steps, mask, cuda_graph=False,
                            device_flush=device_flush)
    tokens = torch.cat([first] + [decoder.step().clone() for _ in range(steps)], dim=1)
    assert decoder.device_flushes == (decoder.flushes if device_flush else 0) and decoder.flushes >= 2
    return tokens, cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", ["rotated", "rotated_2bit"])
def test_rotated_device_flush_stores_what_the_host_flush_stores(method, dtype):
    """The device flush (parameter dtypes fixed at to_static) and the host flush write the same
    bytes; on the fp32 model (fp16 window) both decode the tokens model.generate does."""
    model = tiny_model("llama").to(dtype)
    ids, mask = padded_batch(length=40, pad=0)
    host, host_cache = decode_static(model, method, ids, mask, 20, device_flush=False)
    dev, dev_cache = decode_static(model, method, ids, mask, 20, device_flush=True)
    assert torch.equal(host, dev)
    for a, b in zip(host_cache.layers, dev_cache.layers):
        assert a.lengths.tolist() == b.lengths.tolist()
        for ta, tb in zip(a.attended, b.attended):
            for x, y in zip(vars(ta.valid_segment()).values(), vars(tb.valid_segment()).values()):
                assert (x == y) if not isinstance(x, torch.Tensor) else torch.equal(x, y)
    if dtype == torch.float32:
        cache = zipkv.make_cache(method, model.config, decode_path="packed", stream_interval=8, residual_length=4)
        with torch.no_grad():
            eager = model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=21,
                                   do_sample=False)
        assert torch.equal(eager[:, ids.shape[1]:], host)
