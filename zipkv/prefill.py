"""Chunked prefill: a long prompt through a cache in forwards of at most `chunk_size` tokens.

A single-forward prefill holds the whole prompt's activations at once (at 32K tokens of an 8B
model several GB beside the weights: the MLP's intermediate states, the fp16 K/V of every layer
before a zipkv layer packs them). In chunks, each forward holds only its chunk's activations and
the cache packs what it has seen as it goes, so the peak is set by the chunk, not the prompt.

Which caches take it: transformers' own and the quantizing zipkv caches (ZipCache and its
presets: a later chunk attends to the packed earlier ones exactly as a question after a
compressed context does; `auto` calibrates its recipe on the first chunk). Refused, with the
reason: the eviction caches (except keep-all), whose budget is a ratio of the prompt's length
at its first forward (in chunks, of the first chunk: h2o at ratio 0.5 kept 4 tokens of a
48-token prompt in chunks of 12, 22 in one forward) and whose one-time selections (SnapKV,
PyramidKV, AdaKV, CAKE, ZipVL, ...) would score only the first chunk; MiniCache, which merges
its layer pairs once, after the prompt.
"""

from __future__ import annotations

import torch

from .decode_positions import forget_rope_deltas
from .transformers_support import cache_kwargs


def chunking_refusal(cache) -> str | None:
    """Why `cache` cannot take a chunked prefill (one line), or None."""
    from .cache.eviction_cache import EvictionCache
    from .cache.minicache import MiniCache
    from .policies import KeepPolicy

    if isinstance(cache, MiniCache):
        return "MiniCache merges its layer pairs once, after the prompt's forward"
    if isinstance(cache, EvictionCache) and type(cache.policy) is not KeepPolicy:
        return (f"eviction method {getattr(cache, 'method', type(cache.policy).__name__)!r} sizes its budget from the "
                "prompt's length at its first forward (and a one-time selection scores that forward only): in "
                "chunks, the first chunk's")
    return None


def check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1 (tokens per prefill forward; got {chunk_size!r})")
    return chunk_size


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """position_ids of a (left-)padded prompt, as transformers' generate() makes them."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


@torch.inference_mode()
def chunked_prefill(model, cache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    chunk_size: int = 4096) -> torch.Tensor:
    """Run the prompt input_ids [B, T] ((left-)padded: attention_mask [B, T]) through `cache` in
    forwards of at most chunk_size tokens; returns the last position's logits [B, 1, vocab].
    Positions are the whole prompt's (prompt_positions), each forward sees the mask up to its
    chunk's end. A cache that cannot take chunks (chunking_refusal) raises a ValueError; the
    cache must be empty. With chunk_size >= T it is one forward, as a plain prefill."""
    check_chunk_size(chunk_size)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, length] tensor (got {tuple(input_ids.shape)})")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    reason = chunking_refusal(cache)
    if reason is not None and chunk_size < input_ids.shape[1]:
        raise ValueError(f"chunked prefill (chunk_size={chunk_size}) cannot run on this cache: {reason}; "
                         "prefill in one forward instead (chunk_size=None)")
    if cache.get_seq_length() != 0:
        raise ValueError("cache must be new and empty (chunked_prefill fills it from the prompt)")
    length = input_ids.shape[1]
    positions = prompt_positions(attention_mask)
    forget_rope_deltas(model)  # text position_ids given: an M-RoPE model's deltas are zero
    logits = None
    for start in range(0, length, chunk_size):
        end = min(start + chunk_size, length)
        out = model(input_ids=input_ids[:, start:end], attention_mask=attention_mask[:, :end],
                    position_ids=positions[:, start:end],
                    cache_position=torch.arange(start, end, device=input_ids.device), use_cache=True,
                    logits_to_keep=1, **cache_kwargs(cache))
        logits = out.logits[:, -1:]
        del out
    return logits


__all__ = ["check_chunk_size", "chunked_prefill", "chunking_refusal", "prompt_positions"]
