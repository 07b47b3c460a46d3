"""`ModalityStats`: tokens and bytes a cache holds for text, visual and padding tokens.

Counted from the tensors themselves, and summing exactly to `CacheStats.bytes_held`:
- the fp16 part: every held tensor there is indexed by (row, token), so each token's share
  is exact;
- a quantized tier: its bytes (codes, scales, group bookkeeping) are split in proportion to
  the (head, token) entries of each kind it holds. Codes and per-token parameters are exactly
  per entry; per-group parameters are shared by the tokens of a group, so this is their
  natural attribution. A pure visual tier is all visual; text tiers hold padding and, when
  rows have different numbers of visual tokens, the surplus visual ones.
- layers zipkv does not compress (sliding-window layers) count as "other".
Token counts are summed over batch rows (a row of T positions with p padding contributes
T - p text + visual tokens and p padding tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..cache.stats import held_tensors_of, tensor_bytes
from .layer import KINDS, TIER_NAMES, VisualZipCacheLayer

ALL_KINDS = KINDS + ("other",)


def _apportion(total: int, weights: list[int]) -> list[int]:
    """Split an integer total in proportion to weights, exactly (largest remainders)."""
    whole = sum(weights)
    if whole == 0:
        return [0] * len(weights)
    shares = [total * w // whole for w in weights]
    remainders = sorted(range(len(weights)), key=lambda i: (total * weights[i]) % whole, reverse=True)
    for i in remainders[: total - sum(shares)]:
        shares[i] += 1
    return shares


@dataclass
class ModalityStats:
    """Per layer, per kind ("text", "visual", "padding", "other"): tokens (summed over rows)
    and bytes held; high_fraction: per layer, the share of each modality's quantized tokens in
    its high tier (ZipVL's kept-as-important fraction; None before anything is quantized)."""

    tokens: dict[str, list[int]] = field(default_factory=lambda: {k: [] for k in ALL_KINDS})
    bytes: dict[str, list[int]] = field(default_factory=lambda: {k: [] for k in ALL_KINDS})
    high_fraction: dict[str, list[float | None]] = field(default_factory=lambda: {"text": [], "visual": []})

    def total_tokens(self, kind: str) -> int:
        return sum(self.tokens[kind])

    def total_bytes(self, kind: str) -> int:
        return sum(self.bytes[kind])

    @property
    def bytes_held(self) -> int:
        return sum(self.total_bytes(k) for k in ALL_KINDS)

    def bits_per_value(self, kind: str, head_dim: int, kv_heads: int) -> float:
        """Average bits per stored key or value element of this kind (all overheads included)."""
        tokens = self.total_tokens(kind)
        return 8 * self.total_bytes(kind) / (2 * tokens * head_dim * kv_heads) if tokens else 0.0

    def to_dict(self) -> dict:
        return dict(
            tokens=self.tokens,
            bytes=self.bytes,
            high_fraction=self.high_fraction,
            totals={k: dict(tokens=self.total_tokens(k), bytes=self.total_bytes(k)) for k in ALL_KINDS},
        )


def modality_stats(cache) -> ModalityStats:
    stats = ModalityStats()
    for layer in cache.layers:
        tokens, held = dict.fromkeys(ALL_KINDS, 0), dict.fromkeys(ALL_KINDS, 0)
        fractions = {"text": None, "visual": None}
        if not isinstance(layer, VisualZipCacheLayer):
            held["other"] = tensor_bytes(held_tensors_of(layer)) if layer.is_initialized else 0
            tokens["other"] = layer.keys.shape[0] * layer.keys.shape[2] if held["other"] else 0
        elif layer.is_initialized:
            heads = layer.keys.shape[1]
            for name in TIER_NAMES:
                tier = getattr(layer, name)
                entries = [sum(row[i] for row in layer.entry_counts[name]) for i in range(len(KINDS))]
                for kind, share, count in zip(KINDS, _apportion(tier.nbytes(), entries), entries):
                    held[kind] += share
                    tokens[kind] += count // heads
            per_row = layer.fp16_part_kinds()
            counts = [sum(row[i] for row in per_row) for i in range(len(KINDS))]
            for kind, count in zip(KINDS, counts):
                tokens[kind] += count
            for tensor in layer.fp16_part_tensors():
                for kind, share in zip(KINDS, _apportion(tensor_bytes([tensor]), counts)):
                    held[kind] += share
            for modality, (low, high) in (("text", ("low", "high")), ("visual", ("vis_low", "vis_high"))):
                n_low, n_high = getattr(layer, low).num_tokens, getattr(layer, high).num_tokens
                fractions[modality] = n_high / (n_low + n_high) if n_low + n_high else None
        for kind in ALL_KINDS:
            stats.tokens[kind].append(tokens[kind])
            stats.bytes[kind].append(held[kind])
        for modality in fractions:
            stats.high_fraction[modality].append(fractions[modality])
    return stats
