"""Tensor parallel on CPU (gloo): 2 ranks of transformers' tp_plan="auto" with zipkv caches give
the single-process greedy tokens, each rank holds half the KV heads, and the head-sharded
bytes of the ranks add up to the single-process cache's (zipkv/parallel/)."""

import json

import pytest
import torch
import torch.multiprocessing as mp

import zipkv
from tiny_models import tiny_model
from tp_worker import METHODS, decode_all, free_port, run_rank
from zipkv.parallel import HeadShard, local_heads, rule_counts, shard_cache

WORLD = 2
VARLEN = {"adakv", "cake"}  # methods whose kept tokens are held ragged (flat [N, D] + offsets)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(single-process results, [rank 0, rank 1] results) on one tiny Llama saved locally."""
    root = tmp_path_factory.mktemp("tp")
    model = tiny_model("llama", seed=3, num_attention_heads=4, num_key_value_heads=2)
    model.save_pretrained(root / "model")
    single = decode_all(model, lambda method, **s: zipkv.make_cache(method, model.config, **s))
    mp.spawn(run_rank, args=(WORLD, free_port(), str(root / "model"), str(root)), nprocs=WORLD, join=True)
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return single, ranks


def test_each_rank_holds_its_kv_heads(runs):
    _, ranks = runs
    for r, rank in enumerate(ranks):
        assert rank["config_kv_heads"] == 2 and rank["local_kv_heads"] == 1  # the config keeps the global count
        assert rank["shard"]["rank"] == r and rank["shard"]["world_size"] == WORLD


@pytest.mark.parametrize("method", list(METHODS))
def test_tp_tokens_equal_single_process(runs, method):
    single, ranks = runs
    for rank in ranks:
        assert rank["methods"][method]["tokens"] == single[method]["tokens"]


@pytest.mark.parametrize("method", list(METHODS))
def test_tp_bytes_add_up(runs, method):
    single, ranks = runs
    figures = [rank["methods"][method] for rank in ranks]
    # the head-sharded tensors are the single cache's cut by KV head; bookkeeping is held by every rank
    assert sum(f["sharded"] for f in figures) == single[method]["sharded"]
    for f in figures:
        if method in VARLEN:  # ragged stores' offsets [B * H_local + 1]: one int64 more per rank, not per head
            rows_heads = 2 * 2  # batch 2 x 2 KV heads, per layer
            offsets = 2 * 8 * (rows_heads + 1 - (rows_heads // WORLD + 1))
            assert f["bookkeeping"] == single[method]["bookkeeping"] - offsets
        else:
            assert f["bookkeeping"] == single[method]["bookkeeping"]
        assert f["bytes"] == f["sharded"] + f["bookkeeping"]
        tp = f["tp"]
        assert tp["ranks_bytes"] == [g["bytes"] for g in figures] and tp["total_bytes"] == sum(tp["ranks_bytes"])
        assert tp["sharded_total"] == single[method]["sharded"]
        assert tp["fp16_bytes"] == single[method]["tp"]["fp16_bytes"]
    if method != "adakv":  # adakv's head budgets differ per head, so per rank; the others give each head as much
        assert figures[0]["bytes"] == figures[1]["bytes"]


def test_rule_counts_slices_head_budgets_without_a_group():
    """adakv's head budgets: computed over all heads, each rank keeps its columns (the local
    slicing the collective path uses, checked on one process)."""
    from zipkv.eviction.budgets.adakv import adakv_layer_counts

    g = torch.Generator().manual_seed(0)
    scores, real = torch.rand(2, 4, 30, generator=g), torch.ones(2, 30, dtype=torch.bool)
    budgets = torch.tensor([10, 12])
    full = rule_counts(None, adakv_layer_counts, scores, budgets, real, layer=0, num_layers=2, window=0)
    halves = [local_heads(HeadShard(rank=r, world_size=2), full) for r in range(2)]
    assert torch.equal(torch.cat(halves, dim=1), full) and halves[0].shape == (2, 2)


def test_head_shard_errors():
    with pytest.raises(ValueError, match="rank must be"):
        HeadShard(rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size must be"):
        HeadShard(rank=0, world_size=0)
    with pytest.raises(ValueError, match="do not split"):
        HeadShard(rank=0, world_size=2).local_range(3)
    cache = shard_cache(zipkv.make_cache("zipkv", tiny_model().config), tiny_model())
    assert cache.head_shard is None  # a model on one process: nothing to reduce
