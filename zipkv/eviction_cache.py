"""Named eviction presets: `make_eviction_cache(method, config, budget=... | ratio=..., **params)`.

    cache = make_eviction_cache("snapkv", model.config, ratio=0.2)
    model.generate(**inputs, past_key_values=cache, max_new_tokens=32)
    cache.stats()  # bytes really held, kept tokens, peak

budget: tokens kept per layer and sequence (an error if larger than the prompt);
ratio: kept fraction of each sequence's real prompt tokens. Methods (methods.md section 2
and ZipVL in section 1):

| method | keeps | when |
|---|---|---|
| full | everything (lossless reference, same machinery) | - |
| streaming_llm | 4 sinks + the most recent | after every forward |
| h2o | running-attention heavy hitters + the budget//2 most recent | after every forward |
| snapkv | window-vote top tokens + the 32-token window | prefill |
| pyramidkv | SnapKV with linearly decreasing layer budgets (beta 20) | prefill |
| adakv | SnapKV with head-wise budgets (alpha 0.2), ragged storage | prefill |
| cake | CAKE indicator, layer budgets by preference, cascading | prefill, layer by layer |
| defensive_kv, key_norm | those scorers, uniform budgets | prefill |
| zipvl | tau-important tokens high-bit (4), the rest low-bit (2) (v1) | prefill + every 100 tokens |
| zipvl_v2 | tau-important tokens high-bit, the rest evicted (cap: budget/ratio) | prefill + every 100 tokens |
| three_tier | top high_ratio high-bit, next low_ratio low-bit, rest evicted; or a byte budget | prefill + every 100 tokens |
| mikv | top `ratio` in fp16, every other token low-bit (2) | prefill + every 100 tokens |

ZipVL's sparse prefill (zipvl and zipvl_v2 only, default off):

| option | what it does |
|---|---|
| sparse_prefill=True | each layer's prompt attention runs on its important set T only, O = Attn(Q[T], K[T], V[T]) causal: the tau rule's tokens plus the recent probes and the last token; rows outside T get a zero attention output (residual and MLP still run). Decoding is unchanged. `cache.sparse_prefill_report()` (and `stats().sparse_prefill`) gives the kept fraction per layer and the attention FLOPs done vs dense. A live prefill only: it cannot be built from a recorded dense prefill. |
"""

from __future__ import annotations

from .cache.cache import head_dim
from .cache.config import CompressionConfig
from .cache.eviction_cache import EvictionCache, EvictionStats, record_prefill
from .cache.eviction_policies import (ContinuousPolicy, KeepPolicy, SelectPolicy, TieredPolicy,
                                      bytes_per_token)
from .eviction import make_scorer
from .eviction.validation import check_ratio

SCORER_PARAMS = ("window", "kernel_size", "pooling", "gamma")
QUANT_PARAMS = ("high_bits", "low_bits", "key_group_size", "value_group_size", "channel_separable")
TIER_PARAMS = ("tau", "probe_recent", "probe_random", "seed", "stream_interval")

# method -> (defaults, extra parameters it accepts)
METHODS: dict[str, tuple[dict, tuple[str, ...]]] = {
    "full": ({}, ()),
    "streaming_llm": (dict(num_sinks=4), ("num_sinks",)),
    "h2o": (dict(query_chunk=512), ("query_chunk",)),
    "snapkv": (dict(window=32, kernel_size=7, pooling="max"), ("window", "kernel_size", "pooling")),
    "pyramidkv": (dict(window=32, kernel_size=7, pooling="max", beta=20.0), ("window", "kernel_size", "pooling", "beta")),
    "adakv": (dict(window=32, kernel_size=7, pooling="max", alpha=0.2), ("window", "kernel_size", "pooling", "alpha")),
    "cake": (dict(window=32, kernel_size=5, gamma=200.0, tau1=1.0, tau2=1.0),
             ("window", "kernel_size", "gamma", "tau1", "tau2")),
    "defensive_kv": (dict(window=32, kernel_size=5), ("window", "kernel_size")),
    "key_norm": ({}, ()),
    "zipvl": (dict(tau=0.97, high_bits=4, low_bits=2), TIER_PARAMS + QUANT_PARAMS + ("sparse_prefill",)),
    "zipvl_v2": (dict(tau=0.97, high_bits=4, low_bits=2), TIER_PARAMS + QUANT_PARAMS + ("sparse_prefill",)),
    "three_tier": (dict(scorer="snapkv", window=32, kernel_size=7, pooling="max", high_bits=4, low_bits=2),
                   ("scorer", "high_ratio", "low_ratio", "byte_ratio", "high_share") + SCORER_PARAMS
                   + TIER_PARAMS + QUANT_PARAMS),
    "mikv": (dict(scorer="snapkv", window=32, kernel_size=7, pooling="max", high_bits=16, low_bits=2),
             ("scorer",) + SCORER_PARAMS + TIER_PARAMS + QUANT_PARAMS),
}
EVICTION_METHODS = tuple(METHODS)

_SNAP = ("snapkv", "pyramidkv", "adakv")
_RULE = {"snapkv": "uniform", "pyramidkv": "pyramid", "adakv": "adakv", "cake": "cake",
         "defensive_kv": "uniform", "key_norm": "uniform"}


def make_eviction_cache(method: str, config, *, budget: int | None = None, ratio: float | None = None,
                        keep_model_dtype: bool = False, **params) -> EvictionCache:
    """The cache of a named eviction method for a model config (see the table above).
    keep_model_dtype: keep unquantized tokens in the model's dtype (fp32 models: fp32)
    instead of fp16; for exact comparisons."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)} (got {method!r})")
    defaults, accepted = METHODS[method]
    if "sparse_prefill" in params and "sparse_prefill" not in accepted:
        raise ValueError(f"sparse_prefill needs ZipVL's important set (the tau rule); {method} has none: "
                         "use zipvl or zipvl_v2")
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"{method} does not take {unknown}; it accepts {sorted(accepted)} plus budget / ratio")
    p = {**defaults, **params}
    if method == "full":
        if budget is not None or ratio is not None:
            raise ValueError("full keeps every token: no budget or ratio")
        return EvictionCache(config, KeepPolicy(), method=method, keep_model_dtype=True)
    if method in ("streaming_llm", "h2o"):
        policy = ContinuousPolicy(budget=budget, ratio=ratio, kind=method, **p)
    elif method in _RULE:
        scorer = _scorer(method if method not in _SNAP else "snapkv", p)
        extra = {k: p[k] for k in ("window", "beta", "alpha", "tau1", "tau2") if k in p}
        policy = SelectPolicy(budget=budget, ratio=ratio, scorer=scorer, rule=_RULE[method], **extra)
    else:
        policy = _tiered(method, config, budget, ratio, p)
    return EvictionCache(config, policy, method=method, keep_model_dtype=keep_model_dtype)


def _scorer(name: str, p: dict):
    keys = {"snapkv": ("window", "kernel_size", "pooling"), "cake": ("window", "gamma", "kernel_size"),
            "defensive_kv": ("window", "kernel_size"), "key_norm": (), "h2o": (), "streaming_llm": (),
            "zipcache": ()}
    if name not in keys:
        raise ValueError(f"scorer must be one of {sorted(keys)} (got {name!r})")
    return make_scorer(name, **{k: p[k] for k in keys[name] if k in p})


def _tiered(method, config, budget, ratio, p):
    quant = CompressionConfig(**{k: p[k] for k in QUANT_PARAMS if k in p}, saliency="none")
    tier = {k: p[k] for k in TIER_PARAMS if k in p}
    if method in ("zipvl", "zipvl_v2"):
        tier["sparse_prefill"] = p.get("sparse_prefill", False)
        if method == "zipvl" and (budget is not None or ratio is not None):
            raise ValueError("zipvl (v1) keeps every token (important ones high-bit); budget/ratio apply to zipvl_v2")
        layout = "zipvl_v1" if method == "zipvl" else "zipvl_v2"
        return TieredPolicy(budget=budget, ratio=ratio, rule="zipvl", layout=layout, settings=quant, **tier)
    scorer = _scorer(p.get("scorer", "snapkv"), p)
    if method == "mikv":
        if budget is not None or ratio is None:
            raise ValueError("mikv takes ratio (the fraction kept in high precision), not budget")
        return TieredPolicy(rule="ratios", layout="zipvl_v1", high_ratio=ratio, scorer=scorer, settings=quant, **tier)
    # three_tier: explicit ratios, or a byte budget split between the tiers
    if budget is not None or ratio is not None:
        raise ValueError("three_tier takes high_ratio/low_ratio or byte_ratio (+ high_share), not budget/ratio")
    if "byte_ratio" in p:
        if "high_ratio" in p or "low_ratio" in p:
            raise ValueError("give byte_ratio (+ high_share) or high_ratio/low_ratio, not both")
        high_ratio, low_ratio = byte_budget_split(config, quant, check_ratio("byte_ratio", p["byte_ratio"]),
                                                  check_ratio("high_share", p.get("high_share", 0.5)))
    else:
        high_ratio, low_ratio = p.get("high_ratio", 0.1), p.get("low_ratio", 0.1)
    return TieredPolicy(rule="ratios", layout="three_tier", high_ratio=high_ratio, low_ratio=low_ratio,
                        scorer=scorer, settings=quant, **tier)


def byte_budget_split(config, quant: CompressionConfig, byte_ratio: float, high_share: float):
    """(high_ratio, low_ratio) whose tokens cost about byte_ratio of the fp16 prompt cache,
    high_share of it in the high tier (codes and tokenwise parameters; per-group parameters
    are amortized, so real bytes come out slightly above: stats() tells)."""
    d = head_dim(config)
    fp16 = bytes_per_token(16, d, None)
    high = byte_ratio * high_share * fp16 / bytes_per_token(quant.high_bits, d, quant.value_group_size)
    low = byte_ratio * (1 - high_share) * fp16 / bytes_per_token(quant.low_bits, d, quant.value_group_size)
    if high + low > 1.0:
        raise ValueError(f"byte_ratio={byte_ratio} buys more than every token at these bit widths; lower it")
    return high, low


__all__ = ["make_eviction_cache", "EVICTION_METHODS", "METHODS", "EvictionCache", "EvictionStats", "record_prefill",
           "byte_budget_split"]
