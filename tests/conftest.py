"""Shared fixtures: session-wide rank pools (spawned once, reused by every test module)."""

from __future__ import annotations

import pytest

from tests.harness import RankPool


@pytest.fixture(scope="session")
def ranks2():
    pool = RankPool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def ranks4():
    pool = RankPool(4)
    yield pool
    pool.close()


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
