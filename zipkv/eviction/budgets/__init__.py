"""Budgets: how many tokens each layer (and head) keeps.

The `*_layer_counts` functions are the rules of `SelectPolicy` (zipkv/policies/select.py,
its BUDGET_RULES table), all of one signature:
`counts(scores [B, H, T], budgets int64 [B], real bool [B, T], *, layer, num_layers, window,
**rule parameters) -> int64 [B] or [B, H]`."""

from .adakv import adakv_head_budgets, adakv_layer_counts
from .cake import CakeCascade, cake_allocate, cake_preference
from .pyramid import pyramid_budgets, pyramid_layer_counts
from .uniform import budget_from_ratio, uniform_budgets, uniform_layer_counts
from .zipvl import zipvl_important_count, zipvl_important_ratio

__all__ = [
    "adakv_head_budgets", "CakeCascade", "cake_allocate", "cake_preference", "pyramid_budgets",
    "budget_from_ratio", "uniform_budgets", "zipvl_important_count", "zipvl_important_ratio",
    "adakv_layer_counts", "pyramid_layer_counts", "uniform_layer_counts",
]
