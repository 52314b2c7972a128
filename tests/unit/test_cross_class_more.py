"""CrossClass beyond the basics: per-class counts, reference seeds, resizing, normal pool, no stray downloads."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from torchvision.transforms.v2 import Compose, Normalize, Resize

TARGETS_PER_CLASS = 12  # 6 good + 6 defective test images per generated class


def _paths(dataset) -> set[str]:
    return {str(p) for p in dataset.samples.image_path}


def test_per_class_counts_in_the_evaluation_loaders(cross_class) -> None:
    datamodule = cross_class(source_categories=["stripes", "dots"], target_categories=["checker", "waves"],
                             eval_batch_size=5)  # fmt: skip
    datamodule.setup()
    assert datamodule.val_categories == ["stripes", "dots"]
    assert datamodule.test_categories == ["checker", "waves"]
    for stage, loader in (("validate", datamodule.val_dataloader()), ("test", datamodule.test_dataloader())):
        counts, labels = [0, 0], [[], []]
        for batch in loader:
            classes = {datamodule.class_index(stage, p) for p in batch.image_path}
            assert len(classes) == 1  # one class per batch: the model switches banks per batch
            index = classes.pop()
            counts[index] += len(batch.image_path)
            labels[index] += batch.gt_label.tolist()
            names = datamodule.val_categories if stage == "validate" else datamodule.test_categories
            assert all(f"/{names[index]}/test/" in p for p in batch.image_path)
        assert counts == [TARGETS_PER_CLASS, TARGETS_PER_CLASS]
        assert [sum(x) for x in labels] == [6, 6]


def test_reference_seed_changes_the_references_and_only_them(cross_class) -> None:
    def setup(seed: int):
        datamodule = cross_class(reference_seed=seed, k_shot=3)
        datamodule.setup()
        return datamodule

    drawn = {seed: setup(seed) for seed in range(5)}
    refs = {seed: tuple(dm.reference_paths("test", 0)) for seed, dm in drawn.items()}
    assert len(set(refs.values())) >= 4  # 220 possible 3-subsets of 12 normals
    assert refs[2] == tuple(setup(2).reference_paths("test", 0))
    assert all(_paths(dm.test_data) == _paths(drawn[0].test_data) for dm in drawn.values())
    assert all(_paths(dm.train_data) == _paths(drawn[0].train_data) for dm in drawn.values())


def test_validation_references_are_source_normals_outside_the_validation_set(cross_class) -> None:
    datamodule = cross_class(k_shot=3)
    datamodule.setup()
    val_paths = _paths(datamodule.val_data)
    for index, name in enumerate(datamodule.val_categories):
        refs = datamodule.reference_paths("validate", index)
        assert len(refs) == 3
        assert all(f"/{name}/train/good/" in p for p in refs)
        assert not set(refs) & val_paths
    assert datamodule.reference_paths("predict", 0) == datamodule.reference_paths("test", 0)


def test_references_are_resized_like_the_batches_but_not_normalised(cross_class) -> None:
    datamodule = cross_class(k_shot=2)
    transform = Compose([Resize((64, 64), antialias=False), Normalize(mean=[0.5] * 3, std=[0.1] * 3)])
    datamodule.trainer = SimpleNamespace(model=SimpleNamespace(pre_processor=SimpleNamespace(transform=transform)))
    datamodule.setup("test")
    refs = datamodule.reference_images("test", 0)
    batch = next(iter(datamodule.test_dataloader()))
    assert tuple(refs.shape) == (2, 3, 64, 64)
    assert tuple(batch.image.shape[1:]) == (3, 64, 64)
    assert float(refs.min()) >= 0
    assert float(refs.max()) <= 1  # un-normalised: the model applies its own Normalize


def test_normal_pool_and_category_column(cross_class) -> None:
    datamodule = cross_class(few_anomalies=1)
    datamodule.setup()
    pool = datamodule.normal_pool()
    assert set(pool) == {"stripes", "dots", "checker"}
    assert all(len(paths) == 12 and all(f"/{name}/train/good/" in p for p in paths) for name, paths in pool.items())
    samples = datamodule.train_data.samples
    assert (samples.category == [p.split("/")[-4] for p in samples.image_path.astype(str)]).all()
    anomalies = samples[samples.label_index == 1]
    assert len(anomalies) == 3
    assert all(str(m).endswith("_mask.png") for m in anomalies.mask_path)
    item = datamodule.train_data[int(anomalies.index[0])]
    assert int(item.gt_mask.sum()) > 0


def test_few_anomalies_too_many_names_class_and_counts(cross_class) -> None:
    with pytest.raises(ValueError, match=r"few_anomalies=7 requested for class 'stripes', which has only 6"):
        cross_class(few_anomalies=7).setup()


def test_prepare_data_never_downloads_into_a_custom_folder(synthetic_root, monkeypatch) -> None:
    """A typo in a class name of one's own MVTecAD-layout folder must not fetch MVTecAD into that folder."""
    import anomalib.data.datamodules.image.mvtecad as mvtecad_module

    from anomalib_cgad.data import CrossClass

    calls = []
    monkeypatch.setattr(mvtecad_module, "download_and_extract", lambda *args: calls.append(args))
    datamodule = CrossClass(source_root=str(synthetic_root), source_categories=["stripes"], target_categories=["wavs"])
    with pytest.raises(FileNotFoundError, match=r"\['wavs'\] not found .* available: \['checker', 'dots'"):
        datamodule.prepare_data()
    assert calls == []


def test_unknown_dataset_lists_the_known_ones() -> None:
    from anomalib_cgad.data import CrossClass

    with pytest.raises(ValueError, match=r"Unknown dataset 'MVTec'; available: \['BTech', 'ELPV', 'MPDD'"):
        CrossClass(source_dataset="MVTec", source_categories=["a"], target_categories=["b"])


def test_empty_image_folders_are_named(tmp_path) -> None:
    from anomalib_cgad.data import CrossClass

    for name in ("src", "tgt"):
        (tmp_path / name / "train" / "good").mkdir(parents=True)
        (tmp_path / name / "test" / "good").mkdir(parents=True)
    datamodule = CrossClass(source_root=str(tmp_path), source_categories=["src"], target_categories=["tgt"])
    # anomalib's own MVTecADDataset refuses an empty class folder and names it
    with pytest.raises((RuntimeError, ValueError), match=r"Found 0 images in .*src$|class 'src' has no train images"):
        datamodule.setup()
