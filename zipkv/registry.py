"""The one table of zipkv's methods: name -> family, docs line, defaults, parameters, builder.

    spec = zipkv.METHODS["snapkv"]            # MethodSpec
    name, params = parse_method_spec("snapkv:ratio=0.2,window=16")
    check_method(name, params)                # ValueError naming what was typed, before any model loads
    cache = spec.build(model.config, **params)

`make_cache`, `make_eviction_cache`, `zipkv generate --method`, `zipkv eval --methods`,
`zipkv methods`, the scripts and the README's method table all read METHODS. This module
imports nothing heavy (torch, transformers) at import time, so `zipkv --help` and `zipkv
methods` stay fast: builders and value checks import what they need when they run.

Adding a method: one `_register(MethodSpec(...))` below (and its README table row,
`zipkv methods --markdown` prints it; a test checks the two agree).
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

FAMILIES = ("lossless", "baseline", "quantize", "evict", "tiered", "merge")
BUDGET_PARAMS = ("budget", "ratio")


class MethodError(ValueError):
    """A bad method name or parameter; `param` is the parameter at fault (None: the name),
    so a front end can name its own flag for it (`--ratio`, `--method`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class MethodSpec:
    """One method. build(config, **params) -> cache (params already checked by
    `check_method`); check(params): the model-independent value checks (None: none)."""

    name: str
    family: str
    summary: str
    paper: str
    defaults: Mapping[str, Any]
    params: tuple[str, ...]
    takes_budget: bool
    footprint: str
    static: bool
    build: Callable[..., Any] = field(repr=False, compare=False)
    check: Callable[[dict], None] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES} (got {self.family!r})")
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    @property
    def accepts(self) -> list[str]:
        """Every keyword the method takes, budget / ratio included when they apply."""
        return sorted(set(self.params) | (set(BUDGET_PARAMS) if self.takes_budget else set()))

    def to_dict(self) -> dict:
        return dict(name=self.name, family=self.family, summary=self.summary, paper=self.paper,
                    defaults=dict(self.defaults), params=list(self.params), takes_budget=self.takes_budget,
                    footprint=self.footprint, static=self.static)


METHODS: dict[str, MethodSpec] = {}


def _register(spec: MethodSpec) -> None:
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} is already registered")
    METHODS[spec.name] = spec


def names(*families: str) -> tuple[str, ...]:
    """Method names in registration order, of the given families (all when none given)."""
    return tuple(n for n, s in METHODS.items() if not families or s.family in families)


# ---- spec text: NAME[:key=value,...] ---------------------------------------------------------

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


def coerce_value(text: str) -> Any:
    """true/false -> bool, none/null -> None, then int, float, else the text itself."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_method_spec(text: str) -> tuple[str, dict[str, Any]]:
    """"snapkv:ratio=0.2,window=16" -> ("snapkv", {"ratio": 0.2, "window": 16}). Only the
    syntax is checked here; `check_method` checks the name and the values."""
    name, _, rest = str(text).partition(":")
    name = name.strip()
    if not _NAME.match(name):
        raise MethodError(f"method must look like NAME[:key=value,...], got {text!r}")
    params: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise MethodError(f"method parameter must be key=value, got {item!r} in {text!r}")
        if key.strip() in params:
            raise MethodError(f"method parameter {key.strip()!r} is given twice in {text!r}", key.strip())
        params[key.strip()] = coerce_value(value.strip())
    return name, params


# ---- validation: in one place, before any model is loaded ----------------------------------

def check_method(name: str, params: Mapping[str, Any] | None = None) -> MethodSpec:
    """The spec of `name` once `params` are known to be ones it takes, with values in range;
    raises MethodError (a ValueError) naming what the user typed and what is allowed.
    Checks that need the model (a start layer past the last one, a budget larger than the
    prompt) happen when the cache is built or filled."""
    params = dict(params or {})
    if name not in METHODS:
        raise MethodError(f"method must be one of {sorted(METHODS)} (got {name!r})")
    spec = METHODS[name]
    if "sparse_prefill" in params and "sparse_prefill" not in spec.params:
        raise MethodError(f"sparse_prefill needs ZipVL's important set (the tau rule); {name} has none: "
                          "use zipvl or zipvl_v2", "sparse_prefill")
    unknown = sorted(set(params) - set(spec.accepts))
    if unknown:
        hint = "" if spec.takes_budget or not set(unknown) & set(BUDGET_PARAMS) else " (it has no budget / ratio)"
        raise MethodError(f"{name} does not take {unknown}{hint}; it accepts {spec.accepts}", unknown[0])
    if spec.takes_budget:  # (auto's ratio= is a target compression, checked by its own check)
        _check_budget(params)
    if spec.check is not None:
        try:
            spec.check(params)
        except MethodError:
            raise
        except ValueError as error:  # the settings' own message already names the parameter
            raise MethodError(str(error), _named_param(str(error), params)) from None
    return spec


def _named_param(message: str, params: Mapping[str, Any]) -> str | None:
    """The given parameter a settings error is about (its name opens the message)."""
    for key in sorted(params, key=len, reverse=True):
        if re.match(rf"^\W*{re.escape(key)}\b", message):
            return key
    return None


def _check_budget(params: Mapping[str, Any]) -> None:
    budget, ratio = params.get("budget"), params.get("ratio")
    if budget is not None and ratio is not None:
        raise MethodError("give budget (tokens per layer) or ratio (kept fraction), not both", "budget")
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, numbers.Integral):
            raise MethodError(f"budget must be an integer >= 1 (got {budget!r})", "budget")
        if budget < 1:
            raise MethodError(f"budget={budget} is outside the allowed range [1, inf]", "budget")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
            raise MethodError(f"ratio must be a number in (0, 1] (got {ratio!r})", "ratio")
        if not math.isfinite(ratio) or not 0.0 < ratio <= 1.0:
            raise MethodError(f"ratio={ratio} is outside the allowed range (0, 1]", "ratio")


def bits_choices() -> tuple[int, ...]:
    from .quant.quantizer import SUPPORTED_BITS

    return tuple(SUPPORTED_BITS)


# ---- builders ---------------------------------------------------------------------------------

# CompressionConfig's fields (a test keeps this list equal to the dataclass)
QUANT_SETTINGS = (
    "high_bits", "low_bits", "salient_ratio", "high_value_bits", "low_value_bits", "saliency", "probe_recent",
    "probe_random", "key_group_size", "value_group_size", "channel_separable", "sink_tokens", "residual_length",
    "stream_interval", "seed", "decode_path", "rotation",
)
SALIENCY_SETTINGS = ("salient_ratio", "saliency", "probe_recent", "probe_random", "seed")
UNSPLIT_SETTINGS = tuple(p for p in QUANT_SETTINGS if p not in SALIENCY_SETTINGS)


def _quantizing(name: str, defaults: dict) -> dict:
    """build / check of a ZipCache preset: `defaults` are CompressionConfig settings; "bits"
    (where the method takes it) sets both widths."""

    def settings(params: dict, config=None) -> dict:
        out = dict(defaults)
        params = dict(params)
        bits = params.pop("bits", None)
        if bits is not None:
            if bits not in bits_choices():
                raise MethodError(f"bits must be one of {bits_choices()} (got {bits!r})", "bits")
            out.update(high_bits=bits, low_bits=bits)
        out.update(params)
        if name == "kivi" and "value_group_size" not in params and config is not None:
            from .cache.cache import head_dim

            # KIVI's 32-channel value groups, or the whole head when it is narrower
            out["value_group_size"] = min(out["value_group_size"], head_dim(config))
        return out

    def build(config, **params):
        from .cache import ZipCache

        return ZipCache(config, **settings(params, config))

    def check(params: dict) -> None:
        from .cache.config import CompressionConfig

        CompressionConfig(**settings(params))

    return dict(defaults=defaults, build=build, check=check)


def _lossless(defaults: dict) -> dict:
    """`full`: the lossless ZipCache preset (its defaults are ZipCache settings), built as a
    FullCache, which has a static form (flash-decoding over the exact states)."""

    def build(config, **params):
        from .cache.baseline_cache import FullCache

        return FullCache(config, **{**defaults, **params})

    return dict(_quantizing("full", defaults), build=build)


def _baseline(form: str) -> dict:
    """build of a per token-head quantized baseline (cache/baseline_cache.py); no parameters."""

    def build(config):
        from .cache.baseline_cache import TokenQuantCache

        return TokenQuantCache(config, form)

    return dict(defaults={}, build=build)


def _evicting(name: str, policy: str, defaults: dict, **fixed) -> dict:
    """build / check of an eviction method: `policy` names its policy builder as
    "<file>.<function>" of zipkv/policies/, called with `fixed`, the defaults and the given
    parameters."""
    module, _, function = policy.partition(".")

    def make_policy(config, params: dict):
        from importlib import import_module

        builder = getattr(import_module(f"{__package__}.policies.{module}"), function)
        return builder(config, **fixed, **{**defaults, **params})

    def build(config, *, keep_model_dtype: bool = False, **params):
        from .cache.eviction_cache import EvictionCache

        return EvictionCache(config, make_policy(config, params), method=name, keep_model_dtype=keep_model_dtype)

    def check(params: dict) -> None:
        params = dict(params)
        keep = params.pop("keep_model_dtype", False)
        if not isinstance(keep, bool):
            raise MethodError(f"keep_model_dtype must be True or False (got {keep!r})", "keep_model_dtype")
        make_policy(None, params)

    return dict(defaults=defaults, build=build, check=check)


def _merging(defaults: dict) -> dict:
    def build(config, **params):
        from .cache.minicache import MiniCache

        return MiniCache(config, **{**defaults, **params})

    def check(params: dict) -> None:
        from .cache.minicache import MiniCacheConfig

        p = {**defaults, **params}
        start = p.get("start_layer")
        if start is not None and (isinstance(start, bool) or not isinstance(start, int) or start < 0):
            raise MethodError(f"start_layer must be None or an integer >= 0 (got {start!r})", "start_layer")
        # the upper end of start_layer depends on the model: checked when the cache is built
        MiniCacheConfig(num_layers=(start or 0) + 1, **p)

    return dict(defaults=defaults, build=build, check=check)


# ---- the methods ----------------------------------------------------------------------------

# kivi and uniform: one width for every token, `bits`, instead of per-tier widths
ONE_WIDTH = ("bits",) + tuple(p for p in UNSPLIT_SETTINGS if not p.endswith("_bits"))
SNAP = ("window", "kernel_size", "pooling")
SCORER_PARAMS = ("window", "kernel_size", "pooling", "gamma")
TIER_QUANT = ("high_bits", "low_bits", "key_group_size", "value_group_size", "channel_separable")
TIER_PARAMS = ("tau", "probe_recent", "probe_random", "seed", "stream_interval")
EVICT_COMMON = ("keep_model_dtype",)  # unquantized tokens in the model's dtype (exact comparisons)
SNAP_DEFAULTS = dict(window=32, kernel_size=7, pooling="max")

_register(MethodSpec(
    "full", "lossless", "every token fp16; equals DynamicCache token for token", "",
    params=(), takes_budget=False, footprint="16 bits/value", static=True,
    **_lossless(dict(high_bits=16, low_bits=16, saliency="none")),
))
_register(MethodSpec(
    "zipcache", "quantize", "probe-attention saliency: salient 60% of tokens 4-bit, the rest 2-bit",
    "He et al. 2024, ZipCache (arXiv 2405.14256)",
    params=QUANT_SETTINGS, takes_budget=False, footprint="~3.5 bits/value", static=True,
    **_quantizing("zipcache", dict(high_bits=4, low_bits=2, salient_ratio=0.6, saliency="probe")),
))
# zipkv's recipe: the bits go to the keys (channelwise keys 4-bit, channel-separable tokenwise
# values 2-bit, every token). On the embedded model it keeps passkey retrieval where the 4/2
# salient split loses it (README, results/passkey_ablation.json).
_register(MethodSpec(
    "zipkv", "quantize", "zipkv's recipe: keys 4-bit channelwise, values 2-bit channel-separable, every token", "",
    params=UNSPLIT_SETTINGS, takes_budget=False, footprint="~3.3 bits/value", static=True,
    **_quantizing("zipkv", dict(high_bits=4, low_bits=4, high_value_bits=2, low_value_bits=2, saliency="none")),
))
_register(MethodSpec(
    "kivi", "quantize", "keys per channel and values per token in groups of 32, newest 128 tokens fp16",
    "Liu et al. 2024, KIVI (ICML)",
    params=ONE_WIDTH, takes_budget=False, footprint="~2.5 bits/value (bits=2)", static=True,
    **_quantizing("kivi", dict(high_bits=2, low_bits=2, saliency="none", key_group_size=32, value_group_size=32,
                               channel_separable=False, residual_length=128, stream_interval=32)),
))
_register(MethodSpec(
    "uniform", "quantize", "one bit width for every token (ZipCache's channelwise keys, CS tokenwise values)", "",
    params=ONE_WIDTH, takes_budget=False, footprint="~2.3 bits/value (bits=2)", static=True,
    **_quantizing("uniform", dict(high_bits=2, low_bits=2, saliency="none")),
))
# Rotated recipes (issue 17): keys (post-RoPE) and values quantized as x R, R a seeded randomized
# Hadamard matrix per (layer, KV head); attention rotates q and un-rotates o around the packed
# kernel. On the embedded model's own K/V (experiments/rotation_attention_error.py) the rotation
# cuts the attention-output error of 2-bit channel-separable values by ~10% and leaves
# channelwise keys as good as or better than tokenwise ones, rotated or not.
_register(MethodSpec(
    "rotated", "quantize", "zipkv's recipe on Hadamard-rotated K/V: keys 4-bit channelwise, values 2-bit CS", "",
    params=UNSPLIT_SETTINGS, takes_budget=False, footprint="~3.3 bits/value", static=True,
    **_quantizing("rotated", dict(high_bits=4, low_bits=4, high_value_bits=2, low_value_bits=2, saliency="none",
                                  rotation="hadamard")),
))
_register(MethodSpec(
    "rotated_2bit", "quantize", "rotated K/V at 2 bits: keys channelwise in groups of 32, newest 32 tokens fp16",
    "", params=UNSPLIT_SETTINGS, takes_budget=False, footprint="~2.8 bits/value + 32 fp16 tokens", static=True,
    **_quantizing("rotated_2bit", dict(high_bits=2, low_bits=2, saliency="none", key_group_size=32,
                                       residual_length=32, stream_interval=32, rotation="hadamard")),
))


def _auto() -> dict:
    def build(config, **params):
        from .cache.auto_recipe import AutoCache

        return AutoCache(config, **params)

    def check(params: dict) -> None:
        from .cache.auto_recipe import check_auto_params

        check_auto_params(params)

    return dict(defaults={}, build=build, check=check)


_register(MethodSpec(
    "auto", "quantize", "per-layer key / value bits and rotation chosen from the prompt to meet ratio= (5) or bits=",
    "", params=("ratio", "bits", "window", "residual_length", "stream_interval", "key_group_size", "value_group_size",
                "channel_separable", "seed", "decode_path"), takes_budget=False,
    footprint="16 / ratio bits/value (ratio=5: 3.2)", static=True, **_auto(),
))

# what serving engines offer: fp8 (vLLM's --kv-cache-dtype fp8, per-token-head scales) and int4
_register(MethodSpec(
    "fp8", "baseline", "fp8 e4m3 codes, one fp32 scale per token and head (as vLLM stores it); exact prefill", "",
    params=(), takes_budget=False, footprint="8 bits + fp32 scale per token-head (8.25 bits/value at d 128)",
    static=True, **_baseline("fp8"),
))
_register(MethodSpec(
    "int4", "baseline", "int4 codes, a 16-bit scale and zero per token and head (asymmetric); exact prefill", "",
    params=(), takes_budget=False, footprint="4 bits + 16-bit scale and zero per token-head (4.25 at d 128)",
    static=True, **_baseline("int4"),
))

_KEPT = "ratio x 16 bits/value"
_register(MethodSpec(
    "streaming_llm", "evict", "4 attention sinks + the most recent tokens, after every forward",
    "Xiao et al. 2023, StreamingLLM (arXiv 2309.17453)",
    params=("num_sinks",) + EVICT_COMMON, takes_budget=True, footprint=_KEPT, static=True,
    **_evicting("streaming_llm", "continuous.build_continuous", dict(num_sinks=4), kind="streaming_llm"),
))
_register(MethodSpec(
    "h2o", "evict", "accumulated-attention heavy hitters + the budget//2 most recent, after every forward",
    "Zhang et al. 2023, H2O (arXiv 2306.14048)",
    params=("query_chunk",) + EVICT_COMMON, takes_budget=True, footprint=_KEPT, static=True,
    **_evicting("h2o", "continuous.build_continuous", dict(query_chunk=512), kind="h2o"),
))
_register(MethodSpec(
    "snapkv", "evict", "observation-window vote (pooled) picks the prompt tokens kept, + the window",
    "Li et al. 2024, SnapKV (arXiv 2404.14469)",
    params=SNAP + EVICT_COMMON, takes_budget=True, footprint=_KEPT, static=True,
    **_evicting("snapkv", "select.build_select", SNAP_DEFAULTS, rule="uniform", scorer="snapkv"),
))
_register(MethodSpec(
    "pyramidkv", "evict", "SnapKV scores, layer budgets decreasing linearly with depth (beta 20)",
    "Cai et al. 2024, PyramidKV (arXiv 2406.02069)",
    params=SNAP + ("beta",) + EVICT_COMMON, takes_budget=True, footprint=_KEPT, static=True,
    **_evicting("pyramidkv", "select.build_select", dict(SNAP_DEFAULTS, beta=20.0), rule="pyramid", scorer="snapkv"),
))
_register(MethodSpec(
    "adakv", "evict", "SnapKV scores, head-wise budgets (alpha 0.2), ragged storage",
    "Feng et al. 2024, Ada-KV (arXiv 2407.11550)",
    params=SNAP + ("alpha",) + EVICT_COMMON, takes_budget=True, footprint=_KEPT, static=True,
    **_evicting("adakv", "select.build_select", dict(SNAP_DEFAULTS, alpha=0.2), rule="adakv", scorer="snapkv"),
))
_register(MethodSpec(
    "cake", "evict", "mean + variance of window attention; layer budgets by preference, cascading",
    "Qin et al. 2025, CAKE (arXiv 2503.12491)",
    params=("window", "kernel_size", "gamma", "tau1", "tau2") + EVICT_COMMON, takes_budget=True,
    footprint=_KEPT, static=True,
    **_evicting("cake", "cake.build_cake", dict(window=32, kernel_size=5, gamma=200.0, tau1=1.0, tau2=1.0),
                scorer="cake"),
))
_register(MethodSpec(
    "defensive_kv", "evict", "worst-case (max over window rows) attention scores, uniform budgets",
    "Feng et al. 2025, DefensiveKV (github FFY0/DefensiveKV)",
    params=("window", "kernel_size") + EVICT_COMMON, takes_budget=True, footprint=_KEPT, static=True,
    **_evicting("defensive_kv", "select.build_select", dict(window=32, kernel_size=5), rule="uniform",
                scorer="defensive_kv"),
))
_register(MethodSpec(
    "key_norm", "evict", "keeps the tokens whose keys have the smallest L2 norm; needs no queries",
    "Devoto et al. 2024 (arXiv 2406.11430)",
    params=EVICT_COMMON, takes_budget=True, footprint=_KEPT, static=True,
    **_evicting("key_norm", "select.build_select", {}, rule="uniform", scorer="key_norm"),
))

_TIERED = TIER_PARAMS + TIER_QUANT
# ZipVL's two layouts: v1 keeps every token (the rest low-bit), v2 evicts the rest
for _name, _summary, _budget, _footprint in (
    ("zipvl", "tau-important tokens (97% of probe attention) 4-bit, every other token 2-bit (v1)", False,
     "~2-4 bits/value"),
    ("zipvl_v2", "tau-important tokens 4-bit, the rest evicted (capped at budget / ratio)", True,
     "kept x ~4.5 bits/value"),
):
    _register(MethodSpec(
        _name, "tiered", _summary, "He et al. 2024, ZipVL (arXiv 2410.08584)",
        params=_TIERED + ("sparse_prefill",) + EVICT_COMMON, takes_budget=_budget, footprint=_footprint, static=True,
        **_evicting(_name, "tiered.build_zipvl", dict(tau=0.97, high_bits=4, low_bits=2),
                    layout="zipvl_v1" if _name == "zipvl" else "zipvl_v2"),
    ))
del _name, _summary, _budget, _footprint
_register(MethodSpec(
    "three_tier", "tiered", "top high_ratio high-bit, next low_ratio low-bit, rest evicted; or a byte budget", "",
    params=("scorer", "high_ratio", "low_ratio", "byte_ratio", "high_share") + SCORER_PARAMS + _TIERED
    + EVICT_COMMON, takes_budget=False, footprint="byte_ratio x 16 bits/value", static=True,
    **_evicting("three_tier", "tiered.build_three_tier",
                dict(scorer="snapkv", **SNAP_DEFAULTS, high_bits=4, low_bits=2)),
))
_register(MethodSpec(
    "mikv", "tiered", "top `ratio` of tokens fp16, every other token 2-bit (nothing evicted)",
    "Yang et al. 2024, MiKV (No Token Left Behind)",
    params=("scorer",) + SCORER_PARAMS + _TIERED + EVICT_COMMON, takes_budget=True,
    footprint="ratio x 16 + rest x ~2.5 bits/value", static=True,
    **_evicting("mikv", "tiered.build_mikv", dict(scorer="snapkv", **SNAP_DEFAULTS, high_bits=16, low_bits=2)),
))

_register(MethodSpec(
    "minicache", "merge", "adjacent layers from the middle on share their prompt KV (SLERP directions + norms)",
    "Liu et al. 2024, MiniCache (NeurIPS)",
    params=("start_layer", "t", "retain_ratio", "direction_bits"), takes_budget=False,
    footprint="merged pairs: ~1/2 of their prompt KV", static=False,
    **_merging(dict(start_layer=None, t=0.6, retain_ratio=0.05, direction_bits=16)),
))


def markdown_table() -> str:
    """The README's method table, one row per registered method."""
    rows = ["| method | family | what it does | footprint | fast path | paper |", "|---|---|---|---|---|---|"]
    for s in METHODS.values():
        rows.append(f"| `{s.name}` | {s.family} | {s.summary} | {s.footprint} | {'yes' if s.static else 'no'} "
                    f"| {s.paper or '-'} |")
    return "\n".join(rows)


__all__ = ["FAMILIES", "METHODS", "MethodError", "MethodSpec", "check_method", "coerce_value", "markdown_table",
           "names", "parse_method_spec"]
