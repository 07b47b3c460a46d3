"""Every store class satisfies its storage protocol (zipkv/cache/protocol.py), and behaves
as the protocol says on fresh random tokens."""

import pytest
import torch

from zipkv.cache.eviction_store import Fp16Store, PackedStore
from zipkv.cache.layer import Fp16Tier
from zipkv.cache.protocol import KeptStore, StaticStore, TierStore
from zipkv.cache.static_tier import StaticTier
from zipkv.cache.tier import PackedTier
from zipkv.vlm.vidkv_tier import VidKVTier

B, H, D = 3, 2, 32


def tiers():
    return {
        "packed 4/2": PackedTier(4, 8, None, True, 2),
        "packed kivi 2": PackedTier(2, 8, 16, False),
        "fp16": Fp16Tier(),
        "vidkv": VidKVTier(32),
    }


@pytest.mark.parametrize("name", sorted(tiers()))
def test_tier_stores_keep_the_protocol(name):
    tier = tiers()[name]
    assert isinstance(tier, TierStore)
    g = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(B, H, 24, D, generator=g, dtype=torch.float16) for _ in range(2))
    tier.append(keys[:, :, :16], values[:, :, :16])
    tier.append(keys[:, :, 16:], values[:, :, 16:])
    assert tier.num_tokens == 24
    k, v = tier.dequantize(torch.float32)
    assert k.shape == v.shape == (B, H, 24, D)
    assert tier.nbytes() == sum(t.numel() * t.element_size() for t in tier.tensors())
    tier.select_batch(torch.tensor([2, 0]))
    k2, v2 = tier.dequantize(torch.float32)
    assert torch.equal(k2, k[[2, 0]]) and torch.equal(v2, v[[2, 0]])


def test_static_tier_is_a_static_store_holding_the_same_tokens():
    tier = tiers()["packed 4/2"]
    keys = torch.randn(B, H, 16, D, dtype=torch.float16)
    tier.append(keys, keys)
    static = StaticTier(tier, keys[:, :, :1], 16, 2, 1)
    assert isinstance(static, StaticStore) and static.capacity == 32
    assert all(torch.equal(a, b) for a, b in zip(static.dequantize(torch.float32), tier.dequantize(torch.float32)))


def test_kept_stores_keep_the_protocol():
    keys = torch.randn(B, H, 10, D, dtype=torch.float16)
    keep = torch.rand(B, H, 10) > 0.5
    fp16 = Fp16Store.select(keys, keys, keep)
    packed = PackedStore(4, None, None, True, B, H)
    packed.append(keys, keys, keep)
    for store in (fp16, packed):
        assert isinstance(store, KeptStore)
        k, v, valid = store.padded(torch.float32)
        assert valid.shape == k.shape[:3] and torch.equal(valid.sum(-1), keep.sum(-1))
