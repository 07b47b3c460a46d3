"""Baseline: NVIDIA kvpress presses (optional, separate environment).

kvpress 0.5.5 pins transformers < 5.3, so it runs beside zipkv only with
transformers 5.2.x (zipkv supports >= 5.2):

    python -m venv .venv-kvpress && . .venv-kvpress/bin/activate
    pip install torch==2.13.0 && pip install "transformers==5.2.0" kvpress==0.5.5
    pip install -e ".[eval]" "transformers==5.2.0"   (full list: zipkv/eval/README.md)

Spec examples: kvpress-snapkv:compression_ratio=0.5, kvpress-adakv:press=snapkv,compression_ratio=0.5.
A press hooks the attention modules during the context prefill and prunes the
DynamicCache there; the question is then decoded with explicit positions. Bytes are
measured on the cache tensors afterwards, so head-wise presses that only mask keys
(AdaKV, DuoAttention, ...) honestly report no saving.
"""
from __future__ import annotations

import importlib
from typing import Any

import torch

from .accounting import measured_stats
from .base import Method, MethodUnavailable

# short names -> kvpress class names
PRESSES = {
    "snapkv": "SnapKVPress",
    "streamingllm": "StreamingLLMPress",
    "knorm": "KnormPress",
    "tova": "TOVAPress",
    "expected_attention": "ExpectedAttentionPress",
    "observed_attention": "ObservedAttentionPress",
    "random": "RandomPress",
    "pyramidkv": "PyramidKVPress",
    "adakv": "AdaKVPress",  # head-wise: masks keys, the cache keeps its size
}
PREFIX = "kvpress-"


class KvpressMethod(Method):
    def __init__(self, spec) -> None:
        super().__init__(spec)
        class_name = spec.name[len(PREFIX):] if spec.name.startswith(PREFIX) else spec.name
        try:
            kvpress = importlib.import_module("kvpress")
        except ImportError as e:
            raise MethodUnavailable(
                f"kvpress cannot be imported ({type(e).__name__}: {e}); it needs transformers < 5.3 "
                "(see zipkv/eval/methods/kvpress_method.py)"
            ) from e
        params = dict(spec.params)
        inner = params.pop("press", None)
        if inner is not None:
            # wrapper presses (AdaKVPress, PerLayerCompressionPress...): press=NAME builds the
            # inner scorer press, which takes the compression_ratio
            inner_kwargs = {"compression_ratio": params.pop("compression_ratio")} if "compression_ratio" in params else {}
            params["press"] = self._press_class(kvpress, str(inner))(**inner_kwargs)
        self.press = self._press_class(kvpress, class_name)(**params)

    @staticmethod
    def _press_class(kvpress, name: str):
        class_name = PRESSES.get(name.lower(), name)
        press_class = getattr(kvpress, class_name, None)
        if press_class is None:
            raise ValueError(f"kvpress has no press {class_name!r}; short names: {sorted(PRESSES)}")
        return press_class

    def new_cache(self, model):
        from transformers import DynamicCache

        return DynamicCache(config=model.config)

    def prefill(self, model):
        return self.press(model)

    def forward_kwargs(self, start: int, n: int) -> dict[str, Any]:
        # kvpress reads cache_position from the attention kwargs (transformers < 5.3 passes it on)
        return {"cache_position": torch.arange(start, start + n)}

    def stats(self, cache, config, tokens_seen: int) -> dict[str, float]:
        return measured_stats(cache, config, tokens_seen)
