"""EvictingLayer's attention forms (cache/eviction_layer.py): the unmasked causal prefill
(is_causal, GQA without copies) and the masked attention reading K / V as held (enable_gqa)
equal the repeated-heads reference on fresh random inputs."""

import torch

from zipkv.cache.eviction_layer import causal_prefill_attention, masked_attention, repeated_masked_attention


def test_causal_prefill_equals_the_masked_reference():
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    g = torch.Generator().manual_seed(seed)
    for b, hq, hkv, t, d in ((2, 8, 2, 37, 16), (1, 4, 4, 64, 32), (3, 6, 1, 5, 8)):
        q, k, v = (torch.randn(b, h, t, d, generator=g) for h in (hq, hkv, hkv))
        causal = torch.ones(t, t, dtype=torch.bool).tril()[None, None].expand(b, 1, t, t)
        want = repeated_masked_attention(q, k, v, causal, 0.3)
        got = causal_prefill_attention(q, k, v, 0.3)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (seed, (got - want).abs().max())


def test_gqa_masked_attention_equals_repeated_heads():
    """Decode (q = 1) and multi-token forwards, masks shared by the heads or per KV head (AdaKV's
    budgets), padding rows, MHA and GQA."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    g = torch.Generator().manual_seed(seed)
    for b, hq, hkv, q, k, d, mask_heads in ((2, 8, 2, 1, 37, 16, 1), (3, 12, 2, 1, 50, 8, 2), (2, 6, 3, 5, 20, 8, 3),
                                            (1, 4, 4, 3, 9, 16, 1), (2, 14, 2, 4, 33, 8, 1)):
        query = torch.randn(b, hq, q, d, generator=g)
        key, value = (torch.randn(b, hkv, k, d, generator=g) for _ in range(2))
        mask = torch.rand(b, mask_heads, q, k, generator=g) < 0.7
        mask[..., -1] = True  # every row sees at least one token
        want = repeated_masked_attention(query, key, value, mask, 0.25)
        got = masked_attention(query, key, value, mask, 0.25)
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (seed, (got - want).abs().max())
