"""The paged store (zipkv/cache/paged_store.py) and its decode kernel: pages hold exactly the
contiguous store's codes and scales, the block-table kernel (Triton under TRITON_INTERPRET=1)
matches the contiguous decode on fresh random inputs (ragged lengths, shuffled pages, GQA),
and allocation, freeing, fragmentation and bytes are what the pages say."""

import pytest
import torch

from triton_mode import interpreter_module_mark

pytestmark = interpreter_module_mark()  # Triton's interpreter; skipped in a compiled GPU session

from zipkv.cache.paged_store import PagedStore  # noqa: E402
from zipkv.cache.tier import PackedTier  # noqa: E402
from zipkv.kernels.decode_attention import decode_attention_reference  # noqa: E402
from zipkv.kernels.paged_decode import paged_decode_attention, paged_decode_reference  # noqa: E402


def filled_store(seed, lengths, *, heads=2, dim=32, page=8, key_bits=4, value_bits=2, value_group=None):
    """A store whose sequences hold random tokens of `lengths`, on shuffled pool pages, and the
    states they came from ([H, L, D] per sequence)."""
    g = torch.Generator().manual_seed(seed)
    max_pages = max(-(-n // page) for n in lengths) + 1
    store = PagedStore(num_pages=len(lengths) * max_pages + 3, page_size=page, num_heads=heads, head_dim=dim,
                       max_seqs=len(lengths), max_pages_per_seq=max_pages, key_bits=key_bits,
                       value_bits=value_bits, value_group=value_group)
    order = torch.randperm(store.num_pages, generator=g).tolist()  # pages of a sequence scattered over the pool
    states = []
    for seq, n in enumerate(lengths):
        keys = (torch.randn(heads, n, dim, generator=g) * 2 + torch.randn(heads, 1, dim, generator=g)).half()
        values = torch.randn(heads, n, dim, generator=g).half()
        need = -(-n // page)
        if need:
            store.allocate(seq, need, pages=[p for p in order if p in store.free_pages][:need])
        cut = (n // page) * page
        store.append(seq, keys[:, : max(cut, 0)], values[:, : max(cut, 0)])  # whole pages, then the tail
        store.append(seq, keys[:, cut:], values[:, cut:])
        states.append((keys, values))
    return store, states


def contiguous_tier(keys, values, page, key_bits=4, value_bits=2, value_group=None):
    tier = PackedTier(key_bits, key_group_size=page, value_group_size=value_group, channel_separable=False,
                      value_bits=value_bits, front_partial_group=False)
    tier.append(keys[None], values[None])
    return tier


@pytest.mark.parametrize("bits", [(4, 2), (2, 2), (8, 4)])
def test_pages_dequantize_as_the_contiguous_tier(bits):
    key_bits, value_bits = bits
    store, states = filled_store(1, [21, 8, 3, 40], key_bits=key_bits, value_bits=value_bits, value_group=16)
    for seq, (keys, values) in enumerate(states):
        k, v = store.dequantize(seq)
        ref_k, ref_v = contiguous_tier(keys, values, 8, key_bits, value_bits, 16).dequantize(torch.float32)
        assert torch.equal(k, ref_k[0]) and torch.equal(v, ref_v[0])


@pytest.mark.parametrize("seed,lengths,hq", [(2, [37, 5, 16, 0, 64], 4), (3, [9, 70], 2), (4, [1, 33, 12], 8)])
def test_paged_kernel_matches_contiguous_decode(seed, lengths, hq):
    store, states = filled_store(seed, lengths)
    query = torch.randn(len(lengths), hq, 1, 32, generator=torch.Generator().manual_seed(seed + 100)).half()
    triton_out = paged_decode_attention(query, store, impl="triton")
    reference = paged_decode_reference(query, store)
    for seq, (keys, values) in enumerate(states):
        if keys.shape[1] == 0:
            assert torch.all(triton_out[seq] == 0)
            continue
        contiguous = decode_attention_reference(query[seq : seq + 1], [contiguous_tier(keys, values, 8)], None, None)
        torch.testing.assert_close(reference[seq].float(), contiguous[0].float(), atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(triton_out[seq].float(), contiguous[0].float(), atol=2e-3, rtol=2e-3)


def test_allocate_free_fragmentation_and_bytes():
    store, _ = filled_store(5, [20, 8])
    stats = store.stats()
    assert stats.tokens == 28 and stats.pages_used == 3 + 1 and stats.pages_free == store.num_pages - 4
    assert stats.fragmentation == pytest.approx(1 - 28 / 32)
    assert stats.bytes_held == sum(t.numel() * t.element_size() for t in store.tensors())
    # a page: 2 heads x 8 tokens x (16 key bytes + 8 value bytes) + key scales 2 x 2 x 32 x 2 + value scales 2 x 8 x 2 x 2
    assert store.page_bytes() == 2 * 8 * (16 + 8) + 2 * 2 * 32 * 2 + 2 * 2 * 8 * 1 * 2
    table = store.block_table.numel() * 4 + store.lengths.numel() * 4
    assert stats.bytes_used == 4 * store.page_bytes() + table
    pages = store.pages_of(0)
    store.free(0)
    assert set(pages) <= set(store.free_pages) and int(store.lengths[0]) == 0 and store.stats().pages_used == 1
    tail = torch.zeros(2, 3, 32).half()
    store.append(0, tail, tail)  # 3 tokens: a partial page, sealed
    with pytest.raises(ValueError, match="partial page"):
        store.append(0, tail, tail)


def test_errors_name_the_parameter():
    with pytest.raises(ValueError, match="page_size"):
        PagedStore(4, 0, 2, 32, max_seqs=1, max_pages_per_seq=2)
    with pytest.raises(ValueError, match="key_bits"):
        PagedStore(4, 8, 2, 32, max_seqs=1, max_pages_per_seq=2, key_bits=3)
    with pytest.raises(ValueError, match="value_group"):
        PagedStore(4, 8, 2, 32, max_seqs=1, max_pages_per_seq=2, value_group=5)
    store = PagedStore(2, 8, 2, 32, max_seqs=1, max_pages_per_seq=4)
    with pytest.raises(ValueError, match="pages asked"):
        store.allocate(0, 3)
    with pytest.raises(ValueError, match="seq must be"):
        store.free(1)
    with pytest.raises(ValueError, match="multiple of"):
        paged_decode_attention(torch.zeros(1, 3, 32), store)
    odd = PagedStore(2, 6, 2, 32, max_seqs=1, max_pages_per_seq=2)
    with pytest.raises(ValueError, match="power of two"):
        paged_decode_attention(torch.zeros(1, 2, 32), odd, impl="triton")
