"""ELPV datamodule: counts match the labels file; a clear error without the extra."""

from __future__ import annotations

import importlib.util

import pandas as pd
import pytest

from anomalib_cgad.data import ELPV, CrossClass, ELPVDataset
from anomalib_cgad.data import elpv as elpv_module

needs_elpv = pytest.mark.skipif(importlib.util.find_spec("elpv_dataset") is None, reason="extra 'elpv' not installed")


@needs_elpv
@pytest.mark.parametrize("category", ["mono", "poly"])
def test_counts_match_the_labels_file(category: str) -> None:
    labels = pd.read_csv(elpv_module.elpv_root() / "labels.csv", sep=r"\s+", header=None, names=["p", "prob", "t"])
    of_type = labels[labels.t == category]
    normal, defect = int((of_type.prob == 0).sum()), int((of_type.prob == 1).sum())
    subtle = int(((of_type.prob > 0) & (of_type.prob < 1)).sum())
    train = ELPVDataset(category=category, split="train")
    test = ELPVDataset(category=category, split="test")
    assert (train.samples.label_index == 0).all()
    assert len(train) + int((test.samples.label_index == 0).sum()) == normal
    assert abs(len(train) - normal / 2) <= 1
    assert int((test.samples.label_index == 1).sum()) == defect
    with_subtle = ELPVDataset(category=category, split="test", subtle=True)
    only_subtle = ELPVDataset(category=category, split="test", subtle="only")
    assert int((with_subtle.samples.label_index == 1).sum()) == defect + subtle
    assert int((only_subtle.samples.label_index == 1).sum()) == subtle
    assert not set(train.samples.image_path) & set(test.samples.image_path)
    assert test.task.value == "classification"


@needs_elpv
def test_images_are_rgb_and_the_cross_type_protocol_sets_up() -> None:
    item = ELPVDataset(category="poly", split="train")[0]
    assert tuple(item.image.shape) == (3, 300, 300)
    datamodule = CrossClass(source_dataset="ELPV", source_categories=["mono"], target_categories=["poly"], k_shot=4)
    datamodule.setup()
    assert {datamodule.category_of(p) for p in datamodule.train_data.samples.image_path} == {"mono"}
    refs = set(datamodule.reference_paths("test", 0))
    assert len(refs) == 4
    assert not refs & {str(p) for p in datamodule.test_data.samples.image_path}
    assert ELPV(category="mono").category == "mono"


def test_missing_extra_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setattr(elpv_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(elpv_module.ELPVNotInstalledError, match=r'pip install "anomalib-cgad\[elpv\]"'):
        ELPVDataset(category="mono")


def test_unknown_cell_type_is_named() -> None:
    with pytest.raises(ValueError, match="Unknown ELPV category 'cdte'"):
        elpv_module.make_elpv_samples(None, "cdte", "train")
