"""Test-wide settings."""

import os
import sys

import torch
from hypothesis import HealthCheck, settings

# Tiny tensors: one thread avoids thread-pool overhead that dominates on a busy 2-core box.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny_models.py

# Fuzz tests (tests/test_fuzz_*.py): fixed examples (derandomize), no example database on
# disk, no per-example deadline (a 2-core CI box is noisy), a bounded count so the whole fuzz
# set stays under a minute. HYPOTHESIS_PROFILE=deep explores more for a local hunt.
settings.register_profile("ci", derandomize=True, database=None, deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("deep", deadline=None, max_examples=2000, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
