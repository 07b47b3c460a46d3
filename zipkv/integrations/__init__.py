"""Adapters that plug zipkv's caches into other tools (lm-evaluation-harness: `lm_eval.py`).

Each adapter imports its tool only when used, so zipkv itself does not depend on it.
"""
