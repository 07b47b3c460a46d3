"""Memory on CUDA: what stats() reports is what the allocator holds for the cache, and 50
sequential prompts leave the allocated bytes flat (tests/test_soak.py's loop on the GPU).

stats() vs the allocator, per registry method: a tiny fp16 Llama (head_dim 64, so the
Triton kernels take the shapes) on CUDA; one warm-up run of the method first (cuBLAS
workspaces, zipkv's memo tables and compiled kernels allocate once per process); then
after gc and empty_cache, the growth of torch.cuda.memory_allocated() across a prefill and a
few decode steps, with the logits dropped and only the cache kept, is compared with
cache.stats().bytes_held.

The documented slack: the caching allocator rounds every block up to a multiple of 512
bytes (at least 512), so each held tensor storage may cost up to 511 bytes more than its
elements: 0 <= growth - (bytes_held - bytes held on the CPU) <= 512 x storages held. Views
sharing one storage are one block, so the storages are counted by data pointer; a cache
that kept a view of a larger buffer would show the whole buffer here (and fail: stats()
would then hold less than the allocator does).
"""

import gc

import pytest
import torch
from held_tensors import reachable_tensors
from test_memory import PARAMS, method_names
from test_soak import DECODE_STEPS, PROMPTS, WARM, soak
from tiny_models import padded_batch, tiny_model

import zipkv

pytestmark = pytest.mark.gpu
BLOCK = 512  # the CUDA caching allocator's rounding (c10/cuda/CUDACachingAllocator.cpp: kMinBlockSize)
FLAT_SLACK = 1 * 2**20  # a leaked cache of this model is ~100 KB: 40 prompts of it would be ~4 MB


def cuda_model():
    return tiny_model("llama", hidden_size=256).half().cuda()  # head_dim 64


def settle() -> int:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def prefill_and_decode(model, method):
    ids, mask = (t.cuda() for t in padded_batch(length=48, pad=6))
    cache = zipkv.make_cache(method, model.config, **PARAMS.get(method, {}))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        for _ in range(4):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = model(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=mask, past_key_values=cache,
                        use_cache=True)
    del out
    return cache


@pytest.mark.parametrize("method", method_names())
def test_stats_equal_the_allocator_growth(method):
    model = cuda_model()
    prefill_and_decode(model, method)  # warm-up (its cache dropped at once): once-per-process allocations
    before = settle()
    cache = prefill_and_decode(model, method)
    grown = settle() - before
    held = reachable_tensors(cache)
    on_cpu = sum(t.numel() * t.element_size() for t in held if t.device.type != "cuda")
    storages = {t.untyped_storage().data_ptr() for t in held if t.device.type == "cuda"}
    reported = cache.stats().bytes_held - on_cpu
    context = (f"{method}: allocator grew {grown} B, stats().bytes_held {reported + on_cpu} B "
               f"({on_cpu} B of it on the CPU), {len(storages)} CUDA storages held")
    assert reported > 0, context
    assert 0 <= grown - reported <= BLOCK * len(storages), context


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("method", method_names())
def test_fifty_prompts_leave_allocated_memory_flat(method, grad):
    model = cuda_model()
    seen = soak(model, method, grad)
    before, after = seen["allocated"]
    context = f"{method} grad={grad}: prompts {WARM} -> {PROMPTS} ({DECODE_STEPS} decode steps each)"
    assert not seen["alive"], f"{context}: the caches of prompts {seen['alive']} outlived their last reference"
    assert seen["tensors"][1] == seen["tensors"][0], f"{context}: live tensors {seen['tensors']}"
    assert after - before <= FLAT_SLACK, f"{context}: allocated grew {after - before} B ({before} -> {after})"
