"""`CacheStats`: what a cache really holds, counted from the tensors themselves."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class CacheStats:
    """bytes_held: every tensor the cache keeps (packed codes, scales, minimums, channel
    factors, group indices, fp16 parts, saliency bookkeeping). fp16_bytes: what an fp16
    DynamicCache would hold for the same tokens. ratio = fp16_bytes / bytes_held."""

    tokens_per_layer: list[int] = field(default_factory=list)
    bytes_per_layer: list[int] = field(default_factory=list)
    fp16_bytes_per_layer: list[int] = field(default_factory=list)
    masked_only: bool = False

    @property
    def bytes_held(self) -> int:
        return sum(self.bytes_per_layer)

    @property
    def fp16_bytes(self) -> int:
        return sum(self.fp16_bytes_per_layer)

    @property
    def ratio(self) -> float:
        if self.masked_only:
            return 1.0
        return self.fp16_bytes / self.bytes_held if self.bytes_held else 1.0

    def add_layer(self, layer) -> None:
        """Append one layer's figures (layer_report); a subclass adds its own fields here."""
        report = layer_report(layer)
        self.tokens_per_layer.append(report.tokens)
        self.bytes_per_layer.append(report.bytes_held)
        self.fp16_bytes_per_layer.append(report.fp16_bytes)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(bytes_held=self.bytes_held, fp16_bytes=self.fp16_bytes, ratio=self.ratio)
        return out


def fp16_equivalent(tokens: int, batch: int, heads: int, head_dim: int) -> int:
    """Bytes of keys + values for `tokens` tokens in fp16."""
    return 2 * tokens * batch * heads * head_dim * torch.finfo(torch.float16).bits // 8


def held_tensors_of(layer) -> list[torch.Tensor]:
    """Every tensor a cache layer keeps: a zipkv layer lists them (`held_tensors()`); a
    transformers layer (a sliding window kept as it is) holds its tensor attributes (keys,
    values and its counters)."""
    if hasattr(layer, "held_tensors"):
        return layer.held_tensors()
    if not layer.is_initialized:
        return []
    return [value for value in vars(layer).values() if isinstance(value, torch.Tensor)]


@dataclass(frozen=True)
class LayerReport:
    """One layer's figures in CacheStats: tokens held per (sequence, KV head), bytes of every
    tensor held, and what an fp16 DynamicCache layer would hold (for an evicting layer: the
    LOGICAL sequence, so the ratio shows what eviction saved; otherwise the held tokens)."""

    tokens: int
    bytes_held: int
    fp16_bytes: int


def held_shape(layer):
    """[B, H, T, D] of the layer's fp16 keys once it holds states, else None; a layer whose
    keys are not held as such (per token-head codes) says it (`state_shape()`)."""
    if hasattr(layer, "state_shape"):
        return layer.state_shape() if layer.is_initialized else None
    keys = getattr(layer, "keys", None) if layer.is_initialized else None
    return keys.shape if keys is not None and keys.dim() == 4 else None


def held_tokens_of(layer) -> int:
    """Tokens a non-evicting layer holds per (sequence, KV head): a compressed window layer
    says (held_tokens: its get_seq_length() is the logical length); any other zipkv layer
    holds every token it was given; an exact window layer (transformers' own, or its static
    ring) holds its key buffer."""
    if hasattr(layer, "held_tokens"):
        return layer.held_tokens()
    if hasattr(layer, "held_tensors") and not layer.is_sliding:
        return layer.get_seq_length()
    shape = held_shape(layer)
    return shape[2] if shape else 0


def layer_report(layer) -> LayerReport:
    """The one place a cache layer's stats figures are computed (every zipkv cache's stats())."""
    held = tensor_bytes(held_tensors_of(layer))
    if hasattr(layer, "kept_token_heads"):  # an evicting layer (eager or static)
        if not layer.is_initialized:
            return LayerReport(0, held, 0)
        b, h = layer.batch_size, layer.num_heads
        fp16 = fp16_equivalent(layer.logical_length, b, h, layer.head_dim)
        return LayerReport(round(layer.kept_token_heads() / (b * h)), held, fp16)
    tokens, shape = held_tokens_of(layer), held_shape(layer)
    return LayerReport(tokens, held, fp16_equivalent(tokens, shape[0], shape[1], shape[3]) if shape else 0)
