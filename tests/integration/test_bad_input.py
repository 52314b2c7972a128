"""Bad input, one test per case: every one gives a clear error naming the problem, or works, never a silent NaN.

Cases and the chosen behaviour:

- missing / empty dataset root, unknown class, k-shot larger than the normal images: ``CrossClass`` errors;
- reference images (``few_shot_source``) of mixed sizes, grayscale, RGBA or 16-bit: resized/converted, scored;
- dataset images of mixed sizes, grayscale or RGBA: scored (16-bit ones too: ``test_input_policy.py``);
- a corrupt reference file: ``ReferenceError`` naming it; a corrupt dataset image: skipped with a warning
  naming it with ``bad_images="skip"`` (the default, ``"stop"``, is in ``test_input_policy.py``);
- a bank of another backbone or image size: ``BankMismatchError`` naming the mismatch;
- a checkpoint of another model or another checkpoint format: ``CheckpointMismatchError``;
- NaN/inf in reference images, query images, features or weights: ``NonFiniteError`` / ``BankMismatchError``.
- impossible episode options of MetaAD and CGAD (k_shot < 1, unknown direction or margin): ``ValueError``
  when the model is built.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from anomalib.data import ImageBatch
from anomalib.engine import Engine
from PIL import Image

from anomalib_cgad import CGAD, MetaAD, ResAD
from anomalib_cgad.components.reference_bank import BankMismatchError
from anomalib_cgad.data import CrossClass
from anomalib_cgad.models.base import CheckpointMismatchError, NonFiniteError, ReferenceError, load_images
from anomalib_cgad.models.options import regroup_arguments

SIZE = (64, 64)


def _model(model_cls=CGAD, size=SIZE, **kwargs):
    kwargs = regroup_arguments(model_cls, kwargs)
    return model_cls(pre_processor=model_cls.configure_pre_processor(size), visualizer=False, **kwargs)


def _good(root: Path, category: str = "waves", split: str = "train") -> list[Path]:
    return sorted((root / category / split / "good").glob("*.png"))


def _convert(path: Path, target: Path, how: str) -> Path:
    rgb = Image.open(path).convert("RGB")
    if how == "size":
        rgb.resize((80, 56)).save(target)
    elif how == "gray":
        rgb.convert("L").save(target)
    elif how == "rgba":
        rgb.convert("RGBA").save(target)
    elif how == "16bit":
        Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257).save(target)
    else:
        rgb.save(target)
    return target


def _scores(model, images: torch.Tensor) -> torch.Tensor:
    """Score ``images`` through ``predict_step``, normalised first as anomalib's PreProcessor callback does."""
    model.eval()
    image = model.pre_processor.transform(images)
    batch = ImageBatch(image=image, image_path=[f"query_{i}.png" for i in range(len(images))])
    with torch.no_grad():
        return model.predict_step(batch, 0).pred_score


def _copy_root(synthetic_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for category in ("stripes", "waves"):
        shutil.copytree(synthetic_root / category, root / category)
    return root


def _datamodule(root: Path, **kwargs) -> CrossClass:
    options = {"source_root": str(root), "source_categories": ["stripes"], "target_categories": ["waves"], "k_shot": 2}
    return CrossClass(**{**options, **kwargs})


def _checkpoint(model, path: Path) -> Path:
    """A checkpoint as Lightning writes it: state dict, hyper-parameters, then the module's own hook."""
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


# ----------------------------------------------------------------- datasets
def test_missing_dataset_root(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"MVTecAD root '.*nowhere' does not exist\. Put the dataset there"):
        _datamodule(tmp_path / "nowhere").setup()


def test_empty_dataset_root(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"classes \['stripes'\] not found under '.*empty'; available: none"):
        _datamodule(tmp_path / "empty").setup()
    for category in ("stripes", "waves"):
        (tmp_path / "hollow" / category).mkdir(parents=True)
    with pytest.raises(ValueError, match=r"MVTecAD class 'stripes' has no train images under '.*hollow'"):
        _datamodule(tmp_path / "hollow").setup()


def test_unknown_class_name(synthetic_root) -> None:
    with pytest.raises(FileNotFoundError, match=r"classes \['wavez'\] not found under .* available: \['checker'"):
        _datamodule(synthetic_root, target_categories=["wavez"]).setup()


def test_k_shot_larger_than_the_normal_images_of_a_class(synthetic_root) -> None:
    with pytest.raises(ValueError, match=r"k_shot=13 references requested for class 'waves', but it has only 12"):
        _datamodule(synthetic_root, k_shot=13).setup()


def test_k_shot_larger_than_the_few_shot_source_folder(synthetic_root, tmp_path) -> None:
    folder = tmp_path / "refs"
    folder.mkdir()
    for path in _good(synthetic_root)[:2]:
        shutil.copy(path, folder)
    model = _model(k_shot=4, few_shot_source=str(folder))
    with pytest.raises(ReferenceError, match=r"few_shot_source '.*refs' has 2 images; k_shot=4"):
        model._reference_images("test", 0)


def test_empty_few_shot_source_folder(tmp_path) -> None:
    (tmp_path / "refs").mkdir()
    model = _model(k_shot=1, few_shot_source=str(tmp_path / "refs"))
    with pytest.raises(ReferenceError, match=r"Reference folder '.*refs' holds no images"):
        model._reference_images("test", 0)


# ----------------------------------------------------------------- image formats
def test_mixed_image_sizes_in_few_shot_source_are_resized_and_scored(synthetic_root, tmp_path) -> None:
    folder = tmp_path / "refs"
    folder.mkdir()
    sources = _good(synthetic_root)
    _convert(sources[0], folder / "a.png", "size")
    _convert(sources[1], folder / "b.png", "rgb")
    assert {Image.open(p).size for p in folder.iterdir()} == {(80, 56), (96, 96)}
    model = _model(k_shot=2, few_shot_source=str(folder))
    references = model._reference_images("test", 0)
    assert references.shape == (2, 3, *SIZE)
    model.set_references(references)
    scores = _scores(model, load_images(_good(synthetic_root, split="test")[:2], SIZE))
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize(("how", "mode"), [("gray", "L"), ("rgba", "RGBA"), ("16bit", "I;16")])
def test_grayscale_rgba_and_16bit_references_score(how, mode, synthetic_root, tmp_path) -> None:
    folder = tmp_path / "refs"
    folder.mkdir()
    for i, path in enumerate(_good(synthetic_root)[:2]):
        _convert(path, folder / f"{i}.png", how)
    assert {Image.open(p).mode for p in folder.iterdir()} == {mode}
    model = _model(k_shot=2, few_shot_source=str(folder))
    references = model._reference_images("test", 0)
    assert references.shape == (2, 3, *SIZE)
    assert float(references.std()) > 0.05  # not clipped to a flat (white) image
    model.set_references(references)
    assert torch.isfinite(_scores(model, load_images(_good(synthetic_root, split="test")[:2], SIZE))).all()


def test_mixed_sizes_grayscale_and_rgba_dataset_images_are_scored(synthetic_root, tmp_path) -> None:
    root = _copy_root(synthetic_root, tmp_path)
    for split in ("train", "test"):
        for path, how in zip(_good(root, split=split), ("size", "gray", "rgba"), strict=False):
            _convert(path, path, how)
    datamodule = _datamodule(root, eval_batch_size=4)
    engine = Engine(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    predictions = engine.predict(model=_model(), datamodule=datamodule)
    scores = torch.cat([batch.pred_score for batch in predictions])
    assert len(scores) == len(datamodule.test_data) == 12
    assert torch.isfinite(scores).all()


def test_corrupt_reference_file_gives_a_clear_error_naming_it(synthetic_root, tmp_path) -> None:
    folder = tmp_path / "refs"
    folder.mkdir()
    shutil.copy(_good(synthetic_root)[0], folder / "a.png")
    (folder / "b.png").write_bytes(b"not an image")
    model = _model(k_shot=2, few_shot_source=str(folder))
    with pytest.raises(ReferenceError, match=r"Could not read reference image '.*b\.png': cannot identify image file"):
        model._reference_images("test", 0)


def test_corrupt_dataset_image_is_skipped_with_a_warning_naming_it(synthetic_root, tmp_path) -> None:
    root = _copy_root(synthetic_root, tmp_path)
    bad = _good(root, split="test")[5]
    bad.write_bytes(b"truncated by the line PC")
    datamodule = _datamodule(root, bad_images="skip")
    with pytest.warns(UserWarning, match=r"class 'waves' \(test\): skipping 1 unreadable image file\(s\): .*005\.png"):
        datamodule.setup()
    assert len(datamodule.test_data) == 11
    assert str(bad) not in set(map(str, datamodule.test_data.samples.image_path))


# ----------------------------------------------------------------- banks
def _saved_bank(synthetic_root, tmp_path, size=SIZE) -> Path:
    model = _model(ResAD, size=size)
    model.set_references(load_images(_good(synthetic_root)[:2], size))
    return model.save_bank(tmp_path / "bank.npz")


def test_bank_of_another_backbone(synthetic_root, tmp_path) -> None:
    path = _saved_bank(synthetic_root, tmp_path)
    other = _model(ResAD, backbone="resnet18", layers=(1, 2), backbone_weights=None)
    with pytest.raises(BankMismatchError, match=r"backbone: bank has 'tf_efficientnet_lite0', model has 'resnet18'"):
        other.load_bank(path)


def test_bank_of_another_image_size(synthetic_root, tmp_path) -> None:
    path = _saved_bank(synthetic_root, tmp_path)
    other = _model(ResAD, size=(96, 96))
    with pytest.raises(BankMismatchError, match=r"image_size: bank has \[64, 64\], model has \[96, 96\]"):
        other.load_bank(path)


def test_bank_file_is_never_overwritten(synthetic_root, tmp_path) -> None:
    path = _saved_bank(synthetic_root, tmp_path)
    before = path.read_bytes()
    model = _model(ResAD)
    model.set_references(load_images(_good(synthetic_root)[2:4], SIZE))
    with pytest.raises(FileExistsError, match=r"Refusing to overwrite existing bank file '.*bank\.npz'"):
        model.save_bank(path)
    assert path.read_bytes() == before


def test_openvino_export_never_overwrites_an_existing_export(synthetic_root, tmp_path) -> None:
    from anomalib_cgad.deploy.openvino import export_swappable_bank, swappable_targets

    model = _model()
    model.set_references(load_images(_good(synthetic_root)[:2], SIZE))
    existing = swappable_targets(tmp_path)[0]
    existing.parent.mkdir(parents=True)
    existing.write_text("the user's earlier export")
    with pytest.raises(FileExistsError, match=r"Refusing to overwrite an existing export: \['.*bank_model\.xml'\]"):
        export_swappable_bank(model, tmp_path)
    assert existing.read_text() == "the user's earlier export"
    assert sorted(p.name for p in existing.parent.iterdir()) == [existing.name]


# ----------------------------------------------------------------- checkpoints
def test_checkpoint_of_another_model(tmp_path) -> None:
    resad = _checkpoint(_model(ResAD, flow={"coupling_blocks": 2}), tmp_path / "resad.ckpt")
    with pytest.raises(CheckpointMismatchError, match=r"holds a ResAD model, not CGAD: load it with ResAD\."):
        CGAD.load_from_checkpoint(resad)
    with pytest.raises(CheckpointMismatchError, match=r"holds a ResAD model, not CGAD"):
        _model(CGAD).on_load_checkpoint(torch.load(resad, weights_only=True))  # anomalib test --ckpt_path path


def test_checkpoint_of_another_anomalib_model(tmp_path) -> None:
    from anomalib.models import Padim

    padim = _checkpoint(Padim(backbone="resnet18", pre_trained=False, layers=["layer1"], n_features=32), tmp_path / "p")
    with pytest.raises(CheckpointMismatchError, match=r"is not an anomalib-cgad CGAD checkpoint \(it has no"):
        CGAD.load_from_checkpoint(padim)
    with pytest.raises(CheckpointMismatchError, match=r"no 'anomalib_cgad' tag\): \d+ missing weights, e\.g\."):
        _model(CGAD).on_load_checkpoint(torch.load(padim, weights_only=True))


def test_checkpoint_file_that_is_not_a_checkpoint(tmp_path) -> None:
    (tmp_path / "broken.ckpt").write_bytes(b"half a file")
    with pytest.raises(
        CheckpointMismatchError, match=r"'.*broken\.ckpt' cannot be read as a checkpoint with weights_on"
    ):
        CGAD.load_from_checkpoint(tmp_path / "broken.ckpt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "tensors.pt")
    with pytest.raises(
        CheckpointMismatchError, match=r"'.*tensors\.pt' is not a Lightning checkpoint \(no 'state_dict'\)"
    ):
        CGAD.load_from_checkpoint(tmp_path / "tensors.pt")
    with pytest.raises(FileNotFoundError, match=r"Checkpoint '.*missing\.ckpt' does not exist"):
        CGAD.load_from_checkpoint(tmp_path / "missing.ckpt")


def test_checkpoint_of_another_version(tmp_path) -> None:
    path = _checkpoint(_model(CGAD, flow={"coupling_blocks": 2}), tmp_path / "cgad.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["anomalib_cgad"]["version"] = "0.0.1"
    torch.save(checkpoint, tmp_path / "old_version.ckpt")
    assert isinstance(CGAD.load_from_checkpoint(tmp_path / "old_version.ckpt", visualizer=False), CGAD)
    checkpoint["anomalib_cgad"].update(version="9.0.0", format=2)
    torch.save(checkpoint, tmp_path / "new_format.ckpt")
    with pytest.raises(CheckpointMismatchError, match=r"written by anomalib-cgad 9\.0\.0 in checkpoint format 2; "):
        CGAD.load_from_checkpoint(tmp_path / "new_format.ckpt")


def test_checkpoint_of_another_configuration(tmp_path) -> None:
    checkpoint = torch.load(
        _checkpoint(_model(CGAD, flow={"coupling_blocks": 2}), tmp_path / "cgad.ckpt"), weights_only=True
    )
    with pytest.raises(CheckpointMismatchError, match=r"a CGAD checkpoint of another configuration .* missing weights"):
        _model(CGAD, flow={"coupling_blocks": 4}).on_load_checkpoint(checkpoint)


# ----------------------------------------------------------------- NaN / inf
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_reference_images(value, synthetic_root) -> None:
    images = load_images(_good(synthetic_root)[:2], SIZE)
    images[1, 0, 3, 3] = value
    with pytest.raises(NonFiniteError, match=r"Reference images \[1\] \(of 2\) contain NaN or inf pixel values"):
        _model().set_references(images)


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_nan_or_inf_query_images(value, synthetic_root) -> None:
    model = _model()
    model.set_references(load_images(_good(synthetic_root)[:2], SIZE))
    queries = load_images(_good(synthetic_root, split="test")[:2], SIZE)
    queries[0, 1, 5, 5] = value
    with pytest.raises(NonFiniteError, match=r"1 image\(s\) contain NaN or inf pixel values: \['query_0\.png'\]"):
        _scores(model, queries)


def test_nan_features_from_the_backbone(synthetic_root) -> None:
    model = _model()
    with torch.no_grad():
        next(model.model.backbone.parameters()).fill_(float("nan"))
    with pytest.raises(BankMismatchError, match=r"Reference features of level 0 contain NaN or inf values"):
        model.set_references(load_images(_good(synthetic_root)[:2], SIZE))


def test_nan_in_the_model_gives_an_error_not_a_nan_score(synthetic_root) -> None:
    model = _model()
    model.set_references(load_images(_good(synthetic_root)[:2], SIZE))
    with torch.no_grad():
        model.model.boundary.fill_(float("nan"))
    with pytest.raises(
        NonFiniteError, match=r"2 image\(s\) got NaN or inf scores .*\['query_0\.png', 'query_1\.png'\]"
    ):
        _scores(model, load_images(_good(synthetic_root, split="test")[:2], SIZE))


@pytest.mark.parametrize("model_cls", [CGAD, MetaAD])
@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"k_shot": 0}, r"k_shot must be >= 1, got 0"),
        ({"episodes": {"k_choices": (0, 4)}}, r"k_choices must be >= 1, got 0"),
        ({"episodes": {"k_choices": ()}}, r"k_choices needs at least one reference count"),
        ({"episodes": {"direction": "sideways"}}, r"direction must be one of \('multi', 'single'\), got 'sideways'"),
        ({"episodes": {"margin": "wide"}}, r"margin must be one of \('mean_gap', 'pairwise', 'energy'\), got 'wide'"),
    ],
)
def test_bad_episode_options_are_refused_when_the_model_is_built(model_cls, option, message) -> None:
    """The episodic models check their options up front (``EpisodeOptions`` when it is made, from a protocol's
    mapping too), not an epoch into training."""
    with pytest.raises(ValueError, match=message):
        model_cls(**regroup_arguments(model_cls, option))
