"""Settings of a modality-aware cache: the text settings plus their own for visual tokens."""

from __future__ import annotations

from dataclasses import dataclass

from ..cache.config import LOSSLESS_BITS, CompressionConfig
from ..quant.quantizer import SUPPORTED_BITS
from ..registry import METHODS, names

VIDKV = "vidkv"

# Methods only the modality-aware cache has (VisualCompressionConfig settings); every other
# VLM method is a ZipCache preset of the registry (zipkv.METHODS), visual tokens getting the
# text settings unless overridden. "zipvl" here is ZipVL on VisualZipCache's tiers (tau per
# modality), where the registry's "zipvl" is the evicting cache's tiered policy.
VLM_ONLY_PRESETS: dict[str, dict] = {
    # ZipVL: per layer, the important tokens are the fewest carrying 97% of the probe attention
    # mass (text and visual groups each), stored at 4 bits; the rest at 2 bits
    "zipvl": dict(high_bits=4, low_bits=2, saliency="probe", salient_tau=0.97, visual_salient_tau=0.97),
    # VidKV for visual tokens (1.5-bit keys, 1.6-bit ternary values, groups of 32 tokens);
    # text tokens as the zipcache preset
    "vidkv": dict(
        high_bits=4, low_bits=2, salient_ratio=0.6, saliency="probe", visual_low_bits=VIDKV,
        visual_high_bits=4, visual_salient_ratio=0.0,
    ),
}


def vlm_presets() -> dict[str, dict]:
    """Every VLM method's settings: the registry's ZipCache presets, then the VLM-only ones."""
    base = {name: dict(METHODS[name].defaults) for name in names("lossless", "quantize")}
    return {**base, **VLM_ONLY_PRESETS}


def _check_tau(name: str, value) -> None:
    if value is not None and (not isinstance(value, (int, float)) or not 0.0 < value <= 1.0):
        raise ValueError(f"{name} must be None or in (0, 1] (got {value!r})")


@dataclass(frozen=True)
class VisualCompressionConfig(CompressionConfig):
    """`CompressionConfig` (it applies to text tokens) plus what visual tokens get instead.

    visual_high_bits / visual_low_bits: bit widths of salient / other visual tokens, in
        {2, 4, 8, 16}; visual_low_bits may also be "vidkv" (VidKV's 1.x-bit scheme). None:
        the text setting.
    visual_salient_ratio: fraction of a block's visual tokens stored at visual_high_bits.
        None: salient_ratio.
    salient_tau / visual_salient_tau: ZipVL's dynamic ratio instead of a fixed one: per layer
        and block, the high tier gets the fewest tokens that carry this fraction of the probe
        queries' attention mass over the group (text or visual), in (0, 1]; None: the fixed ratio.
    vidkv_group_size: tokens per key scale / value alpha group of the VidKV tier.
    """

    visual_high_bits: int | None = None
    visual_low_bits: int | str | None = None
    visual_salient_ratio: float | None = None
    salient_tau: float | None = None
    visual_salient_tau: float | None = None
    vidkv_group_size: int = 32

    def __post_init__(self):
        super().__post_init__()
        defaults = dict(
            visual_high_bits=self.high_bits, visual_low_bits=self.low_bits, visual_salient_ratio=self.salient_ratio
        )
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        allowed = SUPPORTED_BITS + (LOSSLESS_BITS,)
        if self.visual_high_bits not in allowed:
            raise ValueError(f"visual_high_bits must be one of {allowed} (got {self.visual_high_bits!r})")
        if self.visual_low_bits not in allowed + (VIDKV,):
            raise ValueError(f"visual_low_bits must be one of {allowed + (VIDKV,)} (got {self.visual_low_bits!r})")
        if self.visual_low_bits != VIDKV and self.visual_low_bits > self.visual_high_bits:
            raise ValueError(
                f"visual_low_bits ({self.visual_low_bits}) must not exceed visual_high_bits ({self.visual_high_bits})"
            )
        ratio = self.visual_salient_ratio
        if not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"visual_salient_ratio must be in [0, 1] (got {ratio!r})")
        _check_tau("salient_tau", self.salient_tau)
        _check_tau("visual_salient_tau", self.visual_salient_tau)
        if not isinstance(self.vidkv_group_size, int) or self.vidkv_group_size < 1:
            raise ValueError(f"vidkv_group_size must be a positive integer (got {self.vidkv_group_size!r})")

    # -- what each modality needs ------------------------------------------------------------
    @property
    def text_lossless(self) -> bool:
        return self.high_bits == LOSSLESS_BITS and self.low_bits == LOSSLESS_BITS

    @property
    def visual_lossless(self) -> bool:
        return self.visual_high_bits == LOSSLESS_BITS and self.visual_low_bits == LOSSLESS_BITS

    def splits(self, visual: bool) -> bool:
        """Whether the group's tokens are split into a high and a low tier by saliency."""
        if self.saliency == "none":
            return False
        if visual:
            return self.visual_high_bits != self.visual_low_bits
        return self.high_bits != self.low_bits

    @property
    def lossless(self) -> bool:
        return self.text_lossless and self.visual_lossless

    @property
    def needs_queries(self) -> bool:
        return not self.lossless and (self.splits(False) or self.splits(True))
