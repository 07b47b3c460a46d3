"""Compression methods as the evaluation runs them: zipkv's and the baselines."""
from __future__ import annotations

from typing import Callable

from ...registry import METHODS

from .base import Method, MethodUnavailable
from .hf_quantized import BACKENDS as HF_BACKENDS
from .hf_quantized import HFQuantizedMethod
from .kvpress_method import PREFIX as KVPRESS_PREFIX
from .kvpress_method import KvpressMethod
from .reference import NAME as DYNAMIC_NAME
from .reference import DynamicCacheMethod
from .spec import MethodSpec
from .zipkv_methods import ZipkvMethod

Resolver = Callable[[MethodSpec], Method]


def resolve(spec: MethodSpec | str) -> Method:
    """hf-dynamic -> transformers' DynamicCache (uncompressed, model dtype); hf-quanto /
    hf-hqq / hf-fp8 -> transformers' QuantizedCache; kvpress-NAME -> a kvpress press;
    any other name -> zipkv.make_cache(name, ...)."""
    if isinstance(spec, str):
        spec = MethodSpec.parse(spec)
    if spec.name == DYNAMIC_NAME:
        return DynamicCacheMethod(spec)
    if spec.name in HF_BACKENDS:
        return HFQuantizedMethod(spec)
    if spec.name.startswith(KVPRESS_PREFIX):
        return KvpressMethod(spec)
    if spec.name not in METHODS:
        baselines = [DYNAMIC_NAME, *HF_BACKENDS, f"{KVPRESS_PREFIX}NAME"]
        raise ValueError(f"method must be one of {sorted(METHODS)} or a baseline {baselines} (got {spec.name!r})")
    return ZipkvMethod(spec)


def check_methods(specs, resolver: Resolver = resolve) -> None:
    """Resolve every spec once, so a bad name or parameter raises ValueError before a model
    loads (zipkv names are checked against zipkv.METHODS). A method whose package is missing
    is not an error here: the runner skips it with a note."""
    for spec in specs:
        try:
            resolver(spec)
        except MethodUnavailable:
            pass


__all__ = ["DynamicCacheMethod", "Method", "MethodSpec", "MethodUnavailable", "Resolver", "check_methods", "resolve",
           "HFQuantizedMethod", "KvpressMethod", "ZipkvMethod"]
