"""What an evicting cache keeps: policies that turn a forward's queries into stores.

Each policy is shared by all layers of one cache (it sees them in order, which CAKE's
cascade needs) and calls the pure functions of `zipkv.eviction` (scorers, budgets, tier
assignment); it never re-implements a scoring or budget rule.

- `KeepPolicy`: keeps everything (the lossless reference; with record=True it also keeps
  each layer's prefill queries, so many caches can be built from one prefill).
- `SelectPolicy`: prefill-only eviction (SnapKV, PyramidKV, AdaKV, CAKE, DefensiveKV,
  key-norm): after a layer's first forward, keep the budget's best tokens in fp16; tokens
  that come later are appended, never evicted.
- `ContinuousPolicy`: StreamingLLM and H2O: after EVERY forward the layer is evicted back
  to its budget, so the budget holds at every decoding step.
- `TieredPolicy`: ZipVL v1 / v2, 3-tier, MiKV: tokens go to a high-bit store, a low-bit
  store or nowhere; while decoding, every `stream_interval` tokens form a block that is
  scored with the attention they received and split the same way. ZipVL can also make the
  prompt's attention sparse (sparse_prefill=True): the layer asks `sparse_prefill_plan`
  BEFORE attention, and the same selection then splits the tiers after it.

Budgets: `budget` (tokens per layer and sequence) or `ratio` (of each sequence's real
prompt tokens, so sequences of a left-padded batch keep different counts). Padding is
always dropped.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from ..eviction import (HIGH, LOW, CakeCascade, H2OScorer, StreamingLLMScorer, ZipCacheScorer,
                        adakv_head_budgets, assign_tiers, cake_preference, pyramid_budgets, rank_tokens,
                        select_tokens, zipvl_important_count)
from ..eviction.scorers.base import window_attention
from ..eviction.validation import check_budget, check_int, check_ratio
from .eviction_store import Fp16Store, make_store

NEG_INF = float("-inf")


@dataclass
class Policy:
    """Shared machinery: budgets per sequence and the list of layers (held weakly: the layers
    hold the policy, and a cycle would keep the cache alive past its last reference)."""

    budget: int | None = None
    ratio: float | None = None
    needs_queries = True
    tracks_recent = False
    sparse_prefill = False  # only ZipVL (TieredPolicy) has an important set to attend over
    layer_refs: list = field(default_factory=list, repr=False)  # weakref.ref of each bound layer, in order

    @property
    def protected(self) -> int:
        """Tokens the scorer always keeps: a budget must cover them."""
        return 0

    def check_budget_args(self, required: bool = True) -> None:
        if required and (self.budget is None) == (self.ratio is None):
            raise ValueError("give exactly one of budget (tokens per layer) or ratio (kept fraction in [0, 1])")
        if self.budget is not None and self.ratio is not None:
            raise ValueError("give budget or ratio, not both")
        if self.budget is not None:
            check_int("budget", self.budget, 0)
        if self.ratio is not None:
            self.ratio = check_ratio("ratio", self.ratio)

    def bind(self, layers: list) -> None:
        self.layer_refs = [weakref.ref(layer) for layer in layers]
        for position, layer in enumerate(layers):
            layer.eviction_position = position

    @property
    def layers(self) -> list:
        """The bound layers, in order (the cache that holds them is alive while they are used)."""
        return [ref() for ref in self.layer_refs]

    def row_budgets(self, real: torch.Tensor) -> torch.Tensor:
        """int64 [B]: tokens each sequence keeps per layer, for a prompt with padding flags
        real [B, T]. A token budget larger than the prompt is an error; a sequence shorter
        than the budget (left-padded batch) keeps all its tokens."""
        lengths = real.sum(dim=1).to(torch.int64)
        prompt = real.shape[1]
        window = min(self.protected, prompt)
        if self.budget is not None:
            check_budget(self.budget, prompt, window=window)
            return lengths.clamp(max=self.budget)
        budgets = torch.floor(self.ratio * lengths.to(torch.float64) + 0.5).to(torch.int64)
        short = budgets < lengths.clamp(max=self.protected)
        if bool(short.any()):
            row = int(short.nonzero()[0, 0])
            raise ValueError(
                f"ratio={self.ratio} keeps {int(budgets[row])} of a {int(lengths[row])}-token prompt, fewer than "
                f"the {self.protected} tokens the method always keeps; allowed ratio range "
                f"[{self.protected / max(int(lengths[row]), 1):.4f}, 1]"
            )
        return budgets

    def after_forward(self, layer, query, scaling: float, first: bool) -> None:
        raise NotImplementedError


@dataclass
class KeepPolicy(Policy):
    """No eviction. record=True keeps the first forward's queries on each layer."""

    record: bool = False
    needs_queries = False

    def after_forward(self, layer, query, scaling, first):
        if first and self.record:
            layer.recorded_query = query
            layer.recorded_scaling = scaling


@dataclass
class SelectPolicy(Policy):
    """Prefill-only eviction with fp16 kept tokens.

    rule: 'uniform' (same budget every layer), 'pyramid' (PyramidKV staircase), 'adakv'
    (head-wise budgets, ragged storage), 'cake' (CAKE layer preferences, cascading).
    """

    scorer: object = None
    rule: str = "uniform"
    window: int = 32
    beta: float = 20.0
    alpha: float = 0.2
    tau1: float = 1.0
    tau2: float = 1.0

    def __post_init__(self):
        self.check_budget_args()
        if self.rule not in ("uniform", "pyramid", "adakv", "cake"):
            raise ValueError(f"rule={self.rule!r} is not one of 'uniform', 'pyramid', 'adakv', 'cake'")
        self.needs_queries = bool(getattr(self.scorer, "needs_queries", True))
        self._cascades = None

    @property
    def protected(self) -> int:
        return self.window if getattr(self.scorer, "uses_window", False) else 0

    def after_forward(self, layer, query, scaling, first):
        if not first:
            return  # prefill-only methods: later tokens are appended
        keys, values, real = layer.recent_keys, layer.recent_values, layer.recent_real
        budgets = self.row_budgets(real)
        position = layer.eviction_position
        if self.rule == "cake":
            self._cake(layer, query, scaling, budgets)
            return
        scores = self.scorer.score(keys, query, real, scaling=scaling)
        if self.rule == "uniform":
            counts = budgets
        elif self.rule == "pyramid":
            counts = torch.tensor([
                pyramid_budgets(len(self.layers), int(c), int(n), window=self.protected, beta=self.beta)[position]
                for c, n in zip(budgets.tolist(), real.sum(1).tolist())
            ], dtype=torch.int64)
        else:  # adakv: per row, over its real tokens
            counts = torch.stack([
                adakv_head_budgets(scores[b : b + 1, :, real.shape[1] - n :], int(c), alpha=self.alpha)[0]
                for b, (c, n) in enumerate(zip(budgets.tolist(), real.sum(1).tolist()))
            ])
        keep = select_tokens(scores, counts.to(scores.device), drop_padding=True).to_mask()
        layer.replace_all([Fp16Store.select(keys, values, keep)])

    def _cake(self, layer, query, scaling, budgets):
        keys, values, real = layer.recent_keys, layer.recent_values, layer.recent_real
        position = layer.eviction_position
        att = window_attention(query[:, :, -min(self.window, keys.shape[2]):], keys, real, scaling=scaling)
        scores = self.scorer.score_attention(att)
        preference = cake_preference(att, window=self.window, tau1=self.tau1, tau2=self.tau2)
        lengths = real.sum(1).tolist()
        if position == 0:
            self._cascades = [CakeCascade(len(self.layers), int(c), int(n), window=self.window)
                              for c, n in zip(budgets.tolist(), lengths)]
        if self._cascades is None:
            raise RuntimeError("CAKE's cascade starts at the first layer; layers were fed out of order")
        allotted = torch.cat([c.add_layer(preference[b : b + 1]) for b, c in enumerate(self._cascades)])  # [B, l]
        keep = select_tokens(scores, allotted[:, position].to(scores.device), drop_padding=True).to_mask()
        layer.replace_all([Fp16Store.select(keys, values, keep, extras={"score": scores})])
        # cascading: the layers before this one shrink to their new (never larger) budgets now,
        # so the cache held after any layer stays within the total
        for earlier in self.layers[:position]:
            _shrink(earlier, allotted[:, earlier.eviction_position])
        if position == len(self.layers) - 1:
            for done in self.layers:
                for part in done.parts:
                    part.drop_extras()
            self._cascades = None


def _shrink(layer, counts: torch.Tensor) -> None:
    (store,) = layer.parts
    keys, values, valid = store.padded()
    scores = store.padded_extra("score", NEG_INF).masked_fill(~valid, NEG_INF)
    held = valid.sum(-1)
    if bool((held <= counts.to(held.device)[:, None]).all()):
        return
    keep = select_tokens(scores, torch.minimum(held, counts.to(held.device)[:, None]), drop_padding=True).to_mask()
    layer.parts = [Fp16Store.select(keys, values, keep, extras={"score": scores})]


@dataclass
class ContinuousPolicy(Policy):
    """StreamingLLM (kind='streaming_llm': sinks + recent) or H2O (kind='h2o': running
    attention totals + the budget//2 most recent tokens), re-applied after every forward."""

    kind: str = "h2o"
    num_sinks: int = 4
    query_chunk: int = 512

    def __post_init__(self):
        self.check_budget_args()
        if self.kind not in ("streaming_llm", "h2o"):
            raise ValueError(f"kind={self.kind!r} is not one of 'streaming_llm', 'h2o'")
        self.needs_queries = self.kind == "h2o"
        check_int("num_sinks", self.num_sinks, 0)
        self._h2o = H2OScorer(recent=0, query_chunk=self.query_chunk)
        self._streaming = StreamingLLMScorer(num_sinks=self.num_sinks)

    @property
    def protected(self) -> int:
        return self.num_sinks if self.kind == "streaming_llm" else 0

    def after_forward(self, layer, query, scaling, first):
        keys, values = layer.held_states
        valid = layer.held_valid()
        valid_row = valid[:, 0]  # the layout is the same for every head (uniform budgets)
        if first:
            layer.budget_rows = self.row_budgets(layer.recent_real)
        held = valid_row.sum(1)
        counts = torch.minimum(held, layer.budget_rows.to(held.device))
        extras = None
        if self.kind == "h2o":
            if first:
                totals = memoized(layer, ("h2o_prefill", self.query_chunk),
                                  lambda: self._prefill_totals(keys, query, valid_row, scaling))
            else:
                # the held layout is [store | this forward's tokens]: the store's running
                # totals are the `previous` of the slots before the new queries
                previous = layer.parts[0].padded_extra("totals") if layer.parts else None
                totals = self._h2o.accumulate(keys, query, valid_row, previous=previous, scaling=scaling)
            # H2O splits the budget evenly: the budget//2 most recent tokens are always kept
            after = valid_row.flip(-1).cumsum(-1).flip(-1) - 1  # real tokens after each slot
            recent = after < (layer.budget_rows.to(held.device) // 2)[:, None]
            scores = totals.masked_fill((recent & valid_row)[:, None, :], float("inf"))
            extras = {"totals": totals}
        else:
            scores = self._streaming.score(keys, None, valid_row)
        heads = keys.shape[1]
        keep = select_tokens(scores, counts[:, None].expand(-1, heads), drop_padding=True).to_mask()
        layer.replace_all([Fp16Store.select(keys, values, keep, extras)])

    def _prefill_totals(self, keys, query, real, scaling):
        """H2OScorer.accumulate over the whole prompt, one query chunk at a time against only
        the keys that chunk can see (causal): the same sums at half the work and memory."""
        t = keys.shape[2]
        totals = torch.zeros(keys.shape[0], keys.shape[1], t, dtype=torch.float32, device=keys.device)
        for start in range(0, t, self.query_chunk):
            stop = min(start + self.query_chunk, t)
            part = self._h2o.accumulate(keys[:, :, :stop], query[:, :, start:stop], real[:, :stop],
                                        query_positions=torch.arange(start, stop, device=keys.device),
                                        scaling=scaling)
            totals[..., :stop] += part.nan_to_num(neginf=0.0)
        return totals.masked_fill(~real[:, None, :], NEG_INF)


@dataclass
class ZipVLSelection:
    """One layer's ZipVL prefill selection, computed once from the probe queries.

    scores: float32 [B, Hkv, T] normalized probe score (which tokens, per KV head; -inf padding);
    high: int64 [B] important count (tau rule, capped at budget / ratio);
    important: bool [B, T] the row's important set T for sparse prefill (None when off)."""

    positions: torch.Tensor
    scores: torch.Tensor
    high: torch.Tensor
    important: torch.Tensor | None = None


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
        from ..eviction.validation import check_tau

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

    def after_forward(self, layer, query, scaling, first):
        if first:
            self._prefill(layer, query, scaling)
            return
        self._accumulate(layer, query, scaling)
        if layer.recent_keys.shape[2] >= self.stream_interval:
            self._block(layer)

    # -- prefill --------------------------------------------------------------------------------
    def zipvl_selection(self, layer, query, scaling, important: bool = False) -> ZipVLSelection:
        """The probe attention of the layer's prompt (recent + random probes against every
        key), its normalized scores and the tau-important count; with important=True also
        the row's important set T for sparse prefill."""
        keys, real = layer.recent_keys, layer.recent_real
        positions = probe_positions(real, self.probe_recent, self.probe_random, self.seed)
        att = window_attention(query[:, :, positions], keys, real, query_positions=positions, scaling=scaling)
        scores = ZipCacheScorer().score_attention(att)
        high = zipvl_important_count(att, self.tau).to(torch.int64)
        if self.budget is not None or self.ratio is not None:
            high = torch.minimum(high, self.row_budgets(real).to(high.device))
        selection = ZipVLSelection(positions, scores, high)
        if important:
            selection.important = important_set(scores, high, real, recent_probe_positions(real, self.probe_recent))
        return selection

    def sparse_prefill_plan(self, layer, query, scaling) -> torch.Tensor:
        """bool [B, T]: the query rows (and keys) the layer's prompt attention is computed
        for. Called before attention on the first forward; the selection is kept on the
        layer for the tier split after attention (never computed twice)."""
        selection = self.zipvl_selection(layer, query, scaling, important=True)
        layer.prefill_selection = selection
        return selection.important

    def _prefill(self, layer, query, scaling):
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
            high = zipvl_important_count(totals.sum(1) * real, self.tau).to(torch.int64)
            if self.ratio is not None:  # a token budget is the prompt's; a ratio applies to every block
                high = torch.minimum(high, torch.floor(self.ratio * lengths.to(torch.float64) + 0.5).to(torch.int64))
            low = lengths - high if self.layout == "zipvl_v1" else torch.zeros_like(high)
        else:
            high, low = self._ratio_counts(lengths)
        # stores are re-attached; recent is emptied by replace_all
        self._split(layer, keys, values, scores, high, low, initial=False)


def important_set(scores: torch.Tensor, high: torch.Tensor, real: torch.Tensor,
                  recent: torch.Tensor) -> torch.Tensor:
    """bool [B, T]: ZipVL's important set T of each row for sparse prefill: the high[b] best
    real tokens by the normalized score averaged over KV heads (scores [B, Hkv, T], padding
    -inf), plus the recent probe positions `recent` [R] and the last token; padding never."""
    row = scores.mean(dim=1)  # padding stays -inf (it is -inf in every head)
    ranks = rank_tokens(row)
    important = ranks < high.to(row.device)[:, None]
    important[:, recent.to(row.device)] = True
    important[:, -1] = True
    return important & real.to(row.device)


def memoized(layer, key, compute):
    """compute(), or its value from the recorded prefill the layer is being built from (see
    EvictionCache.prefill_from_states): pure, budget-independent work such as H2O's prefill
    totals is then done once per record, not once per cache built from it."""
    memo = getattr(layer, "memo", None)
    if memo is None:
        return compute()
    key = (key, layer.store_dtype)
    if key not in memo:
        memo[key] = compute()
    return memo[key]


def recent_probe_positions(real: torch.Tensor, recent: int) -> torch.Tensor:
    """int64 [R]: the recent probe positions, the last `recent` positions that are real in
    every row of real [B, T] (fewer when the shortest row is shorter)."""
    t = real.shape[1]
    first_real = int((~real).sum(1).max())
    return torch.arange(t - min(recent, t - first_real), t, device=real.device)


def probe_positions(real: torch.Tensor, recent: int, random: int, seed: int) -> torch.Tensor:
    """int64 [P]: probe query positions shared by every row: the `recent` last positions
    plus `random` seeded positions among the earlier ones that are real in every row."""
    t = real.shape[1]
    first_real = int((~real).sum(1).max())
    recent_pos = recent_probe_positions(real, recent).cpu()
    n_recent = len(recent_pos)
    pool = t - n_recent - first_real
    n_random = min(random, max(pool, 0))
    if n_random <= 0:
        return recent_pos.to(real.device)
    generator = torch.Generator().manual_seed(seed)
    random_pos = first_real + torch.randperm(pool, generator=generator)[:n_random]
    return torch.cat([random_pos.sort().values, recent_pos]).to(real.device)


def bytes_per_token(bits: int, head_dim: int, value_group_size: int | None, param_bytes: int = 2) -> float:
    """Approximate bytes one (token, KV head) costs at `bits` in a PackedTier: key and value
    codes plus the value's tokenwise scale and minimum (key and channel parameters are per
    group and amortized away for long blocks). 16 bits: fp16 keys and values."""
    if bits == 16:
        return 2 * head_dim * 2
    groups = 1 if value_group_size is None else head_dim // value_group_size
    return 2 * head_dim * bits / 8 + 2 * groups * param_bytes


__all__ = ["Policy", "KeepPolicy", "SelectPolicy", "ContinuousPolicy", "TieredPolicy", "ZipVLSelection",
           "important_set", "probe_positions", "bytes_per_token"]
