"""Shared fixtures: session-wide rank pools (spawned once, reused by every test module)."""

from __future__ import annotations

import pytest

from tests.harness import RankPool


@pytest.fixture(scope="module")
def cuda_layout():
    """GPU tests: a single-process NCCL group and a TP=1 layout on GPU 0, per test module."""
    import os

    import torch
    import torch.distributed as dist

    from mrl.parallel.layout import ParallelConfig, ParallelLayout
    from tests.harness import _free_port

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port())
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    layout = ParallelLayout.initialize(ParallelConfig())
    layout.seed(1234)
    yield layout
    layout.destroy()
    dist.destroy_process_group()


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
