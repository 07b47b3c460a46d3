"""zipkv's own methods, through the public factory `zipkv.make_cache` (DESIGN.md)."""
from __future__ import annotations

from .base import Method, MethodUnavailable


def _factory():
    try:
        import zipkv
    except ImportError as e:  # pragma: no cover - zipkv is this package
        raise MethodUnavailable(f"cannot import zipkv: {e}") from e
    make_cache = getattr(zipkv, "make_cache", None)
    if make_cache is None:
        raise MethodUnavailable("this zipkv build has no zipkv.make_cache yet")
    return make_cache


class ZipkvMethod(Method):
    def __init__(self, spec) -> None:
        from ...registry import check_method

        # a bad name or value fails here, when the run is planned, not in every case's row
        check_method(spec.name, spec.params)
        super().__init__(spec)

    def new_cache(self, model):
        return _factory()(self.spec.name, model.config, **self.spec.params)

    def stats(self, cache, config, tokens_seen: int) -> dict[str, float]:
        # CacheStats is the cache's own measurement of what it really holds.
        stats = cache.stats()
        # scalars only: per-layer lists would swell every row
        out = {k: v for k, v in stats.to_dict().items() if not isinstance(v, (list, tuple, dict))}
        tokens = getattr(stats, "tokens_per_layer", None)
        if tokens:
            out["tokens_held_max"] = max(tokens)
            out["tokens_held_min"] = min(tokens)
        out["bytes_held"] = float(stats.bytes_held)
        out["fp16_bytes"] = float(stats.fp16_bytes)
        out["ratio"] = float(stats.ratio)
        return out
