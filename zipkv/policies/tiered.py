"""TieredPolicy: ZipVL v1 / v2, 3-tier, MiKV: each token goes to a high-bit store, a low-bit
store or nowhere, at prefill and then block by block while decoding.

While decoding, every `stream_interval` tokens form a block that is scored with the
attention they received and split the same way. ZipVL can also make the prompt's attention
sparse (sparse_prefill=True): the layer asks `sparse_prefill_plan` BEFORE attention, and the
same selection then splits the tiers after it. The builders of the four registry methods are
at the end (`build_zipvl`, `build_mikv`, `build_three_tier`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache.cache import head_dim
from ..cache.config import CompressionConfig
from ..cache.eviction_store import Fp16Store, make_store
from ..eviction import HIGH, LOW, ZipCacheScorer, assign_tiers, window_attention, zipvl_important_count
from ..eviction.validation import check_int, check_ratio, check_tau
from ..registry import TIER_PARAMS, TIER_QUANT
from ..parallel.reduce import gather_heads, sum_over_heads
from ..parallel.shard import head_shard_of
from .base import NEG_INF, Policy, scorer_of
from .zipvl_probes import ZipVLSelection, important_set, probe_positions, recent_probe_positions


@dataclass
class TieredPolicy(Policy):
    """High-bit / low-bit / evicted per token.

    rule 'zipvl': the important count of each sequence is the smallest set carrying tau of
    the probe queries' attention mass (64 recent + 64 random probes, the paper's setting),
    which tokens: the normalized probe score; capped at budget / ratio when given.
    rule 'ratios': high_ratio and low_ratio of each sequence's tokens, by `scorer`'s scores.
    layout: 'zipvl_v1' (every token not high is low-bit), 'zipvl_v2' (the rest evicted),
    'three_tier' (high, then low, the rest evicted).
    While decoding, each block of stream_interval tokens is split by the same rule, scored
    with the normalized attention the block received from the queries since it arrived.

    sparse_prefill (rule 'zipvl' only): the prompt's attention is computed for the query rows
    of the important set T only, over the keys of T (ZipVL's O = Attn(Q[T], K[T], V[T])).
    T of a row = its `high` best tokens by the normalized score averaged over KV heads, plus
    the recent probe positions and the last token (always real: the one that predicts the
    next token); never padding. The selection is computed once, before attention
    (`sparse_prefill_plan`), and reused by the tier split after it.
    """

    rule: str = "zipvl"
    layout: str = "zipvl_v1"
    tau: float = 0.97
    high_ratio: float = 0.1
    low_ratio: float = 0.0
    scorer: object = None
    settings: object = None  # quantization settings (bits, groups) for PackedStore
    probe_recent: int = 64
    probe_random: int = 64
    seed: int = 0
    stream_interval: int = 100
    sparse_prefill: bool = False
    tracks_recent = True

    def __post_init__(self):
        self.check_budget_args(required=False)
        if self.rule not in ("zipvl", "ratios"):
            raise ValueError(f"rule={self.rule!r} is not one of 'zipvl', 'ratios'")
        if self.layout not in ("zipvl_v1", "zipvl_v2", "three_tier"):
            raise ValueError(f"layout={self.layout!r} is not one of 'zipvl_v1', 'zipvl_v2', 'three_tier'")
        self.tau = check_tau(self.tau)
        self.high_ratio = check_ratio("high_ratio", self.high_ratio)
        self.low_ratio = check_ratio("low_ratio", self.low_ratio)
        if self.high_ratio + self.low_ratio > 1.0 + 1e-9:
            raise ValueError(f"high_ratio + low_ratio = {self.high_ratio + self.low_ratio} must be in [0, 1]")
        check_int("probe_recent", self.probe_recent, 0)
        check_int("probe_random", self.probe_random, 0)
        if self.rule == "zipvl" and self.probe_recent + self.probe_random == 0:
            raise ValueError("probe_recent + probe_random must be >= 1 for rule 'zipvl'")
        check_int("stream_interval", self.stream_interval, 1)
        if self.rule == "ratios" and self.scorer is None:
            raise ValueError("rule 'ratios' needs a scorer")
        self.needs_queries = self.rule == "zipvl" or bool(getattr(self.scorer, "needs_queries", True))
        if not isinstance(self.sparse_prefill, bool):
            raise ValueError(f"sparse_prefill must be True or False (got {self.sparse_prefill!r})")
        if self.sparse_prefill and self.rule != "zipvl":
            raise ValueError(f"sparse_prefill needs ZipVL's important set (rule 'zipvl'); rule {self.rule!r} has none")

    @property
    def protected(self) -> int:
        return 0

    def on_decode(self, layer, query, scaling):
        self._accumulate(layer, query, scaling)
        if layer.recent_keys.shape[2] >= self.stream_interval:
            self._block(layer)

    # -- prefill --------------------------------------------------------------------------------
    def zipvl_selection(self, layer, query, scaling, important: bool = False) -> ZipVLSelection:
        """The probe attention of the layer's prompt (recent + random probes against every
        key), its normalized scores and the tau-important count; with important=True also
        the row's important set T for sparse prefill."""
        keys, real = layer.recent_keys, layer.recent_real
        positions = probe_positions(real, self.probe_recent, self.probe_random, self.seed,
                                    unpadded=layer.recent_unpadded)
        att = window_attention(query[:, :, positions.to(query.device)], keys, real, query_positions=positions,
                               scaling=scaling)
        scores = ZipCacheScorer().score_attention(att)
        shard = head_shard_of(layer)  # tensor parallel: the mass of every rank's query heads
        # the mass is a softmax's sums: >= 0, and NaN only from NaN states, which the tier
        # split's own check refuses (NaN scores) in the same device read as its other checks
        high = zipvl_important_count(sum_over_heads(shard, att.probs.sum(dim=(1, 2, 3))), self.tau,
                                     checked=True).to(torch.int64)
        if self.budget is not None or self.ratio is not None:
            high = torch.minimum(high, self.row_budgets(real, unpadded=layer.recent_unpadded).to(high.device))
        selection = ZipVLSelection(positions, scores, high)
        if important:
            recent = recent_probe_positions(real, self.probe_recent, unpadded=layer.recent_unpadded)
            selection.important = important_set(gather_heads(shard, scores), high, real, recent)
        return selection

    def sparse_prefill_plan(self, layer, query, scaling) -> torch.Tensor:
        """bool [B, T]: the query rows (and keys) the layer's prompt attention is computed
        for. Called before attention on the first forward; the selection is kept on the
        layer for the tier split after attention (never computed twice)."""
        selection = self.zipvl_selection(layer, query, scaling, important=True)
        layer.prefill_selection = selection
        return selection.important

    def on_prefill(self, layer, query, scaling):
        keys, real = layer.recent_keys, layer.recent_real
        lengths = real.sum(1).to(torch.int64)
        if self.rule == "zipvl":
            selection = layer.prefill_selection
            layer.prefill_selection = None
            if selection is None:
                selection = self.zipvl_selection(layer, query, scaling)
            scores, high = selection.scores, selection.high
            low = lengths - high if self.layout == "zipvl_v1" else torch.zeros_like(high)
        else:
            scores = self.scorer.score(keys, query, real, scaling=scaling)
            high, low = self._ratio_counts(lengths)
        self._split(layer, keys, layer.recent_values, scores, high, low, initial=True)

    def _ratio_counts(self, lengths: torch.Tensor):
        high = torch.floor(self.high_ratio * lengths.to(torch.float64) + 0.5).to(torch.int64)
        if self.layout == "zipvl_v1":
            return high, lengths - high
        if self.layout == "zipvl_v2":
            return high, torch.zeros_like(high)
        low = torch.floor(self.low_ratio * lengths.to(torch.float64) + 0.5).to(torch.int64)
        return high, torch.minimum(low, lengths - high)

    def _split(self, layer, keys, values, scores, high, low, initial):
        t = scores.shape[-1]
        heads = scores.shape[1]
        device = scores.device
        # pad high/low so the per-row counts fit the padded width (padding is dropped anyway)
        low = torch.minimum(low.to(device), t - high.to(device))
        assignment = assign_tiers(scores, high.to(device)[:, None].expand(-1, heads),
                                  low[:, None].expand(-1, heads), drop_padding=True)
        tier_map = assignment.tier_map
        if initial:
            b = keys.shape[0]
            self_low = make_store(self.settings.low_bits, self.settings, b, heads) if self.layout != "zipvl_v2" else None
            self_high = make_store(self.settings.high_bits, self.settings, b, heads)
            layer.tier_stores = {"low": self_low, "high": self_high}
        stores = layer.tier_stores
        for name, code in (("low", LOW), ("high", HIGH)):
            keep = tier_map == code
            if name == "low" and self.layout == "zipvl_v2":
                continue
            store = stores[name]
            if store is None:  # 16 bits: an Fp16Store, built on first use
                stores[name] = Fp16Store.select(keys, values, keep)
            else:
                store.append(keys, values, keep)
        layer.replace_all([stores[n] for n in ("low", "high") if stores.get(n) is not None])

    # -- decoding -------------------------------------------------------------------------------
    def _accumulate(self, layer, query, scaling):
        """Add this forward's attention on the recent tokens (normalized score bookkeeping)."""
        keys, _ = layer.held_states
        mask = layer.forward_mask  # [B, 1 or H, q, K]
        r = layer.recent_keys.shape[2]
        b, hq, q, d = query.shape
        hkv = keys.shape[1]
        groups = hq // hkv
        logits = torch.einsum("bhgqd,bhkd->bhgqk", query.float().reshape(b, hkv, groups, q, d), keys.float()) * scaling
        allowed = mask[:, :, None] if mask.shape[1] > 1 else mask[:, :, None].expand(-1, hkv, -1, -1, -1)
        logits = logits.masked_fill(~allowed, NEG_INF)
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        layer.recent_score_sum += probs[..., -r:].sum(dim=3).mean(dim=2)
        layer.recent_score_count += allowed[:, :1, 0, :, -r:].sum(dim=2, dtype=torch.float32)

    def split_block(self, layer) -> None:
        """The decode block split alone (what after_forward runs once stream_interval tokens
        wait in layer.recent_*): a static form's flush runs it over its window buffers."""
        self._block(layer)

    def _block(self, layer):
        keys, values, real = layer.recent_keys, layer.recent_values, layer.recent_real
        lengths = real.sum(1).to(torch.int64)
        totals, counts = layer.recent_score_sum, layer.recent_score_count
        scores = (totals / counts.clamp_min(1.0)).masked_fill(~real[:, None, :], NEG_INF)
        if self.rule == "zipvl":
            high = zipvl_important_count(sum_over_heads(head_shard_of(layer), totals.sum(1)) * real, self.tau).to(torch.int64)
            if self.ratio is not None:  # a token budget is the prompt's; a ratio applies to every block
                high = torch.minimum(high, torch.floor(self.ratio * lengths.to(torch.float64) + 0.5).to(torch.int64))
            low = lengths - high if self.layout == "zipvl_v1" else torch.zeros_like(high)
        else:
            high, low = self._ratio_counts(lengths)
        # stores are re-attached; recent is emptied by replace_all
        self._split(layer, keys, values, scores, high, low, initial=False)


# ---- builders: the registry's tiered methods (config is None when only validating) ---------

def build_zipvl(config, *, layout: str, budget=None, ratio=None, sparse_prefill: bool = False,
                **p) -> TieredPolicy:
    return TieredPolicy(budget=budget, ratio=ratio, rule="zipvl", layout=layout, settings=quant_settings(p),
                        sparse_prefill=sparse_prefill, **tier_settings(p))


def build_mikv(config, *, scorer: str, budget=None, ratio=None, **p) -> TieredPolicy:
    if budget is not None:
        raise ValueError(f"mikv takes ratio (the fraction kept in high precision), not budget (got budget={budget!r})")
    if ratio is None:
        raise ValueError("mikv needs ratio, the fraction of tokens kept in high precision, in (0, 1] (e.g. mikv:ratio=0.2)")
    return TieredPolicy(rule="ratios", layout="zipvl_v1", high_ratio=ratio, scorer=scorer_of(scorer, p),
                        settings=quant_settings(p), **tier_settings(p))


def build_three_tier(config, *, scorer: str, **p) -> TieredPolicy:
    """Explicit high_ratio / low_ratio, or a byte budget split between the tiers."""
    quant = quant_settings(p)
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
                        scorer=scorer_of(scorer, p), settings=quant, **tier_settings(p))


def quant_settings(p: dict) -> CompressionConfig:
    """The tiers' quantization settings among a method's settings p."""
    return CompressionConfig(**{k: p[k] for k in TIER_QUANT if k in p}, saliency="none")


def tier_settings(p: dict) -> dict:
    """TieredPolicy's own settings among a method's settings p (tau, probes, stream_interval)."""
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


def bytes_per_token(bits: int, head_dim: int, value_group_size: int | None, param_bytes: int = 2) -> float:
    """Approximate bytes one (token, KV head) costs at `bits` in a PackedTier: key and value
    codes plus the value's tokenwise scale and minimum (key and channel parameters are per
    group and amortized away for long blocks). 16 bits: fp16 keys and values."""
    if bits == 16:
        return 2 * head_dim * 2
    groups = 1 if value_group_size is None else head_dim // value_group_size
    return 2 * head_dim * bits / 8 + 2 * groups * param_bytes


__all__ = ["TieredPolicy", "ZipVLSelection", "build_mikv", "build_three_tier", "build_zipvl", "byte_budget_split",
           "bytes_per_token", "important_set", "probe_positions", "quant_settings", "recent_probe_positions",
           "tier_settings"]
