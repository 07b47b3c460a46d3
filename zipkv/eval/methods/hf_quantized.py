"""Baseline: transformers' QuantizedCache (quanto / hqq / fp8 backends).

It dequantizes the whole stored cache at every step and re-quantizes all of it when its
fp16 residual fills, so it saves storage only. Bytes are measured on what its layers
hold: packed codes, scales and zero points, and the fp16 residual.
"""
from __future__ import annotations

import importlib.util

from .accounting import measured_stats
from .base import Method, MethodUnavailable

BACKENDS = {
    # method name -> (backend, package that must be importable, pip command)
    "hf-quanto": ("quanto", "optimum.quanto", "pip install optimum-quanto"),
    "hf-hqq": ("hqq", "hqq", "pip install hqq"),
    "hf-fp8": ("fp8", None, None),
}
# Backends that transformers added after its oldest supported release (5.2): the layer class
# QuantizedCache builds for it, and the first release that has it (before it, QuantizedCache
# raises "Unknown quantization backend" at the first cache; here that is a MethodUnavailable
# naming the version, when the method is resolved).
LATER_BACKENDS = {"fp8": ("Fp8QuantizedLayer", "5.21")}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


class HFQuantizedMethod(Method):
    def __init__(self, spec) -> None:
        super().__init__(spec)
        if spec.name not in BACKENDS:
            raise ValueError(f"method must be one of {sorted(BACKENDS)}, got {spec.name!r}")
        self.backend, module, pip = BACKENDS[spec.name]
        if module and not _importable(module):
            raise MethodUnavailable(f"{spec.name} needs {module}: {pip}")
        if self.backend in LATER_BACKENDS:
            import transformers
            from transformers import cache_utils

            layer, since = LATER_BACKENDS[self.backend]
            if not hasattr(cache_utils, layer):
                raise MethodUnavailable(f"{spec.name} needs transformers >= {since} (its QuantizedCache has no "
                                        f"{self.backend!r} backend before; installed: {transformers.__version__})")

    def new_cache(self, model):
        from transformers import QuantizedCache

        return QuantizedCache(self.backend, model.config, **self.spec.params)

    def stats(self, cache, config, tokens_seen: int) -> dict[str, float]:
        return measured_stats(cache, config, tokens_seen)
