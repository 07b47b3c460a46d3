"""Soak: 50 sequential prompts per registry method, each with a fresh cache (prefill + a few
greedy decode steps as direct forwards), once with grad enabled and once under no_grad, on a
tiny random Llama. What a server does between requests: nothing of one prompt may stay.

Asserted per method and mode:
- every cache is gone the moment its last reference goes (a weak reference, checked before
  the cyclic collector can run), so no cache object is alive at the end;
- the number of live tensors after prompt 50 equals the number after prompt 10 (the first
  prompts warm memo tables; a tensor kept per prompt is a leak, whatever its size);
- resident memory (RSS, /proc/self/statm) after prompt 50 is within RSS_SLACK of prompt 10.

The embedded model at 2K tokens: experiments/soak.py (results/soak/); on CUDA:
tests/test_gpu_memory.py (allocated bytes flat over the same loop).
"""

import gc
import os
import sys
import weakref

import pytest
import torch
from test_memory import PARAMS, method_names
from tiny_models import padded_batch, tiny_model

import zipkv

PROMPTS, WARM, DECODE_STEPS = 50, 10, 1  # one decode step: the forwards are the whole cost (~10 ms each)
# The allocator keeps freed pages and grows its arenas in steps; a cache of the tiny model is
# ~10 KB, so a per-prompt leak of it would take 50 prompts to reach 0.5 MB: the tensor count
# catches it exactly, this bounds what is not a tensor (Python objects, allocator growth).
RSS_SLACK = 4 * 2**20


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensors() -> int:
    """Tensors alive now, without running the cyclic collector first: a tensor that only the
    collector would free is held by a cycle, which counts against the loop too."""
    tensor = torch.Tensor
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), tensor))


def run_prompt(model, method, ids, mask):
    """A fresh cache through a prefill and DECODE_STEPS greedy steps; returns a weak
    reference to it after dropping every strong one."""
    cache = zipkv.make_cache(method, model.config, **PARAMS.get(method, {}))
    out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    for _ in range(DECODE_STEPS):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=mask, past_key_values=cache,
                    use_cache=True)
    assert cache.get_seq_length() > 0
    ref = weakref.ref(cache)
    del out, cache
    return ref


def soak(model, method, grad: bool) -> dict:
    """The loop; returns what it measured (asserted by the caller)."""
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    device = next(model.parameters()).device
    _, mask = padded_batch(length=48, pad=6)
    mask = mask.to(device)
    alive, marks = [], {}
    # the garbage of earlier tests in this process goes first: the collector would otherwise free
    # some of it during the loop (the count once fell by 15 between the marks in a long run)
    gc.collect()
    with torch.set_grad_enabled(grad):
        for prompt in range(1, PROMPTS + 1):
            ids = torch.randint(3, 250, mask.shape, generator=g).to(device) * mask  # fresh tokens, the padding kept
            ref = run_prompt(model, method, ids, mask)
            if ref() is not None:
                alive.append(prompt)
            if prompt in (WARM, PROMPTS):
                allocated = None
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    allocated = torch.cuda.memory_allocated(device)
                marks[prompt] = (live_tensors(), rss_bytes(), allocated)
    return dict(alive=alive, **{key: (marks[WARM][i], marks[PROMPTS][i])
                                for i, key in enumerate(("tensors", "rss", "allocated"))})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS read from /proc/self/statm")
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("method", method_names())
def test_fifty_prompts_leave_nothing_behind(method, grad):
    model = tiny_model("llama")
    seen = soak(model, method, grad)
    assert not seen["alive"], f"{method}: the caches of prompts {seen['alive']} outlived their last reference"
    assert seen["tensors"][1] <= seen["tensors"][0], (
        f"{method} grad={grad}: {seen['tensors'][1] - seen['tensors'][0]} more live tensors after prompt {PROMPTS} "
        f"than after prompt {WARM} ({seen['tensors']})")
    growth = seen["rss"][1] - seen["rss"][0]
    assert growth <= RSS_SLACK, f"{method} grad={grad}: RSS grew {growth / 2**20:.2f} MiB from prompt {WARM} to {PROMPTS}"
