"""CrossClass: class separation, references, few anomalies, clear errors."""

from __future__ import annotations

import pytest

from anomalib_cgad.data import CrossClass


def _paths(dataset) -> set[str]:
    return {str(p) for p in dataset.samples.image_path}


def test_source_and_target_never_overlap(cross_class) -> None:
    datamodule = cross_class()
    datamodule.setup()
    train_classes = {datamodule.category_of(p) for p in _paths(datamodule.train_data)}
    assert train_classes == {"stripes", "dots", "checker"}
    assert all("/waves/" not in p for p in _paths(datamodule.train_data) | _paths(datamodule.val_data))
    assert all("/waves/" in p for p in _paths(datamodule.test_data))
    with pytest.raises(ValueError, match=r"\['dots'\] are both source and target"):
        cross_class(target_categories=["dots"])


def test_references_are_never_tested_and_come_from_train_normals(cross_class) -> None:
    datamodule = cross_class(k_shot=4)
    datamodule.setup()
    refs = datamodule.reference_paths("test", 0)
    assert len(refs) == 4
    assert all("/waves/train/good/" in p for p in refs)
    assert not set(refs) & _paths(datamodule.test_data)
    images = datamodule.reference_images("test", 0)
    assert tuple(images.shape) == (4, 3, 96, 96)
    assert float(images.min()) >= 0
    assert float(images.max()) <= 1


def test_reference_dataset_holds_the_same_references_in_order(cross_class) -> None:
    import torch

    datamodule = cross_class(k_shot=3)
    datamodule.setup()
    for stage, index in (("test", 0), ("predict", 0), ("validate", 1)):
        references = datamodule.reference_dataset(stage, index)
        assert [str(p) for p in references.samples.image_path] == datamodule.reference_paths(stage, index)
        assert set(references.samples.label_index.tolist()) == {0}
        images = torch.stack([references[i].image for i in range(len(references))])
        assert torch.equal(images, datamodule.reference_images(stage, index))
    assert datamodule.reference_paths("validate", 1) != datamodule.reference_paths("test", 0)


def test_same_reference_seed_same_references(cross_class) -> None:
    def refs(seed: int) -> list[str]:
        datamodule = cross_class(reference_seed=seed, k_shot=3)
        datamodule.setup()
        return datamodule.reference_paths("test", 0)

    assert refs(0) == refs(0)
    assert refs(0) != refs(1) or refs(0) != refs(2)


def test_k_shot_larger_than_available_names_class_and_counts(cross_class) -> None:
    datamodule = cross_class(k_shot=13)
    with pytest.raises(ValueError, match=r"k_shot=13 references requested for class '\w+', but it has only 12"):
        datamodule.setup()


def test_few_anomalies_come_from_source_test_splits_only(cross_class) -> None:
    datamodule = cross_class(few_anomalies=2)
    datamodule.setup()
    train = datamodule.train_data.samples
    anomalies = train[train.label_index == 1]
    assert len(anomalies) == 2 * 3
    assert all("/test/" in p and "/waves/" not in p for p in anomalies.image_path)
    assert not set(anomalies.image_path.astype(str)) & _paths(datamodule.val_data)


def test_evaluation_batches_hold_one_class(cross_class) -> None:
    datamodule = cross_class(eval_batch_size=5)
    datamodule.setup()
    for batch in datamodule.val_dataloader():
        classes = {datamodule.class_index("validate", p) for p in batch.image_path}
        assert len(classes) == 1
    counts = [0, 0, 0]
    for batch in datamodule.val_dataloader():
        counts[datamodule.class_index("validate", batch.image_path[0])] += len(batch.image_path)
    assert counts == [12, 12, 12]


def test_missing_root_and_unknown_class_are_named(tmp_path, synthetic_root) -> None:
    missing = CrossClass(source_root=str(tmp_path / "nope"), source_categories=["a"], target_categories=["b"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        missing.setup()
    unknown = CrossClass(source_root=str(synthetic_root), source_categories=["stripes"], target_categories=["zebra"])
    with pytest.raises(FileNotFoundError, match=r"\['zebra'\] not found .* available: \['checker', 'dots'"):
        unknown.setup()
    (tmp_path / "empty" / "cls" / "train" / "good").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "test" / "good").mkdir(parents=True)
    (tmp_path / "empty" / "tgt").mkdir(parents=True)
    empty = CrossClass(source_root=str(tmp_path / "empty"), source_categories=["cls"], target_categories=["tgt"])
    with pytest.raises((ValueError, FileNotFoundError, RuntimeError), match=r"cls|no train images|tgt"):
        empty.setup()
