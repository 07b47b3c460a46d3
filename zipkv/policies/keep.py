"""KeepPolicy: no eviction, the lossless reference on the evicting machinery ("full")."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Policy


@dataclass
class KeepPolicy(Policy):
    """Keeps every token. record=True also keeps the first forward's queries on each layer
    (recorded_query, recorded_scaling), so many caches can be built from one prefill."""

    record: bool = False
    needs_queries = False

    def on_prefill(self, layer, query, scaling):
        if self.record:
            layer.recorded_query = query
            layer.recorded_scaling = scaling


__all__ = ["KeepPolicy"]
