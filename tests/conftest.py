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


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need a CUDA device of compute capability >= 8.0 and compiled (not
    interpreted) Triton; `realmodel` tests load a Qwen2.5 model from PyPI (about 0.5-1 GB) and
    run only when asked for (`-m realmodel`)."""
    import pytest

    asked = config.getoption("-m") or ""
    has_gpu = (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
               and os.environ.get("TRITON_INTERPRET", "0") != "1")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device (sm80+) without TRITON_INTERPRET=1"))
        if "realmodel" in item.keywords and "realmodel" not in asked:
            item.add_marker(pytest.mark.skip(reason="downloads a Qwen2.5 model: run with -m realmodel"))
