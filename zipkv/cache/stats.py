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


def layer_stats(layers) -> CacheStats:
    """CacheStats of a list of cache layers: zipkv layers report their `held_tensors()`
    (a tensor shared by several layers is listed by one of them only); transformers' own
    layers (sliding windows) hold their keys and values."""
    stats = CacheStats()
    for layer in layers:
        shape = layer.keys.shape if layer.is_initialized and getattr(layer.keys, "dim", lambda: 0)() == 4 else None
        held = tensor_bytes(held_tensors_of(layer))
        if hasattr(layer, "held_tensors"):
            tokens = layer.get_seq_length()
        else:
            tokens = shape[2] if shape else 0
        stats.tokens_per_layer.append(tokens)
        stats.bytes_per_layer.append(held)
        stats.fp16_bytes_per_layer.append(fp16_equivalent(tokens, shape[0], shape[1], shape[3]) if shape else 0)
    return stats
