"""Eviction family: which tokens to keep, at which precision, under which budget.

Pure tensor functions, no model and no cache state: scorers rate tokens, budgets size
layers and heads, tiers map both to {high, low, evicted} index sets in logical order.
"""

from .budgets import (CakeCascade, adakv_head_budgets, budget_from_ratio, cake_allocate, cake_preference,
                      pyramid_budgets, uniform_budgets, zipvl_important_count, zipvl_important_ratio)
from .scorers import (SCORERS, AttentionScorer, CakeScorer, DefensiveKVScorer, H2OScorer, KeyNormScorer, Scorer,
                      SnapKVScorer, StreamingLLMScorer, WindowAttention, ZipCacheScorer, make_scorer,
                      window_attention)
from .select import rank_tokens, select_mask, select_tokens
from .tiers import EVICTED, HIGH, LOW, TierAssignment, assign_tiers
from .token_index import TokenIndex

__all__ = [name for name in dir() if not name.startswith("_")]
