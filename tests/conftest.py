from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Eager runs of the generated functions are cheap; compiled plans are cached process-wide, so tests
# that compile reuse the same few plans.
# The default profile (CI) draws the same examples every run, so a red CI means a change broke
# something, never an unlucky draw; HYPOTHESIS_PROFILE=thorough explores with fresh randomness.
settings.register_profile(
    "default", deadline=None, max_examples=25, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
