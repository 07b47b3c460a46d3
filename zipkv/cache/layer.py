"""`ZipCacheLayer`: one layer's compressed KV storage and its quantization policy.

Storage: a low-bit tier, a high-bit tier (each a `PackedTier`, or plain fp16 for 16 bits)
and an fp16 part holding the attention sinks, the recent window and tokens not yet
quantized. Attention sees them in the order [low | high | fp16] (docs/DESIGN.md explains why
that order is exact, padding included).

Policy: after a forward of several tokens (the prompt, or a prefill chunk) every fp16 token
beyond the sinks and the recent window is quantized as one block; while decoding, a block of
`stream_interval` tokens is quantized each time that many accumulate beyond the window.
Within a block, the `salient_ratio` most salient real tokens of each (row, KV head) go to
the high tier, the rest to the low tier. Saliency comes from the attention queries, handed
over by zipkv's attention function through `observe()`.
"""

from __future__ import annotations

import torch
from .layer_base import ZipkvLayer, storage_dtype, to_store_dtype

from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..attention import hand_queries_to
from ..kernels._runtime import triton_installed
from ..kernels.attention_lse import causal_attention_lse
from ..kernels.decode_attention import decode_attention
from ..kernels.probe_scores import probe_scores, probe_scores_lse
from ..quant.rotation import HadamardRotation
from ..saliency import allowed_keys, attention_scores, probe_positions
from .config import LOSSLESS_BITS, CompressionConfig
from .tier import PackedTier, finite_flags, refuse_nonfinite


class Fp16Tier:
    """A 'tier' at 16 bits: tokens kept as they are (same interface as PackedTier)."""

    bits = LOSSLESS_BITS

    def __init__(self):
        self.keys = self.values = None

    @property
    def num_tokens(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, keys, values):
        if keys.shape[2]:
            self.keys = keys if self.keys is None else torch.cat([self.keys, keys], dim=2)
            self.values = values if self.values is None else torch.cat([self.values, values], dim=2)

    def dequantize(self, dtype):
        return self.keys.to(dtype), self.values.to(dtype)

    def tensors(self):
        return [t for t in (self.keys, self.values) if t is not None]

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def select_batch(self, index):
        if self.keys is not None:
            self.keys = self.keys.index_select(0, index.to(self.keys.device))
            self.values = self.values.index_select(0, index.to(self.values.device))


# impl of the probe-score kernels on mask-free prompts ("auto": Triton on CUDA, the PyTorch
# reference on CPU); the tests set "triton" to run the kernels under Triton's interpreter.
PROBE_IMPL = "auto"

# Forwards of at most this many new tokens (decoding, a short question) may attend over the
# packed tiers directly; longer ones (prefill chunks) attend over a dequantized copy.
PACKED_PATH_MAX_QUERIES = 16


def make_tier(bits, settings: CompressionConfig):
    """A tier for `bits`: an int (keys and values alike) or (key bits, value bits)."""
    key_bits, value_bits = (bits, bits) if isinstance(bits, int) else bits
    if key_bits == LOSSLESS_BITS:
        return Fp16Tier()
    return PackedTier(key_bits, settings.key_group_size, settings.value_group_size, settings.channel_separable, value_bits)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D], index [B, H, n] -> [B, H, n, D]."""
    return x.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))



def salient_count(ratio: float, is_real: torch.Tensor) -> int:
    """Salient tokens of a block: `ratio` of the real tokens of its row with the fewest (a tier
    holds the same count in every row; padding never goes high). is_real [B, n]."""
    return round(ratio * int(is_real.sum(dim=1).min()))


def salient_split(scores, counts, is_real, n_high: int, normalize: bool):
    """(low_idx, high_idx) [B, H, *], each in position order: the n_high tokens of a block with
    the highest (normalized: / counts) score per (row, KV head) go high, padding never."""
    n = scores.shape[2]
    if normalize:
        scores = scores / counts.clamp_min(1.0)
    scores = scores.masked_fill(~is_real[:, None, :], float("-inf"))
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(2, scores.topk(n_high, dim=2).indices, True)
    pos = torch.arange(n, device=scores.device).expand_as(scores)
    high_idx = torch.where(chosen, pos, pos + n).sort(dim=2).values[:, :, :n_high]
    low_idx = torch.where(chosen, pos + n, pos).sort(dim=2).values[:, :, : n - n_high]
    return low_idx, high_idx


def overwrite_padding(keys, values, is_real):
    """Give padding tokens the states of their row's first real token of the block. They are
    masked out of attention anyway; this keeps them from widening any quantization range."""
    first_real = is_real.float().argmax(dim=1)  # [B]
    index = first_real[:, None, None, None].expand(-1, keys.shape[1], 1, keys.shape[3])
    pad = ~is_real[:, None, :, None]
    return torch.where(pad, keys.gather(2, index), keys), torch.where(pad, values.gather(2, index), values)


def rotated_decode_attention(rotation, query, tiers, k_fp, v_fp, **kwargs):
    """decode_attention over tiers that hold rotated codes (rotation: a HadamardRotation, or None:
    plain decode_attention): the query and the fp16 part go into the tiers' basis (q R, k R, v R:
    scores are unchanged since R R^T = I), the kernel reads the codes as they are, and the output
    comes back by o R^T. The fp16 part is a few hundred tokens at most; the tiers are never
    rotated back. Everything rotated is float32-exact from the inputs, so an eager and a static
    layer get the same output."""
    if rotation is None:
        return decode_attention(query, tiers, k_fp, v_fp, **kwargs)
    dtype = query.dtype
    k_fp, v_fp = (None, None) if k_fp is None else (rotation.rotate(k_fp, dtype), rotation.rotate(v_fp, dtype))
    output = decode_attention(rotation.rotate(query), tiers, k_fp, v_fp, **kwargs)
    return rotation.unrotate(output)


class ZipCacheLayer(ZipkvLayer):

    def __init__(self, settings: CompressionConfig, layer_idx: int):
        super().__init__()
        self.settings = settings
        self.layer_idx = layer_idx
        self.high = make_tier(settings.tier_bits[0], settings)
        self.low = make_tier(settings.tier_bits[1], settings)
        # Per fp16 token: summed attention from observed queries, how many queries saw it,
        # and whether it is a real (not padding) token.
        self.score_sum = self.score_count = self.is_real = None
        self.is_sink = None  # fp16 tokens protected as attention sinks (never quantized)
        self.num_sinks = 0
        self.sinks_chosen = False
        self.prompt_done = False  # the first forward (the prompt) has been compressed
        self.awaiting_queries = False
        self.returned_fp16_only = False  # the last update left the tiers to attend()
        self.owner = None  # the cache holding this layer (set by ZipCache)
        self.rotation = None  # HadamardRotation of the quantized tiers (settings.rotation), made with the states

    # -- transformers layer interface -------------------------------------------------------
    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        # The fp16 part of a lossy cache is fp16 even for fp32 models (bf16 for bf16 ones);
        # only a lossless cache keeps the model's own dtype, to equal DynamicCache exactly.
        self.store_dtype = storage_dtype(self.dtype, keep_model_dtype=self.settings.lossless)
        shape = (key_states.shape[0], key_states.shape[1], 0)
        self.keys = key_states.detach()[:, :, :0].to(self.store_dtype)  # detached: see update()
        self.values = value_states.detach()[:, :, :0].to(self.store_dtype)
        # Saliency bookkeeping exists only for caches that score tokens (it is counted in stats).
        track = self.settings.needs_queries
        self.score_sum = torch.zeros(shape if track else (shape[0], 0, 0), dtype=torch.float32, device=self.device)
        self.score_count = torch.zeros((shape[0], int(track), 0), dtype=torch.float32, device=self.device)
        self.is_real = torch.ones((shape[0], 0), dtype=torch.bool, device=self.device)
        self.is_sink = torch.zeros((shape[0], 0), dtype=torch.bool, device=self.device)
        self.make_rotation(key_states.shape[1], key_states.shape[3])
        self.is_initialized = True

    def make_rotation(self, kv_heads: int, head_dim: int) -> None:
        """The layer's rotation of its quantized tiers, per settings.rotation (None: none)."""
        self.rotation = None
        if self.settings.rotation is not None:
            self.rotation = HadamardRotation(kv_heads, head_dim, self.settings.seed, self.layer_idx, self.device,
                                             self.store_dtype)

    def to_tier_basis(self, keys, values):
        """States as the quantized tiers hold them: rotated (x R, float32) when the layer rotates."""
        if self.rotation is None:
            return keys, values
        return self.rotation.rotate(keys, torch.float32), self.rotation.rotate(values, torch.float32)

    def update(self, key_states, value_states, *args, **kwargs):
        self.begin_update(key_states, value_states)
        n = key_states.shape[2]
        b = key_states.shape[0]
        # Detached at the door: quantization is not differentiable, and a held tensor that
        # requires grad would keep the forward's whole autograd graph alive with the cache.
        stored = to_store_dtype(key_states.detach(), self.store_dtype, "key_states", self.layer_idx)
        self.keys = torch.cat([self.keys, stored], dim=2)
        stored = to_store_dtype(value_states.detach(), self.store_dtype, "value_states", self.layer_idx)
        self.values = torch.cat([self.values, stored], dim=2)
        if self.settings.needs_queries:
            self.score_sum = torch.cat([self.score_sum, self.score_sum.new_zeros(b, self.score_sum.shape[1], n)], dim=2)
            self.score_count = torch.cat([self.score_count, self.score_count.new_zeros(b, 1, n)], dim=2)
        self.is_real = torch.cat([self.is_real, self.is_real.new_ones(b, n)], dim=1)
        self.is_sink = torch.cat([self.is_sink, self.is_sink.new_zeros(b, n)], dim=1)
        if self.settings.lossless:  # the prefill attends (and differentiates) like DynamicCache
            return (key_states, value_states) if self.keys.shape[2] == n else (self.keys, self.values)
        # zipkv attention (switched on by the cache) takes over from here: attend(), then
        # score and compress. Compression waits until attention has read what was returned.
        self.awaiting_queries = True
        hand_queries_to(self)
        self.returned_fp16_only = self._use_packed_path(n)
        if self.keys.shape[2] == n and not (self.low.num_tokens or self.high.num_tokens):
            # the first forward attends to the states exactly as the model made them
            return key_states, value_states
        if self.returned_fp16_only:
            return self.keys.to(self.dtype), self.values.to(self.dtype)
        return self.attention_inputs()

    def _use_packed_path(self, new_tokens: int) -> bool:
        """Whether attention reads the packed tiers directly (decode_attention) instead of a
        dequantized copy of the whole cache."""
        path = self.settings.decode_path
        tiers = [t for t in self.tiers() if t.num_tokens]
        if path == "dequantize" or new_tokens > PACKED_PATH_MAX_QUERIES or not tiers:
            return False
        if any(not isinstance(t, PackedTier) for t in tiers):
            return False
        return path == "packed" or (self.device.type == "cuda" and triton_installed())

    def attend(self, module, query, key, value, attention_mask, scaling, **kwargs):
        """zipkv attention for this layer: the output, then scoring and compression."""
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        lse = None
        if self.returned_fp16_only:
            tiers = [t for t in self.tiers() if t.num_tokens]
            output = rotated_decode_attention(self.rotation, query, tiers, key, value, mask=attention_mask,
                                              scale=scaling)
            output = output.transpose(1, 2).contiguous()
        else:
            got = self._first_prompt_with_lse(module, query, key, value, attention_mask, scaling, kwargs)
            if got is not None:
                output, lse = got[0].transpose(1, 2).contiguous(), got[1]
            else:
                output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        if self.settings.needs_queries:
            self.observe(query, attention_mask, scaling, lse=lse)
        else:
            self.awaiting_queries = False
            self._mark_padding(attention_mask, query.shape[2])
            self.compress_due()
        return output, None

    def _first_prompt_with_lse(self, module, query, key, value, attention_mask, scaling, kwargs):
        """(output [B, Hq, T, D], row log-sum-exp) for the first, mask-free prompt forward on
        CUDA, so probe saliency needs one pass over the keys; None otherwise (the SDPA path).
        The flash op's causal flag aligns top-left: right only while q_len == kv_len."""
        q_len = query.shape[2]
        is_causal = kwargs.get("is_causal")
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        # softcap / s_aux / position_bias never get here: the attention entry point refuses them
        if not (self.settings.needs_queries and attention_mask is None and is_causal and q_len > 1):
            return None
        if not (key.shape[2] == q_len == self.keys.shape[2] and self.keys.dtype == key.dtype):
            return None
        return causal_attention_lse(query, key, value, scaling)

    def tiers(self) -> list:
        """The quantized tiers in attention order (before the fp16 part); subclasses that
        hold more tiers (zipkv.vlm) extend this list and everything else follows."""
        return [self.low, self.high]

    def fp16_token_flags(self) -> dict:
        """Per-token bool flags [B, n_fp] of the fp16 part that a subclass's policy keeps
        beyond the base ones (a VLM layer: is_visual); the static form mirrors them."""
        return {}

    def attention_inputs(self):
        """[tiers | fp16] keys and values, the quantized tiers dequantized (reference path,
        correct with any attention implementation)."""
        parts = [self.dequantized(t) for t in self.tiers() if t.num_tokens]
        if not parts:
            return self.keys.to(self.dtype), self.values.to(self.dtype)
        keys = torch.cat([p[0] for p in parts] + [self.keys.to(self.dtype)], dim=2)
        values = torch.cat([p[1] for p in parts] + [self.values.to(self.dtype)], dim=2)
        return keys, values

    def dequantized(self, tier):
        """(keys, values) of a tier in the model's dtype, in the model's basis (un-rotated)."""
        if self.rotation is None or isinstance(tier, Fp16Tier):
            return tier.dequantize(self.dtype)
        keys, values = tier.dequantize(torch.float32)
        return self.rotation.unrotate(keys, self.dtype), self.rotation.unrotate(values, self.dtype)

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.num_tokens for t in self.tiers()) + self.keys.shape[2]

    def reset(self) -> None:
        owner = self.owner
        self.__init__(self.settings, self.layer_idx)
        self.owner = owner

    def _select_batch(self, index):
        if not self.is_initialized:
            return
        index = index.to(self.device)
        self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)
        self.score_sum, self.score_count = self.score_sum.index_select(0, index), self.score_count.index_select(0, index)
        self.is_real, self.is_sink = self.is_real.index_select(0, index), self.is_sink.index_select(0, index)
        for tier in self.tiers():
            tier.select_batch(index)

    def batch_rows(self) -> int:
        return self.keys.shape[0]

    def crop(self, tokens_to_remove: int):
        raise NotImplementedError("zipkv caches cannot be cropped (quantized tokens are not re-materialized)")

    def missing_attention_error(self) -> RuntimeError:
        return RuntimeError(
            f"zipkv attention never ran for layer {self.layer_idx}: the model does not use the 'zipkv' "
            "attention implementation, so this cache cannot see the queries it scores tokens with. "
            "Build the cache with the model's own config object (zipkv switches it to 'zipkv' attention) "
            "or call zipkv.enable_zipkv_attention(model)."
        )

    # -- what zipkv's attention function hands over -------------------------------------------
    def observe(self, query: torch.Tensor, attention_mask, scaling: float, lse: torch.Tensor | None = None) -> None:
        """Score the fp16 tokens with this forward's queries, then quantize what is due.

        query [B, Hq, q, D]; attention_mask: the 4-D mask attention used, over
        [low | high | fp16]. Saliency is the attention of the queries normalized over the fp16
        part (for the first prompt that is every token, as in the paper), so neither path
        needs the quantized tiers to score. lse [B, Hq, q]: every query row's log-sum-exp
        from attention (the first mask-free prompt on CUDA), which saves the probe kernel a
        pass over the keys.
        """
        self.awaiting_queries = False
        # scores are kept: detached, so they hold no autograd graph
        query, lse = query.detach(), None if lse is None else lse.detach()
        q_len, n_fp = query.shape[2], self.keys.shape[2]
        batch = query.shape[0]
        mask = self._mark_padding(attention_mask, q_len)
        prompt_like = q_len > 1
        if prompt_like:
            # no mask: the new tokens are all real (no device read)
            n_pad = 0 if mask is None else int((~self.is_real[:, -q_len:]).sum(dim=1).max())
            s = self.settings
            rows = probe_positions(q_len, n_pad, s.probe_recent, s.probe_random, s.seed).to(query.device)
        else:
            rows = torch.arange(q_len, device=query.device)
        if lse is not None:  # causal, no mask, row r at key r: one pass with attention's LSE
            _, summed, counts = probe_scores_lse(query, self.keys, rows, lse, scaling, rows=rows, impl=PROBE_IMPL,
                                               positions_sorted=True)  # probe_positions ascend
        elif mask is None and prompt_like and query.dtype == self.keys.dtype:  # causal: two-pass kernel (reference on CPU)
            _, summed, counts = probe_scores(query[:, :, rows], self.keys, rows + (n_fp - q_len), None, scaling, impl=PROBE_IMPL)
        else:
            allowed = allowed_keys(mask, rows, n_fp - q_len, n_fp, batch).to(query.device)
            _, summed, counts = attention_scores(query[:, :, rows], self.keys, allowed, scaling)
        self.score_sum += summed
        self.score_count += counts
        self.compress_due()

    def _mark_padding(self, attention_mask, q_len: int):
        """Mark the fp16 tokens the last query row may not see as padding (is_real), so that
        quantization never puts them in a range; returns the mask cut to the fp16 part."""
        if attention_mask is None:
            return None
        n_fp, kv_len = self.keys.shape[2], self.get_seq_length()
        mask = attention_mask[..., kv_len - n_fp : kv_len]
        last = torch.tensor([q_len - 1])
        self.is_real &= allowed_keys(mask, last, n_fp - q_len, n_fp, mask.shape[0])[:, 0, 0].to(self.is_real.device)
        return mask

    # -- the policy ---------------------------------------------------------------------------
    def compress_due(self) -> None:
        """After the first prompt every fp16 token beyond the sinks and the recent window is
        quantized at once; after that (decoding, a question, later chunks) whole blocks of
        stream_interval tokens are, as they accumulate."""
        s = self.settings
        if not self.sinks_chosen and s.sink_tokens and self.keys.shape[2] > s.sink_tokens + s.residual_length:
            self._protect_sinks()
        excess = self.keys.shape[2] - self.num_sinks - s.residual_length
        first_prompt = self.low.num_tokens + self.high.num_tokens == 0 and not self.prompt_done
        self.prompt_done = True
        if first_prompt and excess > 0:
            self._quantize_block(excess)
        elif excess >= s.stream_interval:
            self._quantize_block(excess // s.stream_interval * s.stream_interval)

    def _protect_sinks(self) -> None:
        """Mark the first `sink_tokens` real tokens of every row as fp16 attention sinks."""
        n_fp = self.keys.shape[2]
        order = torch.arange(n_fp, device=self.device).expand(self.keys.shape[0], -1)
        count = min(self.settings.sink_tokens, int(self.is_real.sum(dim=1).min()))
        first_real = torch.where(self.is_real, order, order + n_fp).argsort(dim=1)[:, :count]
        self.is_sink = torch.zeros_like(self.is_real).scatter_(1, first_real, True)
        self.num_sinks = count
        self.sinks_chosen = True

    def _quantize_block(self, n: int) -> None:
        """Quantize the n oldest non-sink fp16 tokens of every row into the tiers.

        The fp16 part stays in logical order, so left padding (the oldest tokens) is always
        quantized first, into the low tier, and stays at the front of [low | high | fp16].
        """
        s = self.settings
        n_fp = self.keys.shape[2]
        order = torch.arange(n_fp, device=self.device).expand(self.keys.shape[0], -1)
        by_age = torch.where(self.is_sink, order + n_fp, order).argsort(dim=1)
        block, rest = by_age[:, :n].sort(dim=1).values, by_age[:, n:].sort(dim=1).values
        keys, values, scores, counts, is_real = self._take(block)
        keys, values = overwrite_padding(keys, values, is_real)  # a no-op where all are real (no host wait)
        # one device read for the block: the fewest real tokens of a row (salient_count's rule)
        # and the states' finiteness, which the tiers then need not check each (a read each)
        fewest, keys_ok, values_ok = torch.cat([is_real.sum(dim=1).min().to(torch.float32)[None],
                                                finite_flags(keys, values).to(torch.float32)]).tolist()
        try:
            refuse_nonfinite(keys_ok, values_ok)
        except ValueError as error:
            raise ValueError(f"layer {self.layer_idx}: {error}") from error
        n_high = round(s.salient_ratio * int(fewest)) if s.mixed_precision and s.saliency != "none" else 0
        if n_high == 0:
            self._append(self.low, keys, values, checked=True)
        else:
            low_idx, high_idx = salient_split(scores, counts, is_real, n_high, s.saliency == "probe")
            self._append(self.low, gather_tokens(keys, low_idx), gather_tokens(values, low_idx), checked=True)
            self._append(self.high, gather_tokens(keys, high_idx), gather_tokens(values, high_idx), checked=True)
        is_sink = self.is_sink.gather(1, rest)
        self.keys, self.values, self.score_sum, self.score_count, self.is_real = self._take(rest)
        self.is_sink = is_sink

    def _take(self, index: torch.Tensor):
        """The fp16 part's per-token state at positions index [B, n] of each row."""
        per_head = index[:, None, :].expand(-1, self.keys.shape[1], -1)
        if self.settings.needs_queries:
            scores, counts = self.score_sum.gather(2, per_head), self.score_count.gather(2, index[:, None, :])
        else:
            scores, counts = self.score_sum, self.score_count  # empty: nothing is tracked
        return (
            gather_tokens(self.keys, per_head),
            gather_tokens(self.values, per_head),
            scores,
            counts,
            self.is_real.gather(1, index),
        )

    def _append(self, tier, keys, values, checked: bool = False) -> None:
        """checked: the caller refused NaN / inf already (a packed tier then skips its read)."""
        if not isinstance(tier, Fp16Tier):
            keys, values = self.to_tier_basis(keys, values)
        try:
            if checked and isinstance(tier, PackedTier):
                tier.append(keys, values, checked=True)
            else:
                tier.append(keys, values)
        except ValueError as error:
            raise ValueError(f"layer {self.layer_idx}: {error}") from error

    # -- accounting -------------------------------------------------------------------------
    def held_tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer keeps between forwards (what stats() counts)."""
        if not self.is_initialized:
            return []
        own = [self.keys, self.values, self.score_sum, self.score_count, self.is_real, self.is_sink]
        own += [] if self.rotation is None else self.rotation.tensors()
        return own + [t for tier in self.tiers() for t in tier.tensors()]
