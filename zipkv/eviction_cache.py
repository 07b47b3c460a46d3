"""Named eviction presets: `make_eviction_cache(method, config, budget=... | ratio=..., **params)`.

    cache = make_eviction_cache("snapkv", model.config, ratio=0.2)
    model.generate(**inputs, cache=cache, max_new_tokens=32)
    cache.stats()  # bytes really held, kept tokens, peak

budget: tokens kept per layer and sequence (an error if larger than the prompt);
ratio: kept fraction of each sequence's real prompt tokens, in (0, 1]. The methods, their
defaults and parameters are the evict and tiered families of `zipkv.METHODS`
(zipkv/registry.py; `zipkv methods` prints them); their policies and the builders that
make them from a method's settings are in zipkv/policies/, one file per policy.
`make_eviction_cache("full", ...)` is the lossless reference on the same machinery.

ZipVL's sparse prefill (zipvl and zipvl_v2 only, default off):

| option | what it does |
|---|---|
| sparse_prefill=True | each layer's prompt attention runs on its important set T only, O = Attn(Q[T], K[T], V[T]) causal: the tau rule's tokens plus the recent probes and the last token; rows outside T get a zero attention output (residual and MLP still run). Decoding is unchanged. `cache.sparse_prefill_report()` (and `stats().sparse_prefill`) gives the kept fraction per layer and the attention FLOPs done vs dense. A live prefill only: it cannot be built from a recorded dense prefill. |
"""

from __future__ import annotations

from .cache.eviction_cache import EvictionCache, EvictionStats, record_prefill
from .policies.keep import KeepPolicy
from .policies.tiered import byte_budget_split
from .registry import check_method, names

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


__all__ = ["make_eviction_cache", "EVICTION_METHODS", "EvictionCache", "EvictionStats", "record_prefill",
           "byte_budget_split"]
