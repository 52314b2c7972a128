"""The one input policy: the same picture gives the same score in every format and through every entry point.

What each case checks:

- grayscale, RGB, RGBA, palette and 16-bit copies of one picture give identical pixels (``read_image``) and
  identical scores as references (``few_shot_source``), as ``anomalib predict`` images (``PredictDataset``), as
  ``CrossClass`` test images and as training images (the training pool);
- arrays: uint8 is scaled by 1/255; floats outside [0, 1] (0..255, ImageNet-normalised) are refused with a
  one-line message; empty tensors and lists, lists of tensors or files; k_shot of the wrong type;
- a model and a datamodule with different k_shot: an error naming both (the model adopts the datamodule's
  when given none);
- a checkpoint of a model trained on several classes refuses to score a folder without references;
- a truncated image file in a dataset, a reference folder or a predict folder is named; ``stop`` (the
  default) or ``skip`` (``bad_images`` / ``ANOMALIB_CGAD_BAD_IMAGES``);
- a truncated or empty ``.npz`` bank: one ``BankError`` naming the file.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning
import numpy as np
import pytest
import torch
from anomalib.engine import Engine
from PIL import Image

from anomalib_cgad import CGAD, MetaAD, ResAD
from anomalib_cgad.data import CrossClass
from anomalib_cgad.deploy.inferencer import Bank, BankError, ImageInputError, image_array, read_image
from anomalib_cgad.models.base import ReferenceError, load_images

SIZE = (64, 64)
FORMATS = ("rgb", "gray", "gray16", "rgba", "palette")


def _model(model_cls=MetaAD, **kwargs):
    lightning.seed_everything(0, verbose=False)  # the same weights in every model a test compares
    return model_cls(pre_processor=model_cls.configure_pre_processor(SIZE), visualizer=False, **kwargs)


def _engine(tmp_path: Path) -> Engine:
    return Engine(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)


def _good(root: Path, category: str = "waves", split: str = "train") -> list[Path]:
    return sorted((root / category / split / "good").glob("*.png"))


def save_as(source: Path, target: Path, how: str) -> Path:
    """Write the grayscale version of ``source`` in format ``how``; every format holds the same picture."""
    gray = np.asarray(Image.open(source).convert("L"))
    if how == "rgb":
        image = Image.fromarray(np.stack([gray] * 3, axis=-1))
    elif how == "gray":
        image = Image.fromarray(gray)
    elif how == "gray16":
        image = Image.fromarray(gray.astype(np.uint16) * 257)  # 8-bit value v is 257·v in 16 bits
    elif how == "rgba":
        image = Image.fromarray(np.stack([gray] * 3 + [np.full_like(gray, 255)], axis=-1))
    elif how == "palette":
        image = Image.frombytes("P", gray.shape[::-1], gray.tobytes())  # index v -> gray level v
        image.putpalette([v for i in range(256) for v in (i, i, i)])
    else:
        raise ValueError(how)
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save(target)
    return target


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def formats(synthetic_root, tmp_path) -> dict[str, Path]:
    """One folder per format, each holding the same four test pictures of 'waves' (two good, two defective)."""
    sources = [
        *_good(synthetic_root, split="test")[:2],
        *sorted((synthetic_root / "waves" / "test").glob("[!g]*/*.png"))[:2],
    ]
    folders = {}
    for how in FORMATS:
        for i, source in enumerate(sources):
            save_as(source, tmp_path / how / f"{i}.png", how)
        folders[how] = tmp_path / how
    modes = {how: Image.open(folder / "0.png").mode for how, folder in folders.items()}
    assert modes == {"rgb": "RGB", "gray": "L", "gray16": "I;16", "rgba": "RGBA", "palette": "P"}
    return folders


def _refs(synthetic_root, tmp_path, how: str = "rgb", k: int = 2) -> Path:
    for i, path in enumerate(_good(synthetic_root)[:k]):
        save_as(path, tmp_path / f"refs_{how}" / f"{i}.png", how)
    return tmp_path / f"refs_{how}"


# ----------------------------------------------------------------- identical pixels and scores
def test_every_format_gives_identical_pixels(formats) -> None:
    reference = np.stack([read_image(p, (48, 40)) for p in sorted(formats["rgb"].iterdir())])
    for how, folder in formats.items():
        pixels = np.stack([read_image(p, (48, 40)) for p in sorted(folder.iterdir())])
        assert np.array_equal(pixels, reference), how
        assert torch.equal(
            load_images(sorted(folder.iterdir()), SIZE), load_images(sorted(formats["rgb"].iterdir()), SIZE)
        )
    assert float(reference.std()) > 0.05  # a real picture, not a flat one


def test_same_score_for_every_format_through_anomalib_predict(formats, synthetic_root, tmp_path) -> None:
    """``anomalib predict --data <folder>`` (anomalib's PredictDataset reader): 16-bit scores like 8-bit."""
    model = _model(k_shot=2, few_shot_source=str(_refs(synthetic_root, tmp_path)))
    scores = {}
    for how, folder in formats.items():
        predictions = _engine(tmp_path / how / "run").predict(model=model, data_path=folder)
        scores[how] = torch.cat([batch.pred_score for batch in predictions])
    print({how: s.tolist() for how, s in scores.items()})
    for how, values in scores.items():
        assert torch.allclose(values, scores["rgb"], atol=1e-6), how
    white = tmp_path / "white"
    white.mkdir()
    Image.new("RGB", (96, 96), (255, 255, 255)).save(white / "0.png")  # what anomalib's reader made of 16-bit
    clipped = torch.cat([b.pred_score for b in _engine(tmp_path / "w").predict(model=model, data_path=white)])
    assert abs(float(clipped[0]) - float(scores["rgb"][0])) > 1e-3


def test_same_score_for_every_format_of_the_references(formats, synthetic_root, tmp_path) -> None:
    scores = {}
    model = _model(k_shot=2)
    for how in FORMATS:
        model.few_shot_source = str(_refs(synthetic_root, tmp_path, how))
        predictions = _engine(tmp_path / "run" / how).predict(model=model, data_path=formats["rgb"])
        scores[how] = torch.cat([batch.pred_score for batch in predictions])
    for how, values in scores.items():
        assert torch.allclose(values, scores["rgb"], atol=1e-6), how


def _root_in_format(synthetic_root: Path, target: Path, how: str) -> Path:
    for category in ("stripes", "waves"):
        for path in (synthetic_root / category).rglob("*.png"):
            out = target / path.relative_to(synthetic_root)
            if "ground_truth" in path.parts:
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, out)
            else:
                save_as(path, out, how)
    return target


def test_same_score_for_every_format_in_a_cross_class_test_set_and_training_pool(synthetic_root, tmp_path) -> None:
    """Dataset images (anomalib's dataset reader) in 16-bit, RGBA or palette: same scores, same training pool."""
    scores, pools = {}, {}
    model = _model()
    for how in ("gray", "gray16", "rgba", "palette"):
        root = _root_in_format(synthetic_root, tmp_path / how, how)
        options = {"source_root": str(root), "source_categories": ["stripes"], "target_categories": ["waves"]}
        datamodule = CrossClass(**options, k_shot=2, eval_batch_size=4, train_batch_size=4)
        predictions = _engine(tmp_path / f"run_{how}").predict(model=model, datamodule=datamodule)
        scores[how] = {p: float(s) for b in predictions for p, s in zip(b.image_path, b.pred_score, strict=True)}
        model._trainer = SimpleNamespace(datamodule=datamodule)  # what build_training_pool reads of the trainer
        stripes = model.build_training_pool(synthetic_per_class=0, seed=0).classes["stripes"]
        pools[how] = {
            Path(p).relative_to(root): [level[i] for level in stripes.normals] for i, p in enumerate(stripes.paths)
        }
    names = {how: {Path(p).relative_to(tmp_path / how): s for p, s in values.items()} for how, values in scores.items()}
    assert len(names["gray"]) == 12
    for how in names:
        assert names[how].keys() == names["gray"].keys()
        # v * 257 / 65535 and v / 255 are equal in exact arithmetic, not always in float32: relative 1e-5
        same = np.allclose([names[how][k] for k in names["gray"]], list(names["gray"].values()), rtol=1e-5, atol=1e-5)
        assert same, how
        assert pools[how].keys() == pools["gray"].keys()
        gap = max(
            float((a - b).abs().max())
            for k in pools["gray"]
            for a, b in zip(pools[how][k], pools["gray"][k], strict=True)
        )
        print(how, "largest feature difference", gap)
        assert gap < 1e-4, how  # float32 rounding of the pixels (1e-7), carried through the backbone


# ----------------------------------------------------------------- arrays and the Python API
def test_uint8_references_are_scaled_and_floats_in_0_255_are_refused(synthetic_root) -> None:
    as_uint8 = (load_images(_good(synthetic_root)[:2], SIZE) * 255).round().to(torch.uint8)
    floats = as_uint8.float() / 255
    a, b = _model(), _model()
    a.set_references(floats)
    b.set_references(as_uint8.numpy())
    assert all(
        torch.allclose(x, y, atol=1e-5) for x, y in zip(a.model.bank_tensors(), b.model.bank_tensors(), strict=True)
    )
    with pytest.raises(
        ImageInputError,
        match=r"^Reference images hold values in \[\d+, \d+\], but float images must lie in \[0, 1\]: "
        r"divide 0\.\.255 images by 255",
    ):
        _model().set_references(floats * 255)
    normalised = (floats - 0.45) / 0.225
    with pytest.raises(ImageInputError, match=r"pass images before normalisation"):
        _model().set_references(normalised)
    with pytest.raises(ImageInputError, match=r"float arrays in \[0, 1\] or uint8/uint16 arrays; got dtype int64"):
        _model().set_references(as_uint8.long())


def test_reference_lists_and_empty_references(synthetic_root) -> None:
    paths = _good(synthetic_root)[:2]
    stacked = _model()
    stacked.set_references(load_images(paths, SIZE))
    for given in (
        list(load_images(paths, SIZE)),
        [str(p) for p in paths],
        [load_images([p], (80, 72))[0] for p in paths],
    ):
        model = _model()
        model.set_references(given)
        assert model.model.bank.num_refs == 2
    listed = _model()
    listed.set_references(list(load_images(paths, SIZE)))
    assert all(
        torch.equal(x, y) for x, y in zip(listed.model.bank_tensors(), stacked.model.bank_tensors(), strict=True)
    )
    with pytest.raises(ReferenceError, match=r"^No reference images given \(shape \(0, 3, 64, 64\)\)"):
        _model().set_references(torch.zeros(0, 3, 64, 64))
    with pytest.raises(ReferenceError, match=r"^No reference images given \(an empty list\)"):
        _model().set_references([])
    with pytest.raises(ReferenceError, match=r"all file paths or all tensors/arrays, not a mix"):
        _model().set_references([str(paths[0]), load_images(paths[1:], SIZE)[0]])


def test_image_array_policy() -> None:
    assert image_array(np.array([0, 65535], dtype=np.uint16)).tolist() == [0.0, 1.0]
    with pytest.raises(
        ImageInputError, match=r"^images hold values in \[0, 255\], but float images must lie in \[0, 1\]"
    ):
        image_array(np.array([0.0, 255.0]))


@pytest.mark.parametrize("model_cls", [CGAD, MetaAD, ResAD])
@pytest.mark.parametrize(
    ("value", "shown"), [("4", r"'4' \(str\)"), (2.5, r"2\.5 \(float\)"), (True, r"True \(bool\)")]
)
def test_k_shot_of_the_wrong_type(model_cls, value, shown) -> None:
    with pytest.raises(ValueError, match=rf"^k_shot must be a whole number >= 1, got {shown}\.$"):
        model_cls(k_shot=value)
    with pytest.raises(ValueError, match=rf"^k_shot must be a whole number >= 1, got {shown}\.$"):
        CrossClass(k_shot=value)


def test_model_and_datamodule_k_shot_must_agree(cross_class, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"^The model's k_shot=2 and the datamodule's k_shot=3 disagree: set both"):
        _engine(tmp_path).predict(model=_model(k_shot=2), datamodule=cross_class(k_shot=3))
    model = _model()  # no k_shot: the datamodule's
    _engine(tmp_path).predict(model=model, datamodule=cross_class(k_shot=3))
    assert model.k_shot == 3 == model.hparams["k_shot"]
    assert model.model.bank.num_refs == 3


# ----------------------------------------------------------------- the checkpoint's bank
def _trained_checkpoint(synthetic_root, path: Path, classes: list[str]) -> Path:
    model = _model(k_shot=2)
    model.set_references(load_images(_good(synthetic_root, classes[-1])[:2], SIZE))
    model.training_pool = SimpleNamespace(classes=dict.fromkeys(classes))
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                  "pytorch-lightning_version": lightning.__version__}  # fmt: skip
    model.on_save_checkpoint(checkpoint)
    assert checkpoint["anomalib_cgad"]["classes"] == sorted(classes)
    torch.save(checkpoint, path)
    return path


def test_reference_less_predict_on_a_multi_class_checkpoint_refuses(synthetic_root, tmp_path, formats) -> None:
    path = _trained_checkpoint(synthetic_root, tmp_path / "multi.ckpt", ["stripes", "dots"])
    model = MetaAD.load_from_checkpoint(path, visualizer=False)
    with pytest.raises(
        ReferenceError,
        match=r"^No references for the images to score: the checkpoint's bank holds a training class's references "
        r"\(trained on \['dots', 'stripes'\]\)\. Pass few_shot_source=",
    ):
        _engine(tmp_path).predict(model=model, data_path=formats["rgb"])
    opted_in = MetaAD.load_from_checkpoint(path, visualizer=False, few_shot_source="checkpoint")
    assert (
        len(torch.cat([b.pred_score for b in _engine(tmp_path).predict(model=opted_in, data_path=formats["rgb"])])) == 4
    )
    own = MetaAD.load_from_checkpoint(path, visualizer=False)
    own.set_references(load_images(_good(synthetic_root)[:2], SIZE))  # the new class's references: fine
    assert len(torch.cat([b.pred_score for b in _engine(tmp_path).predict(model=own, data_path=formats["rgb"])])) == 4
    single = MetaAD.load_from_checkpoint(
        _trained_checkpoint(synthetic_root, tmp_path / "one.ckpt", ["stripes"]), visualizer=False
    )
    assert (
        len(torch.cat([b.pred_score for b in _engine(tmp_path).predict(model=single, data_path=formats["rgb"])])) == 4
    )


# ----------------------------------------------------------------- broken files
def _copy_root(synthetic_root: Path, tmp_path: Path) -> Path:
    for category in ("stripes", "waves"):
        shutil.copytree(synthetic_root / category, tmp_path / "data" / category)
    return tmp_path / "data"


@pytest.mark.parametrize("split", ["train", "test"])
def test_truncated_dataset_image_stops_naming_it_or_is_skipped(split, synthetic_root, tmp_path, monkeypatch) -> None:
    root = _copy_root(synthetic_root, tmp_path)
    bad = truncate(_good(root, split=split)[3])
    options = {"source_root": str(root), "source_categories": ["stripes"], "target_categories": ["waves"], "k_shot": 2}
    with pytest.raises(
        ImageInputError,
        match=rf"^MVTecAD class 'waves' \({split}\): 1 image file\(s\) cannot be read: '.*003\.png' \(image file "
        r"is truncated.*\)\. Fix or remove them, or set ANOMALIB_CGAD_BAD_IMAGES=skip",
    ):
        CrossClass(**options).setup()
    with pytest.warns(
        UserWarning, match=rf"class 'waves' \({split}\): skipping 1 unreadable image file\(s\): '.*003\.png'"
    ):
        datamodule = CrossClass(**options, bad_images="skip")
        datamodule.setup()
    assert str(bad) not in {
        str(p)
        for data in (datamodule.train_data, datamodule.test_data, *datamodule._ref_sets["test"])
        for p in data.samples.image_path
    }
    monkeypatch.setenv("ANOMALIB_CGAD_BAD_IMAGES", "skip")
    assert CrossClass(**options).bad_images == "skip"
    monkeypatch.setenv("ANOMALIB_CGAD_BAD_IMAGES", "sometimes")
    with pytest.raises(
        ImageInputError, match=r"^ANOMALIB_CGAD_BAD_IMAGES must be one of \('stop', 'skip'\), got 'sometimes'"
    ):
        CrossClass(**options)


def test_truncated_reference_image_is_named(synthetic_root, tmp_path) -> None:
    folder = _refs(synthetic_root, tmp_path)
    truncate(folder / "1.png")
    with pytest.raises(ReferenceError, match=r"^Could not read reference image '.*1\.png': image file is truncated"):
        _model(k_shot=2, few_shot_source=str(folder))._reference_images("test", 0)


def test_truncated_image_in_a_predict_folder(formats, synthetic_root, tmp_path, monkeypatch) -> None:
    folder = formats["rgb"]
    truncate(folder / "2.png")
    model = _model(k_shot=2, few_shot_source=str(_refs(synthetic_root, tmp_path)))
    with pytest.raises(
        ImageInputError,
        match=r"^the images to predict: 1 image file\(s\) cannot be read: '.*2\.png' \(image file is truncated",
    ):
        _engine(tmp_path / "a").predict(model=model, data_path=folder)
    monkeypatch.setenv("ANOMALIB_CGAD_BAD_IMAGES", "skip")
    with pytest.warns(UserWarning, match=r"the images to predict: skipping 1 unreadable image file\(s\): '.*2\.png'"):
        predictions = _engine(tmp_path / "b").predict(model=model, data_path=folder)
    assert [Path(p).name for b in predictions for p in b.image_path] == ["0.png", "1.png", "3.png"]


@pytest.mark.parametrize("how", ["empty", "truncated", "not a bank"])
def test_truncated_or_empty_bank_file(how, tmp_path) -> None:
    path = tmp_path / "bank.npz"
    Bank([np.zeros((4, 2), np.float32)], {"model": "ResAD"}).save(path)
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        truncate(path)
    else:
        path.write_bytes(b"some text, not a zip")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(
            BankError,
            match=r"^'.*bank\.npz' is not a reference bank file written by anomalib-cgad \(truncated or damaged\?\): "
            + {"empty": "the file is empty", "truncated": "BadZipFile: .*", "not a bank": "it is not an .npz archive"}[
                how
            ]
            + "$",
        ):
            Bank.load(path)


def test_truncated_image_in_an_anomalib_datamodule(synthetic_root, tmp_path, monkeypatch) -> None:
    """anomalib's own MVTecAD datamodule with a plugin model: the broken test image is named before testing."""
    from anomalib.data import MVTecAD

    root = _copy_root(synthetic_root, tmp_path)
    truncate(_good(root, split="test")[4])

    def datamodule() -> MVTecAD:
        return MVTecAD(root=root, category="waves", eval_batch_size=4, num_workers=0)

    with pytest.raises(ImageInputError, match=r"^MVTecAD test_data: 1 image file\(s\) cannot be read: '.*004\.png'"):
        _engine(tmp_path / "a").test(model=_model(k_shot=2), datamodule=datamodule())
    monkeypatch.setenv("ANOMALIB_CGAD_BAD_IMAGES", "skip")
    with pytest.warns(UserWarning, match=r"MVTecAD test_data: skipping 1 unreadable image file\(s\): '.*004\.png'"):
        predictions = _engine(tmp_path / "b").predict(model=_model(k_shot=2), datamodule=datamodule())
    paths = [str(p) for b in predictions for p in b.image_path]
    assert len(paths) == 11 and not any(p.endswith("good/004.png") for p in paths)
