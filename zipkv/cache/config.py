"""Settings of a compressed cache, validated once, with errors that name the parameter."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..quant.quantizer import SUPPORTED_BITS
from ..quant.rotation import check_rotation

LOSSLESS_BITS = 16


@dataclass(frozen=True)
class CompressionConfig:
    """How one cache quantizes.

    high_bits / low_bits: bit widths of salient and other tokens, in {2, 4, 8}, or 16 for
        "keep in fp16" (16/16 is lossless and equals DynamicCache).
    salient_ratio: fraction of a block's real tokens stored at high_bits, in [0, 1].
    high_value_bits / low_value_bits: bits of the values of each tier when they differ
        from the keys' (None: the same as high_bits / low_bits).
    saliency: "probe" (ZipCache normalized score from probe queries), "accumulated" (H2O
        style sum, biased to early tokens; for comparison), or "none" (all tokens low_bits).
    probe_recent / probe_random: fractions of the prompt used as probe queries.
    key_group_size: tokens per key quantization group (None: the whole block's tier).
    value_group_size: channels per value quantization group (None: the whole head).
    channel_separable: divide value channels by sqrt(max |v|) before tokenwise quantization.
    sink_tokens: first real tokens of the prompt kept in fp16 (attention sinks; their
        outlier keys would otherwise widen every channel's range).
    residual_length: newest tokens always kept in fp16.
    stream_interval: while decoding, tokens quantized together once the fp16 part exceeds
        residual_length by this much.
    seed: seed of the random probe positions.
    decode_path: how decoding attends over the quantized tiers: "packed" (a kernel reads the
        packed codes directly; Triton on CUDA, its PyTorch reference elsewhere),
        "dequantize" (a dequantized copy + SDPA), "auto" (packed on CUDA with Triton).
    rotation: None, or "hadamard": the quantized tiers hold keys (post-RoPE) and values rotated
        by a seeded randomized Hadamard matrix per (layer, KV head) (zipkv.quant.rotation);
        attention rotates the query and un-rotates the output. Needs a power-of-two head_dim.
        Window layers (sliding / chunked attention) keep unrotated tiers.
    """

    high_bits: int = 4
    low_bits: int = 2
    salient_ratio: float = 0.6
    high_value_bits: int | None = None
    low_value_bits: int | None = None
    saliency: str = "probe"
    probe_recent: float = 0.05
    probe_random: float = 0.05
    key_group_size: int | None = None
    value_group_size: int | None = None
    channel_separable: bool = True
    sink_tokens: int = 0
    residual_length: int = 0
    stream_interval: int = 100
    seed: int = 0
    decode_path: str = "auto"
    rotation: str | None = None

    def __post_init__(self):
        allowed = SUPPORTED_BITS + (LOSSLESS_BITS,)
        for name in ("high_bits", "low_bits", "high_value_bits", "low_value_bits"):
            value = getattr(self, name)
            if value is None and "value" in name:
                continue
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed} (got {value!r})")
        if (self.high_value_bits == LOSSLESS_BITS) != (self.high_bits == LOSSLESS_BITS) or (
            self.low_value_bits == LOSSLESS_BITS
        ) != (self.low_bits == LOSSLESS_BITS):
            if self.high_value_bits is not None or self.low_value_bits is not None:
                raise ValueError("a tier's keys and values are either both 16-bit or both quantized")
        if self.low_bits > self.high_bits:
            raise ValueError(f"low_bits ({self.low_bits}) must not exceed high_bits ({self.high_bits})")
        if self.saliency not in ("probe", "accumulated", "none"):
            raise ValueError(f"saliency must be 'probe', 'accumulated' or 'none' (got {self.saliency!r})")
        for name in ("salient_ratio", "probe_recent", "probe_random"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1] (got {value!r})")
        if self.saliency == "probe" and self.probe_recent + self.probe_random <= 0:
            raise ValueError("probe_recent + probe_random must be > 0 when saliency='probe'")
        for name in ("key_group_size", "value_group_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None (got {value!r})")
        for name in ("sink_tokens", "residual_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0 (got {value!r})")
        if self.decode_path not in ("auto", "packed", "dequantize"):
            raise ValueError(f"decode_path must be 'auto', 'packed' or 'dequantize' (got {self.decode_path!r})")
        check_rotation(self.rotation)
        if self.rotation is not None and self.lossless:
            raise ValueError("rotation applies to quantized tiers; a lossless cache (16/16 bits) has none")
        if not isinstance(self.stream_interval, int) or self.stream_interval < 1:
            raise ValueError(f"stream_interval must be an integer >= 1 (got {self.stream_interval!r})")

    @property
    def lossless(self) -> bool:
        return self.high_bits == LOSSLESS_BITS and self.low_bits == LOSSLESS_BITS

    @property
    def tier_bits(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """((key, value) bits of the high tier, (key, value) bits of the low tier)."""
        return (
            (self.high_bits, self.high_value_bits or self.high_bits),
            (self.low_bits, self.low_value_bits or self.low_bits),
        )

    @property
    def mixed_precision(self) -> bool:
        """Whether salient tokens are stored differently from the others."""
        return self.tier_bits[0] != self.tier_bits[1]

    @property
    def needs_queries(self) -> bool:
        """Whether the cache must see the attention queries (to score saliency)."""
        return not self.lossless and self.saliency != "none" and self.mixed_precision

    def to_dict(self) -> dict:
        return asdict(self)
