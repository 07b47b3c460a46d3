"""`VisualZipCacheLayer`: a ZipCache layer whose visual tokens get their own tiers and policy.

Storage: text tiers (low, high, as in `ZipCacheLayer`), visual tiers (`vis_low`, which may be
VidKV's 1.x-bit tier, and `vis_high`) and the fp16 part. Attention sees
`[low | high | vis_low | vis_high | fp16]`; attention is permutation-invariant over keys once
RoPE is applied, and left padding (text-group tokens, scored lowest) stays at the very front.

Quantizing a block: each row's block tokens are split into a visual group and a text group.
A tier holds the same number of tokens in every batch row, so the visual group takes
V = min over rows of the row's visual-token count (all of them when rows have equally many
images, the usual case); a row with more visual tokens sends its surplus (its latest ones) to
the text group, where they get the text precision (counted as visual in the stats). Each
group is then split by saliency into its high and low tier, with its own ratio (or ZipVL's
dynamic tau) and bits.

Where the modality of a token comes from: `tags`, a `ModalityTags` shared by the cache's
layers, gives the modality of every logical position of the prompt; later positions
(generated tokens) are text.
"""

from __future__ import annotations

import torch

from ..cache.layer import ZipCacheLayer, gather_tokens, make_tier, overwrite_padding, salient_count, salient_split
from ..eviction.budgets.zipvl import zipvl_important_count
from .modality import TEXT
from .settings import VIDKV, VisualCompressionConfig
from .vidkv_tier import VidKVTier

TIER_NAMES = ("low", "high", "vis_low", "vis_high")
# Per tier and batch row, how many (head, token) entries of each kind it holds (stats only).
KINDS = ("text", "visual", "padding")


class ModalityTags:
    """The modality (int8 [B, T]: TEXT / IMAGE / VIDEO) of the prompt positions, and optionally
    which of them are padding, shared by the layers of one cache. Positions past T are text.

    Each layer takes its tokens' tags as it stores them (they then live in the layer, counted);
    once every layer has read all T positions the shared copy is released, so a cache holds
    no tensor its stats do not count.
    """

    def __init__(self, readers: int):
        self.readers = readers
        self.tags = self.padding = None
        self.length = None  # T once set (kept after release: later positions are text)
        self.progress = {}

    def set(self, modality: torch.Tensor, padding: torch.Tensor | None = None) -> None:
        if modality.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens] (got shape {tuple(modality.shape)})")
        if padding is not None and padding.shape != modality.shape:
            raise ValueError(
                f"attention_mask shape {tuple(padding.shape)} must equal input_ids shape {tuple(modality.shape)}"
            )
        self.tags = modality.to(torch.int8)
        self.padding = None if padding is None else padding.bool()
        self.length = modality.shape[1]
        self.progress = {}

    def take(self, reader: int, start: int, n: int, batch: int, device):
        """(visual, padding) bool [batch, n] for positions start .. start+n-1 of each row;
        padding is None when no attention mask was given."""
        if self.length is None:
            raise RuntimeError(
                "this cache does not know which tokens are visual: build it with input_ids "
                "(zipkv.vlm.make_vlm_cache(method, model.config, input_ids)) or call cache.set_modality(input_ids)"
            )
        visual = torch.zeros(batch, n, dtype=torch.bool, device=device)
        padding = None if self.padding is None else torch.zeros_like(visual)
        stop = min(start + n, self.length)
        if stop > start and self.tags is not None:
            visual[:, : stop - start] = self._rows(self.tags[:, start:stop] != TEXT, batch).to(device)
            if padding is not None:
                padding[:, : stop - start] = self._rows(self.padding[:, start:stop], batch).to(device)
        self.progress[reader] = max(self.progress.get(reader, 0), start + n)
        if len(self.progress) == self.readers and min(self.progress.values()) >= self.length:
            self.tags = self.padding = None  # every layer has its copy
        return visual, padding

    @staticmethod
    def _rows(x: torch.Tensor, batch: int) -> torch.Tensor:
        if x.shape[0] == batch:
            return x
        if batch % x.shape[0]:
            raise ValueError(f"the cache's modality tags are for {x.shape[0]} rows but the model runs {batch}")
        # generate() expands rows with repeat_interleave (num_return_sequences, beams)
        return x.repeat_interleave(batch // x.shape[0], dim=0)


def _make_visual_low(settings: VisualCompressionConfig):
    if settings.visual_low_bits == VIDKV:
        return VidKVTier(settings.vidkv_group_size)
    return make_tier(settings.visual_low_bits, settings)


class VisualZipCacheLayer(ZipCacheLayer):
    def __init__(self, settings: VisualCompressionConfig, layer_idx: int, tags: ModalityTags):
        super().__init__(settings, layer_idx)
        self.tags = tags
        self.vis_low = _make_visual_low(settings)
        self.vis_high = make_tier(settings.visual_high_bits, settings)
        self.is_visual = None  # [B, n_fp]: fp16-part tokens that are visual
        self._new_padding = None  # [B, n]: padding among the tokens of the last update, until applied
        self.entry_counts = {name: None for name in TIER_NAMES}  # per tier: [[text, visual, padding]] per row

    def tiers(self):
        return [getattr(self, name) for name in TIER_NAMES]

    # -- transformers layer interface -------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        self.is_visual = torch.zeros((key_states.shape[0], 0), dtype=torch.bool, device=self.device)
        self.entry_counts = {name: [[0, 0, 0] for _ in range(key_states.shape[0])] for name in TIER_NAMES}

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.awaiting_queries:
            raise self.missing_attention_error()
        # tag the new tokens before the base update, which may quantize right away
        visual, padding = self.tags.take(
            self.layer_idx, self.get_seq_length(), key_states.shape[2], key_states.shape[0], self.device
        )
        self.is_visual = torch.cat([self.is_visual, visual], dim=1)
        # Padding known from the attention mask marks tokens as not real, so caches that never
        # see queries (and so never see the mask) keep it out of ranges and stats too. Applied
        # before any compression, wherever the base class compresses (inside update or later).
        self._new_padding = padding
        out = super().update(key_states, value_states, *args, **kwargs)
        self._apply_new_padding()
        return out

    def _apply_new_padding(self) -> None:
        if self._new_padding is not None:
            n = self._new_padding.shape[1]
            self.is_real[:, self.is_real.shape[1] - n:] &= ~self._new_padding
            self._new_padding = None

    def compress_due(self, *args, **kwargs):
        self._apply_new_padding()
        return super().compress_due(*args, **kwargs)

    def reset(self) -> None:
        owner = getattr(self, "owner", None)
        self.__init__(self.settings, self.layer_idx, self.tags)
        self.owner = owner

    def _select_batch(self, index):
        if not self.is_initialized:
            return
        super()._select_batch(index)  # fp16 part and every tier
        self.is_visual = self.is_visual.index_select(0, index.to(self.device))
        rows = index.tolist()
        self.entry_counts = {name: [list(counts[r]) for r in rows] for name, counts in self.entry_counts.items()}

    # -- the policy -------------------------------------------------------------------------------
    def _quantize_block(self, n: int) -> None:
        """Quantize the n oldest non-sink fp16 tokens of every row into the four tiers."""
        n_fp = self.keys.shape[2]
        batch = self.keys.shape[0]
        order = torch.arange(n_fp, device=self.device).expand(batch, -1)
        by_age = torch.where(self.is_sink, order + n_fp, order).argsort(dim=1)
        block, rest = by_age[:, :n].sort(dim=1).values, by_age[:, n:].sort(dim=1).values
        keys, values, scores, counts, is_real = self._take(block)
        is_visual = self.is_visual.gather(1, block) & is_real
        if not bool(is_real.all()):
            keys, values = overwrite_padding(keys, values, is_real)
        # the visual group: the first V visual tokens of each row, V equal for all rows
        n_visual = int(is_visual.sum(dim=1).min())
        rank = is_visual.cumsum(dim=1)
        in_visual = is_visual & (rank <= n_visual)
        position = torch.arange(n, device=self.device).expand(batch, -1)
        grouped = torch.where(in_visual, position + n, position).argsort(dim=1, stable=True)
        for visual, index in ((False, grouped[:, : n - n_visual]), (True, grouped[:, n - n_visual:])):
            if index.shape[1]:
                self._quantize_group(visual, index, keys, values, scores, counts, is_real, is_visual)
        is_sink, is_visual_rest = self.is_sink.gather(1, rest), self.is_visual.gather(1, rest)
        self.keys, self.values, self.score_sum, self.score_count, self.is_real = self._take(rest)
        self.is_sink, self.is_visual = is_sink, is_visual_rest

    def _quantize_group(self, visual, index, keys, values, scores, counts, is_real, is_visual) -> None:
        """Split one group (index [B, m] into the block, ascending) into its high and low tier."""
        s = self.settings
        low, high = (self.vis_low, self.vis_high) if visual else (self.low, self.high)
        names = ("vis_low", "vis_high") if visual else ("low", "high")
        m = index.shape[1]
        heads = keys.shape[1]
        per_head = index[:, None, :].expand(-1, heads, -1)
        g_keys, g_values = gather_tokens(keys, per_head), gather_tokens(values, per_head)
        g_real, g_visual = is_real.gather(1, index), is_visual.gather(1, index)
        n_high = 0
        if s.splits(visual):
            g_scores = scores.gather(2, per_head)
            tau = s.visual_salient_tau if visual else s.salient_tau
            if tau is not None:
                # ZipVL: the fewest tokens carrying tau of the probe attention mass (all heads),
                # the largest count over rows so every row reaches tau
                mass = g_scores.sum(dim=1).masked_fill(~g_real, 0.0)
                n_high = int(zipvl_important_count(mass, tau).max())
                # never more than a row has real tokens: padding must stay in the low tier
                n_high = min(n_high, int(g_real.sum(dim=1).min()))
            else:
                n_high = salient_count(s.visual_salient_ratio if visual else s.salient_ratio, g_real)
        if n_high == 0:
            self._store(low, names[0], g_keys, g_values, None, g_real, g_visual)
            return
        low_idx, high_idx = salient_split(g_scores, counts.gather(2, index[:, None, :]), g_real, n_high,
                                          s.saliency == "probe")
        for tier, name, idx in ((low, names[0], low_idx), (high, names[1], high_idx)):
            self._store(tier, name, gather_tokens(g_keys, idx), gather_tokens(g_values, idx), idx, g_real, g_visual)

    def _store(self, tier, name, keys, values, idx, is_real, is_visual) -> None:
        """Append to a tier and count its new entries per row (text / visual / padding).
        idx [B, H, k]: the group positions the tokens came from (None: all, in order)."""
        if keys.shape[2] == 0:
            return
        self._append(tier, keys, values)
        if idx is None:
            idx = torch.arange(keys.shape[2], device=self.device).expand(keys.shape[0], keys.shape[1], -1)
        real = is_real[:, None, :].expand(-1, keys.shape[1], -1).gather(2, idx)
        vis = is_visual[:, None, :].expand(-1, keys.shape[1], -1).gather(2, idx)
        n_visual = vis.sum(dim=(1, 2)).tolist()
        n_padding = (~real).sum(dim=(1, 2)).tolist()
        total = keys.shape[1] * keys.shape[2]
        for row, counts in enumerate(self.entry_counts[name]):
            counts[0] += total - n_visual[row] - n_padding[row]
            counts[1] += n_visual[row]
            counts[2] += n_padding[row]

    # -- accounting -------------------------------------------------------------------------------
    def held_tensors(self) -> list[torch.Tensor]:
        if not self.is_initialized:
            return []
        return super().held_tensors() + [self.is_visual]

    def fp16_token_flags(self) -> dict:
        return {"is_visual": self.is_visual}

    def fp16_part_kinds(self) -> list[list[int]]:
        """Per row, [text, visual, padding] tokens in the fp16 part."""
        visual = (self.is_visual & self.is_real).sum(dim=1).tolist()
        padding = (~self.is_real).sum(dim=1).tolist()
        n = self.keys.shape[2]
        return [[n - v - p, v, p] for v, p in zip(visual, padding)]

    def fp16_part_tensors(self) -> list[torch.Tensor]:
        """The per-token tensors of the fp16 part (every one indexed by row and token)."""
        return [self.keys, self.values, self.score_sum, self.score_count, self.is_real, self.is_sink, self.is_visual]
