"""Shared fixtures: one small generated MVTecAD-format dataset per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config) -> None:
    """In a pytest-xdist worker, torch gets this worker's share of the cores, not all of them.

    Two workers with torch's default (a thread per core) each on a 2-core machine would run four threads on two
    cores; one each keeps both cores busy without the threads fighting over them.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        # a count the user set wins; either way the in-process runs and the CLIs a test starts use the same one,
        # so their sums add up in the same order (a checkpoint's CLI metrics are compared exactly)
        threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // workers))
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


SOURCES = ("stripes", "dots", "checker")
TARGETS = ("waves",)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Four generated classes, 12 train / 6 good / 6 defective test images each, 96 px."""
    from anomalib_cgad.data import make_synthetic_mvtec

    return make_synthetic_mvtec(tmp_path_factory.mktemp("synthetic"), categories=(*SOURCES, *TARGETS), seed=0)


@pytest.fixture
def cross_class(synthetic_root):
    """A CrossClass datamodule: three source classes, one unseen target class, k = 2."""
    from anomalib_cgad.data import CrossClass

    def make(**kwargs):
        options = {
            "source_dataset": "MVTecAD",
            "source_root": str(synthetic_root),
            "source_categories": list(SOURCES),
            "target_categories": list(TARGETS),
            "k_shot": 2,
            "train_batch_size": 8,
            "eval_batch_size": 8,
        }
        options.update(kwargs)
        return CrossClass(**options)

    return make
