"""Shared pytest set-up: GPU tests skip cleanly without CUDA; seeds are fixed per test."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def triton_interpret() -> bool:
    """True when Triton kernels run through the CPU interpreter (as in CI)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
