"""Shared fixtures (helpers that tests import live in tests/support.py)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from kdcache.storage import CacheSpec  # noqa: E402


@pytest.fixture
def full_spec() -> CacheSpec:
    """Every column kind at once, small enough to write in milliseconds."""
    return CacheSpec(vocab_size=300, max_length=12, targets="topk", k=8, hidden_layers=(0, 2), hidden_size=16,
                     attention_layers=(2,), num_heads=2, mlm=True, num_labels=3, has_labels=True)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: without it they are deselected (counted as such, never silently passed).
    pipeline/bench/gpu_check.sh runs them on a GPU machine."""
    import torch

    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]
