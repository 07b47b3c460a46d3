"""zipkv's attention function, registered in transformers' AttentionInterface as "zipkv".

A compressed cache layer's update() (ZipCacheLayer or EvictingLayer) leaves a note that it waits for this call (see
docs/DESIGN.md); this function hands the call to that layer's attend(), which computes the
output (SDPA over what update returned, or the packed-cache kernel while decoding) and then
scores tokens with the queries and quantizes what is due. Without a note: plain SDPA.
"""

from __future__ import annotations

import threading
import weakref

from .transformers_support import check_installed_transformers

check_installed_transformers()  # as zipkv.cache does: a clear ImportError outside the tested range

from transformers import AttentionInterface  # noqa: E402 (after the version check)
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

ATTENTION_NAME = "zipkv"
# The note: a weak reference to the layer whose update() waits for its queries. Weak, so
# that a note nobody picked up (a forward that failed, a model without zipkv attention)
# never keeps a layer, and through it a whole cache, alive. Thread-local, because a layer's
# update() and its attention call run in the thread of their forward: two threads, each with
# its own cache, never see each other's notes (tests/test_threads.py). One cache must not be
# fed by two threads at once (its layers are not locked).
_waiting = threading.local()


def _waiting_layer():
    ref = getattr(_waiting, "layer", None)
    return None if ref is None else ref()


def hand_queries_to(layer) -> None:
    """Called by a cache layer's update(): its queries should come to `layer`."""
    previous = _waiting_layer()
    # A note of the same cache still waiting means its attention call never came (a note
    # left by another cache, e.g. one abandoned after an error, is simply replaced).
    owner = getattr(previous, "owner", None)
    if previous is not None and previous is not layer and previous.awaiting_queries and owner is not None and owner is getattr(layer, "owner", None):
        raise previous.missing_attention_error()
    _waiting.layer = weakref.ref(layer)


def forget(layer) -> None:
    """Withdraw `layer`'s note (a layer fed recorded states: no attention call will come)."""
    if _waiting_layer() is layer:
        _waiting.layer = None


def _take_waiting_layer(layer_idx):
    layer = _waiting_layer()
    if layer is not None and layer.layer_idx == layer_idx:
        _waiting.layer = None
        return layer
    return None


def zipkv_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    layer = _take_waiting_layer(getattr(module, "layer_idx", None))
    if layer is None:  # no compressing cache behind this call: plain SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    check_attention_kwargs(kwargs, module)
    owner = getattr(layer, "owner", None)
    if query.shape[2] > 1 and getattr(owner, "static_after_prompt", None) is not None:
        owner.note_prompt_mask(attention_mask, query.shape[0])  # generate() on the compiled path
    return layer.attend(module, query, key, value, attention_mask, scaling, **kwargs)


# Arguments that change attention's arithmetic (logit soft-capping, attention sinks, additive
# position biases). zipkv's decode kernels and eviction masks do not apply them, so a model
# that passes one gets an error at its first forward instead of answers computed without it.
UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")


def check_attention_kwargs(kwargs: dict, module=None) -> None:
    """Raise a clear error for attention arguments no zipkv attention path honours."""
    given = sorted(name for name in UNSUPPORTED_KWARGS if kwargs.get(name) is not None)
    if given:
        where = f" ({type(module).__name__} layer {getattr(module, 'layer_idx', '?')})" if module is not None else ""
        raise ValueError(
            f"zipkv caches cannot honour the attention argument(s) {given} this model passes{where}: its packed "
            "decode kernels and eviction masks compute plain softmax attention. Use transformers' DynamicCache "
            "for this model, or open an issue with the model name."
        )


def register() -> None:
    # The mask function must be registered with the attention function: without it the
    # model passes attention_mask=None and SDPA's top-left causal alignment silently breaks
    # every multi-token forward on top of a cache (transformers-notes.md).
    AttentionInterface.register(ATTENTION_NAME, zipkv_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


SUPPORTED_INNER = ("sdpa", "eager", None, ATTENTION_NAME)


def enable_zipkv_attention(model_or_config, needs: str = "zipkv's caches need") -> None:
    """Switch a model (or its text config) to zipkv attention, which every zipkv cache
    (quantizing or evicting) reads its queries and masks through. SDPA computes outputs."""
    register()
    config = getattr(model_or_config, "config", model_or_config)
    text_config = config.get_text_config(decoder=True)
    current = getattr(text_config, "_attn_implementation", None)
    if current not in SUPPORTED_INNER:
        raise ValueError(
            f"attn_implementation {current!r} is not supported: {needs} zipkv attention, which wraps "
            "'sdpa' or 'eager'; load the model with attn_implementation='sdpa'"
        )
    text_config._attn_implementation = ATTENTION_NAME
