"""EvictingLayer's two attention forms (cache/eviction_layer.py): the unmasked causal prefill
(is_causal, GQA without copies) equals the masked reference on fresh random inputs."""

import torch

from zipkv.cache.eviction_layer import causal_prefill_attention, masked_attention


def test_causal_prefill_equals_the_masked_reference():
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    g = torch.Generator().manual_seed(seed)
    for b, hq, hkv, t, d in ((2, 8, 2, 37, 16), (1, 4, 4, 64, 32), (3, 6, 1, 5, 8)):
        q, k, v = (torch.randn(b, h, t, d, generator=g) for h in (hq, hkv, hkv))
        causal = torch.ones(t, t, dtype=torch.bool).tril()[None, None].expand(b, 1, t, t)
        want = masked_attention(q, k, v, causal, 0.3)
        got = causal_prefill_attention(q, k, v, 0.3)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (seed, (got - want).abs().max())
