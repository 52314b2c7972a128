"""Shared fixtures: one small generated MVTecAD-format dataset per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
