"""Protocol presets through anomalib's CLI parsing: ``--config``, overrides, no download, offline ones set up."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml
from anomalib.data import AnomalibDataModule
from jsonargparse import ArgumentParser

from anomalib_cgad.data import CrossClass

PROTOCOLS = Path(__file__).absolute().parents[2] / "configs" / "protocols"
MVTEC = {"bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw", "tile",
         "toothbrush", "transistor", "wood", "zipper"}  # fmt: skip
VISA = {"candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3",
        "pcb4", "pipe_fryum"}  # fmt: skip
EXPECTED = {
    "mvtec_to_visa": ("MVTecAD", MVTEC, "Visa", VISA),
    "visa_to_mvtec": ("Visa", VISA, "MVTecAD", MVTEC),
    "loco_mvtec": ("MVTecAD", MVTEC - {"zipper"}, "MVTecAD", {"zipper"}),
    "elpv_mono_to_poly": ("ELPV", {"mono"}, "ELPV", {"poly"}),
    "elpv_poly_to_mono": ("ELPV", {"poly"}, "ELPV", {"mono"}),
    "custom_folders": ("MVTecAD", {"part_a", "part_b"}, "MVTecAD", {"part_c"}),
}
needs_elpv = pytest.mark.skipif(importlib.util.find_spec("elpv_dataset") is None, reason="extra 'elpv' not installed")


def _datamodule(name: str, *overrides: str) -> CrossClass:
    """Parse a preset the way anomalib's CLI parses ``--config`` (``data`` = any AnomalibDataModule subclass)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("-c", "--config", action="config")
    parser.add_subclass_arguments(AnomalibDataModule, "data")
    parser.add_argument("--trainer", type=dict)  # presets may carry trainer settings; not parsed here
    config = parser.parse_args(["--config", str(PROTOCOLS / f"{name}.yaml"), *overrides])
    return parser.instantiate_classes(config).data


def test_every_preset_is_covered() -> None:
    assert {p.stem for p in PROTOCOLS.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_parses_into_cross_class(name: str) -> None:
    """Construction only validates arguments (no disk access), so every preset instantiates anywhere."""
    raw = yaml.safe_load((PROTOCOLS / f"{name}.yaml").read_text())
    assert raw["data"]["class_path"] == "anomalib_cgad.data.CrossClass"
    datamodule = _datamodule(name)
    source, sources, target, targets = EXPECTED[name]
    assert isinstance(datamodule, CrossClass)
    assert (datamodule.source_dataset, datamodule.target_dataset) == (source, target)
    assert set(datamodule.source_categories) == sources
    assert set(datamodule.test_categories) == targets
    assert datamodule.val_categories == datamodule.source_categories
    if source == target:
        assert not sources & targets
    assert datamodule.k_shot == 4


@pytest.mark.parametrize("name", ["mvtec_to_visa", "visa_to_mvtec", "loco_mvtec", "custom_folders"])
def test_downloadable_presets_without_data_say_where_to_put_it(name: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the presets' relative roots do not exist here
    datamodule = _datamodule(name)
    with pytest.raises(FileNotFoundError, match=r"does not exist\. Put the dataset there \(http"):
        datamodule.setup()
    assert not any(tmp_path.iterdir())  # nothing was downloaded or created


def test_custom_folders_preset_never_downloads_a_public_dataset_into_the_folder(tmp_path, monkeypatch) -> None:
    """Forgetting ``--data.source_root`` must not fetch all of MVTecAD into ./datasets/my_products."""
    import anomalib.data.datamodules.image.mvtecad as mvtecad_module

    calls = []
    monkeypatch.setattr(mvtecad_module, "download_and_extract", lambda *args: calls.append(args))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _datamodule("custom_folders").prepare_data()
    assert calls == []


def test_preset_values_are_overridable_like_on_the_cli() -> None:
    datamodule = _datamodule("loco_mvtec", "--data.target_categories=[zipper]", "--data.source_categories=[bottle]",
                             "--data.k_shot=1", "--data.reference_seed=3")  # fmt: skip
    assert (datamodule.source_categories, datamodule.test_categories) == (["bottle"], ["zipper"])
    assert (datamodule.k_shot, datamodule.reference_seed) == (1, 3)
    with pytest.raises(ValueError, match="both source and target"):
        _datamodule("loco_mvtec", "--data.target_categories=[cable]")


def test_custom_folders_preset_sets_up_on_generated_data(synthetic_root: Path) -> None:
    datamodule = _datamodule(
        "custom_folders",
        f"--data.source_root={synthetic_root}",
        "--data.source_categories=[stripes, dots, checker]",
        "--data.target_categories=[waves]",
    )
    datamodule.setup()
    assert set(datamodule.train_data.samples.category) == {"stripes", "dots", "checker"}
    assert len(datamodule.train_data) == 3 * 12
    assert len(datamodule.val_data) == 3 * 12
    assert len(datamodule.test_data) == 12
    refs = datamodule.reference_paths("test", 0)
    assert len(refs) == 4
    assert all("/waves/train/good/" in p for p in refs)


@needs_elpv
@pytest.mark.parametrize(("name", "source", "target"), [("elpv_mono_to_poly", "mono", "poly"),
                                                        ("elpv_poly_to_mono", "poly", "mono")])  # fmt: skip
def test_elpv_presets_fully_set_up(name: str, source: str, target: str) -> None:
    datamodule = _datamodule(name)
    datamodule.setup()
    train_paths = {str(p) for p in datamodule.train_data.samples.image_path}
    test_paths = {str(p) for p in datamodule.test_data.samples.image_path}
    assert set(datamodule.train_data.samples.category) == {source}
    assert (datamodule.train_data.samples.label_index == 0).all()
    assert not train_paths & test_paths
    assert set(datamodule.test_data.samples.label_index) == {0, 1}
    refs = datamodule.reference_paths("test", 0)
    assert len(refs) == 4
    assert not set(refs) & test_paths
    assert tuple(datamodule.reference_images("test", 0).shape) == (4, 3, 300, 300)
    batch = next(iter(datamodule.test_dataloader()))
    assert batch.image.shape[1] == 3
    assert {datamodule.class_index("test", p) for p in batch.image_path} == {0}


@needs_elpv
def test_anomalib_cli_reads_a_preset() -> None:
    """``anomalib train --model ResAD --config <preset> --data.k_shot 2`` builds the datamodule (not run)."""
    from anomalib.cli import AnomalibCLI

    config = str(PROTOCOLS / "elpv_mono_to_poly.yaml")
    cli = AnomalibCLI(["train", "--model", "ResAD", "--config", config, "--data.k_shot", "2"], run=False)
    assert isinstance(cli.datamodule, CrossClass)
    assert (cli.datamodule.source_categories, cli.datamodule.k_shot) == (["mono"], 2)
    assert cli.datamodule.category == "mono_to_poly"
