"""zipkv for vision-language models: modality-aware caches, VidKV, tiny test VLMs.

    from zipkv.vlm import make_vlm_cache
    cache = make_vlm_cache("zipvl", model.config, inputs["input_ids"])
    model.generate(**inputs, cache=cache)
    cache.modality_stats()

The plain caches (`zipkv.make_cache(...)`) work unchanged inside LLaVA, LLaVA-NeXT,
Qwen2-VL and Qwen2.5-VL; this package adds what visual tokens need. See README.md here.
"""

from .cache import VLM_PRESETS, VisualZipCache, make_vlm_cache
from .layer import ModalityTags, VisualZipCacheLayer
from .modality import IMAGE, TEXT, VIDEO, token_modality, visual_spans, visual_token_ids
from .settings import VIDKV, VisualCompressionConfig
from .stats import ModalityStats, modality_stats
from .vidkv_tier import VidKVTier

__all__ = [
    "VLM_PRESETS", "VisualZipCache", "make_vlm_cache", "ModalityTags", "VisualZipCacheLayer", "TEXT", "IMAGE",
    "VIDEO", "token_modality", "visual_spans", "visual_token_ids", "VIDKV", "VisualCompressionConfig",
    "ModalityStats", "modality_stats", "VidKVTier",
]
