"""`EvictionCache`: a transformers `Cache` whose full-attention layers drop tokens for real.

One policy (zipkv/policies/) decides for every layer; the layers (eviction_layer) hold
what is kept in stores (eviction_store); attention runs through zipkv's attention
function, which hands each call to `EvictingLayer.attend`. Sliding-window layers of hybrid models keep their own window cache.

Prefill once, compress many times: `record_prefill` runs the model once with a lossless
recording cache and keeps, per layer, the keys, values and queries of the prompt (identical
for every method, since a prefill attends in full before anything is dropped);
`EvictionCache.prefill_from_states` then builds any method's cache from them through the
same code path as a live prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import ZipkvCache
from .cache import checked_layer_types, require_full_attention, sliding_layer
from ..transformers_support import cache_kwargs
from .eviction_layer import EvictingLayer, SparsePrefillRecord
from ..policies.keep import KeepPolicy
from .stats import CacheStats, held_tensors_of, tensor_bytes


@dataclass
class EvictionStats(CacheStats):
    """CacheStats plus what eviction needs: fp16_bytes is what an uncompressed fp16 cache
    would hold for the LOGICAL sequence (so ratio shows what eviction saved);
    tokens_per_layer counts the tokens held per (sequence, KV head), rounded;
    kept_token_heads_per_layer is exact; token_bytes_per_layer is the kept tokens' storage
    alone (keys and values, or codes and quantization parameters), without layout offsets and
    scoring bookkeeping; peak_bytes is the most the cache held at any point (after a layer's
    update, i.e. with that layer's new tokens not yet evicted); sparse_prefill: what a ZipVL
    sparse prefill kept and the attention FLOPs it did (see SparsePrefillReport), else None."""

    method: str = ""
    logical_tokens_per_layer: list[int] = field(default_factory=list)
    kept_token_heads_per_layer: list[int] = field(default_factory=list)
    token_bytes_per_layer: list[int] = field(default_factory=list)
    peak_bytes: int = 0
    sparse_prefill: dict | None = None  # SparsePrefillReport.to_dict() of a ZipVL sparse prefill

    def add_layer(self, layer) -> None:
        super().add_layer(layer)
        evicting = hasattr(layer, "kept_token_heads") and layer.is_initialized  # eager or static
        heads = layer.batch_size * layer.num_heads if evicting else 0
        self.logical_tokens_per_layer.append(layer.logical_length * heads if evicting else 0)
        self.kept_token_heads_per_layer.append(layer.kept_token_heads() if evicting else 0)
        self.token_bytes_per_layer.append(layer.token_bytes() if evicting else 0)

    @property
    def kept_fraction(self) -> float:
        """Held (token, head) pairs / logical ones, over the evicting layers."""
        logical = sum(self.logical_tokens_per_layer)
        return sum(self.kept_token_heads_per_layer) / logical if logical else 1.0


@dataclass
class SparsePrefillReport:
    """ZipVL sparse prefill, per layer and in total: the kept (important) fraction of the
    prompt's real tokens and the attention FLOPs done vs dense causal attention over the
    same real tokens (SparsePrefillRecord says how they are counted). flop_saving leaves
    the probe attention out (ZipVL computes it for the cache with or without sparse
    prefill); flop_saving_with_probes counts it against the sparse side."""

    layers: list[SparsePrefillRecord]

    @property
    def kept_fraction_per_layer(self) -> list[float]:
        return [r.kept_fraction for r in self.layers]

    @property
    def kept_fraction(self) -> float:
        """Kept tokens / real tokens, over every layer and row."""
        real = sum(sum(r.real) for r in self.layers)
        return sum(sum(r.kept) for r in self.layers) / real if real else 1.0

    @property
    def dense_flops(self) -> int:
        return sum(r.dense_flops for r in self.layers)

    @property
    def sparse_flops(self) -> int:
        return sum(r.sparse_flops for r in self.layers)

    @property
    def probe_flops(self) -> int:
        return sum(r.probe_flops for r in self.layers)

    @property
    def flop_saving(self) -> float:
        return 1.0 - self.sparse_flops / self.dense_flops if self.dense_flops else 0.0

    @property
    def flop_saving_with_probes(self) -> float:
        return 1.0 - (self.sparse_flops + self.probe_flops) / self.dense_flops if self.dense_flops else 0.0

    def to_dict(self) -> dict:
        return dict(kept_fraction=self.kept_fraction, kept_fraction_per_layer=self.kept_fraction_per_layer,
                    dense_flops=self.dense_flops, sparse_flops=self.sparse_flops, probe_flops=self.probe_flops,
                    flop_saving=self.flop_saving, flop_saving_with_probes=self.flop_saving_with_probes,
                    layers=[r.to_dict() for r in self.layers])

    def __str__(self) -> str:
        return (f"sparse prefill over {len(self.layers)} layers: kept {100 * self.kept_fraction:.1f}% of the prompt "
                f"tokens, attention FLOPs {0.0 - 100 * self.flop_saving:+.1f}% vs dense causal "
                f"({0.0 - 100 * self.flop_saving_with_probes:+.1f}% counting the probe attention)")


@dataclass
class LayerRecord:
    keys: torch.Tensor  # [B, Hkv, T, D] after RoPE, model dtype
    values: torch.Tensor
    query: torch.Tensor  # [B, Hq, T, D] after RoPE
    real: torch.Tensor  # bool [B, T] padding flags
    scaling: float
    # budget-independent results computed from this record (e.g. H2O's prefill totals),
    # shared by every cache built from it
    memo: dict = field(default_factory=dict, repr=False)


class EvictionCache(ZipkvCache):
    """KV cache that evicts tokens (and optionally quantizes the kept ones) by a policy.

    Build it with `zipkv.eviction_cache.make_eviction_cache(method, model.config, ...)`.
    to_static() (ZipkvCache) moves the evicting layers to StaticEvictingLayer and the window
    layers, kept exact, to StaticWindowLayer; methods without a static form raise a
    ValueError naming them.
    """

    def __init__(self, config, policy, *, method: str = "custom", keep_model_dtype: bool = False):
        text_config, types = checked_layer_types(config)
        require_full_attention(text_config, types, method)
        layers = [EvictingLayer(policy, i, keep_model_dtype) if kind == "full_attention"
                  else sliding_layer(text_config, kind) for i, kind in enumerate(types)]
        self.method = method
        self.policy = policy
        self.peak_bytes = 0
        why = "needs the attention weights (queries) to score tokens" if policy.needs_queries else "builds per-layer masks"
        super().__init__(config, layers, needs_attention=f"method {method!r} {why}, so it needs")
        policy.bind(self.evicting_layers())

    def evicting_layers(self) -> list[EvictingLayer]:
        return [layer for layer in self.layers if isinstance(layer, EvictingLayer)]

    def bytes_held(self) -> int:
        return sum(tensor_bytes(held_tensors_of(layer)) for layer in self.layers)

    def note_bytes(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.bytes_held())

    def reset(self) -> None:
        super().reset()
        self.peak_bytes = 0  # a reset cache reports like a fresh one

    def to_static(self, extra_tokens: int, prompt_padding=None) -> None:
        super().to_static(extra_tokens, prompt_padding)
        self.note_bytes()

    def sparse_prefill_report(self) -> SparsePrefillReport | None:
        """What ZipVL's sparse prefill kept and saved per layer (None if this cache did not
        prefill sparsely), e.g. print(cache.sparse_prefill_report())."""
        records = [layer.sparse_prefill_record for layer in self.evicting_layers()
                   if layer.sparse_prefill_record is not None]
        return SparsePrefillReport(records) if records else None

    def empty_stats(self) -> EvictionStats:
        report = self.sparse_prefill_report()
        return EvictionStats(method=self.method, peak_bytes=self.peak_bytes,
                             sparse_prefill=report.to_dict() if report is not None else None)

    # -- prefill once, compress many times -----------------------------------------------------
    def record(self) -> list[LayerRecord]:
        """The prefill states a recording cache kept (see record_prefill)."""
        records = []
        for layer in self.evicting_layers():
            query = getattr(layer, "recorded_query", None)
            if query is None:
                raise ValueError("this cache did not record a prefill (build it with record_prefill)")
            records.append(layer.recorded)
        return records

    def prefill_from_states(self, records: list[LayerRecord]) -> "EvictionCache":
        """Compress a recorded prefill into this (fresh) cache, layer by layer in order."""
        evicting = self.evicting_layers()
        if len(records) != len(evicting):
            raise ValueError(f"records hold {len(records)} layers, this cache has {len(evicting)} evicting layers")
        if any(layer.is_initialized for layer in self.layers):
            raise ValueError("prefill_from_states needs a fresh cache")
        for layer, rec in zip(evicting, records):
            layer.memo = rec.memo
            try:
                layer.ingest(rec.keys, rec.values, rec.query, rec.real, rec.scaling)
            finally:
                layer.memo = None
        return self


class RecordingPolicy(KeepPolicy):
    """Keeps everything and, at the first forward, the states every method is built from."""

    def after_forward(self, layer, query, scaling, first):
        if first:
            layer.recorded_query = query
            layer.recorded = LayerRecord(layer.recent_keys, layer.recent_values, query,
                                         layer.recent_real.clone(), scaling)


def record_prefill(model, input_ids, attention_mask=None):
    """Run the prompt once; returns (records, logits, cache). The cache is a lossless
    ('full') cache of the prompt, ready to decode the uncompressed baseline."""
    cache = EvictionCache(model.config, RecordingPolicy(), method="full", keep_model_dtype=True)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **cache_kwargs(cache))
    return cache.record(), out.logits, cache
