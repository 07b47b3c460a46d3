"""`VisualZipCache`: a ZipCache that knows which tokens are visual, and the VLM presets.

    inputs = processor(images=..., text=..., return_tensors="pt", padding=True)
    cache = zipkv.vlm.make_vlm_cache("zipvl", model.config, inputs["input_ids"])
    model.generate(**inputs, cache=cache, max_new_tokens=64)
    cache.stats()           # CacheStats, as for every zipkv cache
    cache.modality_stats()  # tokens / bytes held for text, visual and padding tokens

Built from the top-level VLM config (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL): the text
settings come from `config.get_text_config(decoder=True)` and the image / video token ids
from the top-level config. Constructing a cache that must see queries switches the language
model's config (the same object) to zipkv attention; the vision tower keeps its own.
"""

from __future__ import annotations

import torch

from ..cache import ZipCache
from ..cache.cache import head_dim, window_layer
from ..methods import PRESETS, make_cache
from .layer import ModalityTags, VisualZipCacheLayer
from .modality import token_modality, visual_token_ids
from .settings import VIDKV, VisualCompressionConfig, vlm_presets
from .stats import ModalityStats, modality_stats
from .vidkv import check_head_dim

_VISUAL_FIELDS = (
    "visual_high_bits", "visual_low_bits", "visual_salient_ratio", "salient_tau", "visual_salient_tau",
    "vidkv_group_size",
)


class VisualZipCache(ZipCache):
    """ZipCache with separate tiers and policy for visual tokens (see `VisualCompressionConfig`).

    input_ids: the prompt's ids [B, T] as given to the model (padding included), to tell
    visual positions from text ones; or call `set_modality(...)` before the first forward.
    attention_mask / mm_token_type_ids: optional, from the processor's output.
    """

    def __init__(self, config, input_ids: torch.Tensor | None = None, *, attention_mask=None, mm_token_type_ids=None,
                 **settings):
        super().__init__(config, **settings)  # checked_settings and build_layers below
        self.image_token_ids = visual_token_ids(config)
        self._config = config
        if input_ids is not None:
            self.set_modality(input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids)

    def checked_settings(self, config, settings: dict) -> VisualCompressionConfig:
        visual = {name: settings.pop(name) for name in _VISUAL_FIELDS if name in settings}
        # the text settings alone, as ZipCache checks them; window layers keep them (text only)
        self.text_settings = super().checked_settings(config, settings)
        checked = VisualCompressionConfig(**settings, **visual)
        if checked.visual_low_bits == VIDKV:
            check_head_dim(head_dim(config))
        return checked

    def build_layers(self, text_config, types: list[str]) -> list:
        self.tags = ModalityTags(readers=types.count("full_attention"))
        return [VisualZipCacheLayer(self.settings, i, self.tags) if kind == "full_attention"
                else window_layer(self.text_settings, text_config, kind, i) for i, kind in enumerate(types)]

    def set_modality(self, input_ids: torch.Tensor, attention_mask=None, mm_token_type_ids=None) -> None:
        """Which positions are visual, from the full sequence's ids [B, T] (position 0 on):
        the prompt, or prompt + earlier turns when a cache is continued with new images.
        attention_mask (optional, [B, T], 0 = padding) tells padding apart for every method,
        including those that never see the model's mask (kivi, uniform, full)."""
        modality = token_modality(input_ids, self._config, mm_token_type_ids=mm_token_type_ids)
        self.tags.set(modality, None if attention_mask is None else attention_mask == 0)

    def modality_stats(self) -> ModalityStats:
        return modality_stats(self)


# The registry's ZipCache presets, plus the VLM-only ones; keyword arguments override them.
VLM_PRESETS: dict[str, dict] = vlm_presets()


def make_vlm_cache(method: str, config, input_ids: torch.Tensor | None = None, *, attention_mask=None,
                   mm_token_type_ids=None, **params) -> VisualZipCache:
    """A modality-aware cache of a named method for a VLM config (model.config): the base
    methods (full, zipcache, kivi, uniform; visual tokens get the text settings unless
    overridden) plus zipvl and vidkv."""
    if method not in VLM_PRESETS:
        raise ValueError(f"method must be one of {sorted(VLM_PRESETS)} (got {method!r})")
    if method in PRESETS:
        # the base factory resolves its shorthands (bits=, KIVI's value groups); rebuild with its settings
        probe = make_cache(method, config, **{k: v for k, v in params.items() if k not in _VISUAL_FIELDS})
        settings = probe.settings.to_dict()
        settings.update({k: v for k, v in params.items() if k in _VISUAL_FIELDS})
    else:
        settings = {**VLM_PRESETS[method], **params}
    return VisualZipCache(
        config, input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids, **settings
    )
