"""Named eviction presets: `make_eviction_cache(method, config, budget=... | ratio=..., **params)`.

    cache = make_eviction_cache("snapkv", model.config, ratio=0.2)
    model.generate(**inputs, cache=cache, max_new_tokens=32)
    cache.stats()  # bytes really held, kept tokens, peak

budget: tokens kept per layer and sequence (an error if larger than the prompt);
ratio: kept fraction of each sequence's real prompt tokens, in (0, 1]. The methods, their
defaults and parameters are the evict and tiered families of `zipkv.METHODS`
(zipkv/registry.py; `zipkv methods` prints them); this module makes their policies.
`make_eviction_cache("full", ...)` is the lossless reference on the same machinery.

ZipVL's sparse prefill (zipvl and zipvl_v2 only, default off):

| option | what it does |
|---|---|
| sparse_prefill=True | each layer's prompt attention runs on its important set T only, O = Attn(Q[T], K[T], V[T]) causal: the tau rule's tokens plus the recent probes and the last token; rows outside T get a zero attention output (residual and MLP still run). Decoding is unchanged. `cache.sparse_prefill_report()` (and `stats().sparse_prefill`) gives the kept fraction per layer and the attention FLOPs done vs dense. A live prefill only: it cannot be built from a recorded dense prefill. |
"""

from __future__ import annotations

import inspect

from .cache.cache import head_dim
from .cache.config import CompressionConfig
from .cache.eviction_cache import EvictionCache, EvictionStats, record_prefill
from .cache.eviction_policies import (ContinuousPolicy, KeepPolicy, SelectPolicy, TieredPolicy,
                                      bytes_per_token)
from .eviction import make_scorer
from .eviction.scorers import SCORERS
from .eviction.validation import check_ratio
from .registry import TIER_PARAMS, TIER_QUANT, check_method, names

REFERENCE = "full"  # every token kept, through EvictionCache: the exact reference of this family
EVICTION_METHODS = (REFERENCE,) + names("evict", "tiered")


def make_eviction_cache(method: str, config, *, budget: int | None = None, ratio: float | None = None,
                        keep_model_dtype: bool = False, **params) -> EvictionCache:
    """The cache of a named eviction method for a model config (zipkv.METHODS, families
    evict and tiered). keep_model_dtype: keep unquantized tokens in the model's dtype (fp32
    models: fp32) instead of fp16; for exact comparisons."""
    if method not in EVICTION_METHODS:
        raise ValueError(f"method must be one of {sorted(EVICTION_METHODS)} (got {method!r})")
    if method == REFERENCE:
        if "sparse_prefill" in params:
            raise ValueError(f"sparse_prefill needs ZipVL's important set (the tau rule); {method} has none: "
                             "use zipvl or zipvl_v2")
        if params:
            raise ValueError(f"{method} does not take {sorted(params)}; it accepts []")
        if budget is not None or ratio is not None:
            raise ValueError("full keeps every token: no budget or ratio")
        return EvictionCache(config, KeepPolicy(), method=method, keep_model_dtype=True)
    given = dict(params, keep_model_dtype=keep_model_dtype)
    given.update({k: v for k, v in (("budget", budget), ("ratio", ratio)) if v is not None})
    return check_method(method, given).build(config, **given)


# ---- policy makers: the registry's builders call these with a method's settings ------------
# config is None when zipkv.registry.check_method only validates the settings.

def continuous_policy(config, *, kind: str, budget=None, ratio=None, **p) -> ContinuousPolicy:
    return ContinuousPolicy(budget=budget, ratio=ratio, kind=kind, **p)


def select_policy(config, *, rule: str, scorer: str, budget=None, ratio=None, **p) -> SelectPolicy:
    extra = {k: p[k] for k in ("window", "beta", "alpha", "tau1", "tau2") if k in p}
    return SelectPolicy(budget=budget, ratio=ratio, scorer=scorer_of(scorer, p), rule=rule, **extra)


def zipvl_policy(config, *, layout: str, budget=None, ratio=None, sparse_prefill: bool = False,
                 **p) -> TieredPolicy:
    return TieredPolicy(budget=budget, ratio=ratio, rule="zipvl", layout=layout, settings=_quant(p),
                        sparse_prefill=sparse_prefill, **_tier(p))


def mikv_policy(config, *, scorer: str, budget=None, ratio=None, **p) -> TieredPolicy:
    if budget is not None or ratio is None:
        raise ValueError("mikv takes ratio (the fraction kept in high precision), not budget")
    return TieredPolicy(rule="ratios", layout="zipvl_v1", high_ratio=ratio, scorer=scorer_of(scorer, p),
                        settings=_quant(p), **_tier(p))


def three_tier_policy(config, *, scorer: str, **p) -> TieredPolicy:
    """Explicit high_ratio / low_ratio, or a byte budget split between the tiers."""
    quant = _quant(p)
    if "byte_ratio" in p:
        if "high_ratio" in p or "low_ratio" in p:
            raise ValueError("give byte_ratio (+ high_share) or high_ratio/low_ratio, not both")
        byte_ratio = check_ratio("byte_ratio", p["byte_ratio"])
        high_share = check_ratio("high_share", p.get("high_share", 0.5))
        # the split needs the head size; when only validating, the tiers get placeholder ratios
        split = (0.0, 0.0) if config is None else byte_budget_split(config, quant, byte_ratio, high_share)
        high_ratio, low_ratio = split
    else:
        high_ratio, low_ratio = p.get("high_ratio", 0.1), p.get("low_ratio", 0.1)
    return TieredPolicy(rule="ratios", layout="three_tier", high_ratio=high_ratio, low_ratio=low_ratio,
                        scorer=scorer_of(scorer, p), settings=quant, **_tier(p))


def scorer_of(name: str, p: dict):
    """The named scorer with those of the settings p that its class takes."""
    if name not in SCORERS:
        raise ValueError(f"scorer must be one of {sorted(SCORERS)} (got {name!r})")
    takes = inspect.signature(SCORERS[name]).parameters
    return make_scorer(name, **{k: v for k, v in p.items() if k in takes})


def _quant(p: dict) -> CompressionConfig:
    return CompressionConfig(**{k: p[k] for k in TIER_QUANT if k in p}, saliency="none")


def _tier(p: dict) -> dict:
    return {k: p[k] for k in TIER_PARAMS if k in p}


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


__all__ = ["make_eviction_cache", "EVICTION_METHODS", "EvictionCache", "EvictionStats", "record_prefill",
           "byte_budget_split"]
