"""`SlidingZipLayer`: a sliding-window (or chunked-attention) layer, compressed as a packed ring.

A window layer attends only to the newest `window` tokens (Gemma 3's local layers, Mistral's
sliding window; Llama 4's attention chunks: tokens of the query's own chunk, at most the
newest `window` too). It holds a contiguous run of tokens in logical order, [oldest held ..
newest], and reports the oldest one's position as the mask offset (`get_mask_sizes`): the
model's own sliding-window (or chunk) mask, built over exactly those positions, hides every
token that has left the window. So the layer may hold a few expired tokens (the rest of a
quantization group the window has partly left) and drops a group once all of its tokens have
expired: a ring of packed groups over the window.

Storage and policy are a `ZipCacheLayer` (composed, `inner`) with window settings:
- ONE tier (`tier`), at the cache's low-tier bits for keys and values (the `zipkv` preset:
  4-bit keys, 2-bit values). No salient split: every token of a window is recent, and one
  tier keeps the held tokens in logical order, which the ring's front-drop needs.
- Blocks (= key groups, = stream intervals) of `window_block(...)` tokens: about a quarter of
  the window, so expired-but-held tokens and the not-yet-full fp16 block each stay below a
  quarter of the window.
- The newest `residual_length` tokens and the not-yet-full block stay fp16 as in
  ZipCacheLayer; residual_length is capped at window - block, so the fp16 part never holds
  an expired token and only whole packed groups ever leave (`PackedTier.drop_front_groups`).
- No attention sinks: they would leave the window like any other token.

Attention goes through zipkv attention like ZipCacheLayer (the inner layer's `attend`: SDPA
over the dequantized tier + fp16 part, or the packed decode kernel, both with the model's
mask); after it, the groups the next query can no longer see are dropped.

The static (CUDA-graph) form is `StaticSlidingLayer` (cache/static_sliding_layer.py): the
same policy over a ring of reusable key-group slots, masked on the device from token positions.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import replace

from ..attention import forget, hand_queries_to
from .limits import check_positions
from .config import CompressionConfig
from .layer import ZipCacheLayer
from .layer_base import ZipkvLayer, query_length_of
from .tier import PackedTier

KINDS = ("sliding_attention", "chunked_attention")
# The smallest block a window gets when its quarter is smaller (unless stream_interval or
# key_group_size ask for less): a key group's scale and minimum cost 4 bytes per channel, as
# much as 16 tokens' 2-bit codes.
MIN_BLOCK = 16


def window_block(window: int, settings: CompressionConfig) -> int:
    """Tokens per quantized block (each block one key group) of a layer with this window."""
    block = max(MIN_BLOCK, window // 4)
    for limit in (settings.stream_interval, settings.key_group_size, window):
        if limit is not None:
            block = min(block, limit)
    return block


def window_settings(settings: CompressionConfig, window: int) -> CompressionConfig:
    """The cache's settings as a window layer applies them (see the module docstring)."""
    block = window_block(window, settings)
    key_bits, value_bits = settings.tier_bits[1]
    return replace(
        settings, high_bits=key_bits, low_bits=key_bits, high_value_bits=value_bits, low_value_bits=value_bits,
        saliency="none", sink_tokens=0, key_group_size=block, stream_interval=block,
        residual_length=min(settings.residual_length, window - block),
        rotation=None,  # the ring's static form attends unrotated codes: window layers keep them so
    )


def ring_tier(settings: CompressionConfig) -> PackedTier:
    """An empty tier of a window layer (settings: its window_settings): the inner layer's one
    tier (its low tier: with equal bits nothing goes high), with each append's partial key
    group at the front (see PackedTier.front_partial_group). The static form quantizes each
    block into one of these too, so both forms hold the same codes."""
    key_bits, value_bits = settings.tier_bits[1]
    return PackedTier(key_bits, settings.key_group_size, settings.value_group_size, settings.channel_separable,
                      value_bits, front_partial_group=True)


def _inner(name: str, doc: str | None = None) -> property:
    """A read-only attribute that is the inner layer's `name`."""
    return property(lambda layer: getattr(layer.inner, name), doc=doc)


class SlidingZipLayer(ZipkvLayer):
    """One sliding-window or chunked-attention layer of a lossy ZipCache (module docstring)."""

    is_sliding = True  # the model sizes its sliding / chunked mask from this layer

    def __init__(self, settings: CompressionConfig, layer_idx: int, window: int, kind: str = "sliding_attention"):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS} (got {kind!r})")
        field = "sliding_window" if kind == "sliding_attention" else "attention_chunk_size"
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"config.{field} must be an integer >= 1 for a {kind} layer (got {window!r})")
        if settings.lossless:
            raise ValueError("a lossless cache keeps transformers' own window layer (DynamicSlidingWindowLayer)")
        # CacheLayerMixin.__init__ is not called: keys / values / is_initialized are the inner layer's
        self.layer_idx = layer_idx
        self.kind = kind
        self.sliding_window = window  # the name transformers' window layers use
        self.settings = window_settings(settings, window)
        self.block = self.settings.stream_interval
        self.inner = ZipCacheLayer(self.settings, layer_idx)
        self.inner.low = self._ring_tier()
        self.cumulative_length = 0  # tokens seen: the logical length (positions)
        self._group_ends = []  # host copy of tier.group_ends (valid while it ends at tier.num_tokens)

    def _ring_tier(self) -> PackedTier:
        return ring_tier(self.settings)

    # -- what the inner layer holds -------------------------------------------------------------
    tier = _inner("low", "The packed tier of the window's quantized tokens, oldest first.")
    fp16_keys = keys = _inner("keys", "The fp16 part's keys [B, H, n, D]: the newest tokens, after the tier's.")
    fp16_values = values = _inner("values", "The fp16 part's values [B, H, n, D].")
    is_initialized = _inner("is_initialized")
    device = _inner("device")
    awaiting_queries = _inner("awaiting_queries")

    @property
    def owner(self):
        return self.inner.owner

    @owner.setter
    def owner(self, cache) -> None:  # the inner layer tells its cache's notes from others'
        self.inner.owner = cache

    def missing_attention_error(self) -> RuntimeError:
        return self.inner.missing_attention_error()

    def held_tokens(self) -> int:
        """Tokens held (packed + fp16): the newest, up to about a window and a quarter."""
        return self.inner.get_seq_length()

    @property
    def offset(self) -> int:
        """Logical position of the oldest held token."""
        return self.cumulative_length - self.held_tokens()

    def held_tensors(self) -> list:
        return self.inner.held_tensors()

    # -- transformers layer interface -------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        self.inner.lazy_initialization(key_states, value_states)

    def update(self, key_states, value_states, *args, **kwargs):
        check_positions(self, key_states.shape[2])  # the logical length (the inner layer checks nothing)
        keys, values = self.inner.update(key_states, value_states)
        self.cumulative_length += key_states.shape[2]
        # zipkv attention must come to this layer (to drop what expires), not to the inner one
        forget(self.inner)
        hand_queries_to(self)
        return keys, values

    def attend(self, module, query, key, value, attention_mask, scaling, **kwargs):
        output = self.inner.attend(module, query, key, value, attention_mask, scaling, **kwargs)
        self._drop_expired()
        return output

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        """(kv_length, kv_offset): the held tokens plus the new ones, from the oldest held one's
        position; the model's window / chunk overlay on those positions does the rest."""
        held = self.held_tokens()
        return held + query_length_of(query_length), self.cumulative_length - held

    def batch_rows(self) -> int:
        return self.inner.batch_rows()

    def _select_batch(self, index) -> None:
        self.inner.batch_select_indices(index)

    def crop(self, tokens_to_remove: int):
        self.inner.crop(tokens_to_remove)

    def reset(self) -> None:
        self.inner.reset()
        self.inner.low = self._ring_tier()
        self.cumulative_length = 0
        self._group_ends = []

    # -- the ring -------------------------------------------------------------------------------
    def _drop_expired(self) -> None:
        """Drop the packed groups whose every token the next query can no longer see: it sees
        the newest window - 1 held tokens (and itself). The fp16 part never expires (capped)."""
        expired = self.held_tokens() - (self.sliding_window - 1)
        tier = self.tier
        if expired <= 0 or not tier.num_tokens:
            return
        if (self._group_ends[-1] if self._group_ends else 0) != tier.num_tokens:
            self._group_ends = tier.group_ends.tolist()  # one host read per appended block
        n = bisect_right(self._group_ends, expired)
        if n:
            dropped = tier.drop_front_groups(n)
            self._group_ends = [end - dropped for end in self._group_ends[n:]]
