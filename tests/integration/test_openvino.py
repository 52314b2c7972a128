"""OpenVINO deployment: anomalib's export, the swappable-bank graphs, the torch-free inferencer and the CLI.

One tiny CGAD (64 px, 2 coupling blocks, 1 epoch on three generated classes) is trained and exported once per
module; the tests share it. Run with ``pytest -s`` to see the measured torch-vs-OpenVINO differences.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.deploy import ExportType, OpenVINOInferencer
from anomalib.engine import Engine

from anomalib_cgad import CGAD, MetaAD, ResAD
from anomalib_cgad.cli import main as cli_main
from anomalib_cgad.components.flow import FlowOptions
from anomalib_cgad.data import CrossClass
from anomalib_cgad.deploy import (
    F32_CONFIG,
    Bank,
    BankError,
    BankExportMixin,
    BankInferencer,
    load_model_bank,
    model_bank,
    save_model_bank,
)
from anomalib_cgad.deploy.inferencer import list_images, resize_bilinear
from anomalib_cgad.models.base import load_images
from anomalib_cgad.models.options import regroup_arguments

pytestmark = pytest.mark.filterwarnings("ignore")

SIZE = 64
TOLERANCE = 1e-3
SOURCES = ["stripes", "dots", "checker"]


def _exportable(model_cls):
    """The model class with :class:`BankExportMixin` (itself once the lead lists the mixin in its bases)."""
    if issubclass(model_cls, BankExportMixin):
        return model_cls
    return type(f"Exportable{model_cls.__name__}", (BankExportMixin, model_cls), {})


def _train_and_export(model_cls, synthetic_root: Path, root: Path, **kwargs):
    """Fit 1 epoch on the three source classes, set the bank of 'waves', export with anomalib's Engine."""
    kwargs = regroup_arguments(model_cls, kwargs)
    datamodule = CrossClass(
        source_dataset="MVTecAD",
        source_root=str(synthetic_root),
        source_categories=SOURCES,
        target_categories=["waves"],
        k_shot=2,
        train_batch_size=8,
        eval_batch_size=8,
    )
    model = _exportable(model_cls)(
        pre_processor=model_cls.configure_pre_processor((SIZE, SIZE)), visualizer=False, k_shot=2, **kwargs
    )
    engine = Engine(
        max_epochs=1, default_root_dir=root / "run", accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False,
    )  # fmt: skip
    engine.fit(model=model, datamodule=datamodule)
    model.eval()
    model.set_references(datamodule.reference_images("test", 0))
    xml = engine.export(model=model, export_type=ExportType.OPENVINO, export_root=root / "export")
    return model, engine, xml


@pytest.fixture(scope="module")
def exported(synthetic_root, tmp_path_factory):
    """(trained CGAD, checkpoint path, anomalib's model.xml, swappable-bank export folder)."""
    root = tmp_path_factory.mktemp("openvino")
    torch.manual_seed(0)
    model, engine, xml = _train_and_export(CGAD, synthetic_root, root, flow={"coupling_blocks": 2})
    callback = engine.trainer.checkpoint_callback
    checkpoint = callback.best_model_path or callback.last_model_path
    return model, checkpoint, Path(xml), Path(xml).parent


def _paths(root: Path, category: str, split: str, count: int | None = None) -> list[Path]:
    paths = list_images(root / category / split / "good")
    return paths[:count] if count else paths


def _torch_predict(model, paths: list[Path]):
    """The Lightning module's own forward (pre-processor → model → post-processor) on the image files."""
    with torch.no_grad():
        return model(load_images(paths, (96, 96)))


def _parity(model, folder: Path, synthetic_root: Path) -> dict[str, float]:
    """Same bank (computed by the exported encoder, loaded into torch), same images: max |torch − OpenVINO|."""
    inferencer = BankInferencer(folder)
    bank = inferencer.compute_bank(_paths(synthetic_root, "waves", "train", 2))
    torch_bank = _torch_bank(model, _paths(synthetic_root, "waves", "train", 2))
    load_model_bank(model, _save(bank, folder.parent / "parity_bank.npz"))
    queries = [*_paths(synthetic_root, "waves", "test"), *list_images(synthetic_root / "waves" / "test" / "blob")]
    expected = _torch_predict(model, queries)
    result = inferencer.predict(queries, bank)
    diffs = {
        "bank": _bank_difference(bank, torch_bank),
        "pred_score": float(np.abs(result["pred_score"] - expected.pred_score.numpy()).max()),
        "anomaly_map": float(np.abs(result["anomaly_map"] - expected.anomaly_map.numpy()).max()),
        "label_flips": int((result["pred_label"].astype(bool) != expected.pred_label.numpy()).sum()),
    }
    print(f"\n{type(model.model).__name__} torch vs OpenVINO f32, {len(queries)} images, same bank: {diffs}")
    return diffs


def _torch_bank(model, paths: list[Path]) -> list[torch.Tensor]:
    """The bank the torch model computes from the reference image files."""
    with torch.no_grad():
        return model.model.compute_bank(model.pre_processor.transform(load_images(paths, (96, 96))))


def _bank_difference(bank: Bank, torch_bank: list[torch.Tensor]) -> float:
    """max |OpenVINO − torch| over the bank tensors, which must have the same shapes."""
    assert [a.shape for a in bank.tensors] == [tuple(t.shape) for t in torch_bank]
    return max(float(np.abs(a - t.numpy()).max()) for a, t in zip(bank.tensors, torch_bank, strict=True))


def _save(bank: Bank, path: Path) -> Path:
    return bank.save(path, overwrite=True)


def test_export_writes_anomalib_ir_and_bank_graphs(exported) -> None:
    _, _, xml, folder = exported
    names = {p.name for p in folder.iterdir()}
    assert {"model.xml", "model.bin", "bank_model.xml", "bank_encoder.xml", "bank.npz", "bank_metadata.json"} <= names
    metadata = json.loads((folder / "bank_metadata.json").read_text())
    assert metadata["model"] == "CGADModel"
    assert metadata["image_size"] == [SIZE, SIZE]
    assert metadata["bank_names"] == ["bank_0", "bank_1", "bank_2"]
    assert xml.name == "model.xml"


def test_parity_torch_vs_openvino_with_the_same_bank(exported, synthetic_root) -> None:
    model, _, _, folder = exported
    diffs = _parity(model, folder, synthetic_root)
    assert diffs["pred_score"] <= TOLERANCE
    assert diffs["anomaly_map"] <= TOLERANCE
    assert diffs["bank"] <= TOLERANCE
    assert diffs["label_flips"] == 0


def test_one_export_takes_banks_of_any_k(exported, synthetic_root) -> None:
    """Exported with k = 2, the graphs take 1 or 3 references: no row count may be frozen into them."""
    model, _, _, folder = exported
    inferencer = BankInferencer(folder)
    queries = _paths(synthetic_root, "waves", "test")
    for k in (1, 3):
        paths = _paths(synthetic_root, "waves", "train", k)
        bank = inferencer.compute_bank(paths)
        assert bank.tensors[0].shape[0] == k * (SIZE // 8) ** 2
        assert _bank_difference(bank, _torch_bank(model, paths)) <= TOLERANCE
        load_model_bank(model, _save(bank, folder.parent / f"bank_k{k}.npz"))
        expected = _torch_predict(model, queries).pred_score.numpy()
        assert np.abs(inferencer.predict(queries, bank)["pred_score"] - expected).max() <= TOLERANCE


def test_openvino_encoder_bank_gets_the_same_coreset_as_torch(exported, synthetic_root) -> None:
    """With ``bank.coreset < 1`` the torch-free inferencer keeps the rows torch keeps, and scores alike."""
    model, _, _, folder = exported
    inferencer = BankInferencer(folder)
    assert inferencer.metadata["reference_coreset"] == 1.0
    paths = _paths(synthetic_root, "waves", "train", 2)
    full = inferencer.compute_bank(paths)
    inferencer.metadata["reference_coreset"] = 0.5  # as exported from a model built with bank.coreset=0.5
    model.model.bank.coreset = 0.5
    try:
        bank = inferencer.compute_bank(paths)
        torch_bank = _torch_bank(model, paths)
        levels = len(inferencer.metadata["layers"])
        assert [t.shape[0] for t in bank.tensors[:levels]] == [(t.shape[0] + 1) // 2 for t in full.tensors[:levels]]
        assert _bank_difference(bank, torch_bank) <= TOLERANCE
        np.testing.assert_array_equal(bank.tensors[levels], full.tensors[levels])  # CGAD's scale uses every patch
        queries = _paths(synthetic_root, "waves", "test")
        load_model_bank(model, _save(bank, folder.parent / "coreset_bank.npz"))
        expected = _torch_predict(model, queries).pred_score.numpy()
        assert np.abs(inferencer.predict(queries, bank)["pred_score"] - expected).max() <= TOLERANCE
    finally:
        model.model.bank.coreset = 1.0


def test_anomalib_openvino_inferencer_runs_the_simple_export(exported, synthetic_root, tmp_path, monkeypatch) -> None:
    """anomalib's own inferencer on anomalib's own IR (bank frozen at export) matches torch."""
    model, _, xml, folder = exported
    monkeypatch.chdir(tmp_path)  # the inferencer creates ./openvino_cache
    load_model_bank(model, folder / "bank.npz")  # the bank frozen into model.xml
    paths = [*_paths(synthetic_root, "waves", "test", 3), *list_images(synthetic_root / "waves" / "test" / "blob")]
    expected = _torch_predict(model, paths)
    inferencer = OpenVINOInferencer(xml, device="CPU", config=F32_CONFIG)
    scores, maps = [], []
    for path in paths:
        image = resize_bilinear(load_images([path], (96, 96))[0].numpy(), (SIZE, SIZE))
        prediction = inferencer.predict(image)
        scores.append(np.asarray(prediction.pred_score).reshape(-1))
        maps.append(np.asarray(prediction.anomaly_map).reshape(1, 1, SIZE, SIZE))
    score_diff = float(np.abs(np.concatenate(scores) - expected.pred_score.numpy()).max())
    map_diff = float(np.abs(np.concatenate(maps) - expected.anomaly_map.numpy()).max())
    span = (float(expected.anomaly_map.min()), float(expected.anomaly_map.max()))
    print(f"\nanomalib OpenVINOInferencer (f32) vs torch, {len(paths)} images: pred_score {score_diff:.2e}, "
          f"anomaly_map {map_diff:.2e} (map values in [{span[0]:.3f}, {span[1]:.3f}])")  # fmt: skip
    assert score_diff <= TOLERANCE
    assert map_diff <= TOLERANCE


def test_bank_of_the_right_class_scores_its_normal_images_low(exported, synthetic_root) -> None:
    """Normal images of B score lower with B's bank than with A's bank, and vice versa (no re-export)."""
    _, _, _, folder = exported
    inferencer = BankInferencer(folder)
    banks = {c: inferencer.compute_bank(_paths(synthetic_root, c, "train", 2)) for c in ("stripes", "waves")}
    means = {}
    for images in ("stripes", "waves"):
        for bank in ("stripes", "waves"):
            scores = inferencer.predict(_paths(synthetic_root, images, "test"), banks[bank])["pred_score"]
            means[images, bank] = float(scores.mean())
    print(f"\nmean image score (images, bank): {means}")
    assert means["waves", "waves"] < means["waves", "stripes"]
    assert means["stripes", "stripes"] < means["stripes", "waves"]


def test_inferencer_needs_no_torch(exported, synthetic_root) -> None:
    """inferencer.py, loaded on its own with torch made unimportable, reproduces the in-process scores."""
    _, _, _, folder = exported
    import anomalib_cgad.deploy.inferencer as module

    refs = [str(p) for p in _paths(synthetic_root, "waves", "train", 2)]
    queries = [str(p) for p in _paths(synthetic_root, "waves", "test")]
    script = (
        "import importlib.util, json, sys\n"
        "sys.modules['torch'] = None\n"
        f"spec = importlib.util.spec_from_file_location('standalone', {str(module.__file__)!r})\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules['standalone'] = mod\n"
        "spec.loader.exec_module(mod)\n"
        f"inf = mod.BankInferencer({str(folder)!r})\n"
        f"bank = inf.compute_bank({refs!r})\n"
        f"print(json.dumps(inf.predict({queries!r}, bank)['pred_score'].tolist()))\n"
        "print('torch' in sys.modules and sys.modules['torch'] is not None)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    scores_line, torch_loaded = run.stdout.strip().splitlines()[-2:]
    inferencer = BankInferencer(folder)
    expected = inferencer.predict(queries, inferencer.compute_bank(refs))["pred_score"]
    assert torch_loaded == "False"
    assert np.allclose(json.loads(scores_line), expected, atol=1e-6)


def test_cli_bank_then_predict_ov(exported, synthetic_root, tmp_path, capsys) -> None:
    _, _, _, folder = exported
    out = tmp_path / "banks" / "waves.npz"
    images = str(synthetic_root / "waves" / "train" / "good")
    cli_main(["bank", "--images", images, "--model", str(folder.parent.parent), "--out", str(out), "--k", "2"])
    assert "Wrote the bank of 2 image(s)" in capsys.readouterr().out
    inferencer = BankInferencer(folder)
    bank = Bank.load(out)
    direct = inferencer.compute_bank(_paths(synthetic_root, "waves", "train", 2))
    assert all(np.array_equal(a, b) for a, b in zip(bank.tensors, direct.tensors, strict=True))

    good, blob = synthetic_root / "waves" / "test" / "good", synthetic_root / "waves" / "test" / "blob"
    maps = tmp_path / "maps"
    cli_main(["predict-ov", "--model", str(folder), "--bank", str(out), "--images", str(good), str(blob),
              "--out", str(maps)])  # fmt: skip
    printed = capsys.readouterr().out.splitlines()
    paths = [*list_images(good), *list_images(blob)]
    rows = list(csv.DictReader((maps / "predictions.csv").open()))
    assert len(rows) == len(paths) == len([line for line in printed if line.strip().endswith(".png")])
    assert len(list(maps.glob("*_anomaly_map.png"))) == len(paths)
    expected = inferencer.predict(paths, bank)
    assert np.allclose([float(r["score"]) for r in rows], expected["pred_score"], atol=1e-4)
    labels = ["anomalous" if label else "normal" for label in expected["pred_label"]]
    assert [r["label"] for r in rows] == labels


def test_cli_refuses_to_overwrite_and_names_bad_input(exported, synthetic_root, tmp_path) -> None:
    _, _, _, folder = exported
    images = str(synthetic_root / "waves" / "train" / "good")
    out = tmp_path / "bank.npz"
    out.write_bytes(b"user data")

    def fails(argv: list[str]) -> str:
        with pytest.raises(SystemExit) as error:
            cli_main(argv)
        return str(error.value.code)

    assert "already exists" in fails(["bank", "--images", images, "--model", str(folder), "--out", str(out)])
    assert out.read_bytes() == b"user data"
    (tmp_path / "empty").mkdir()
    fresh = str(tmp_path / "new.npz")
    model = str(folder)
    assert "does not exist" in fails(["bank", "--images", str(tmp_path / "nope"), "--model", model, "--out", fresh])
    assert "holds no images" in fails(["bank", "--images", str(tmp_path / "empty"), "--model", model, "--out", fresh])
    one = str(_paths(synthetic_root, "waves", "train", 1)[0])
    assert "k=2 references are needed" in fails(["bank", "--images", one, "--model", str(folder), "--out", fresh])
    assert "no swappable-bank export" in fails(["bank", "--images", images, "--model", str(tmp_path), "--out", fresh])
    assert not Path(fresh).exists()
    cli_main(["bank", "--images", images, "--model", str(folder), "--out", str(out), "--overwrite"])
    assert Bank.load(out).metadata["num_refs"] == 2

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    message = fails(["predict-ov", "--model", str(folder), "--images", images, "--out", str(busy)])
    assert "not empty" in message
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]


def test_bank_from_other_weights_or_shapes_is_rejected(exported, tmp_path) -> None:
    model, _, _, folder = exported
    inferencer = BankInferencer(folder)
    bank = inferencer.default_bank
    stale = Bank(bank.tensors, {**bank.metadata, "fingerprint": "0" * 16})
    with pytest.raises(BankError, match="fingerprint"):
        inferencer.predict(np.zeros((1, 3, SIZE, SIZE), np.float32), stale)
    with pytest.raises(BankError, match="fingerprint"):
        load_model_bank(model, stale.save(tmp_path / "stale.npz"))
    narrow = Bank([bank.tensors[0][:, :8], *bank.tensors[1:]], bank.metadata)
    with pytest.raises(BankError, match="bank_0"):
        inferencer.predict(np.zeros((1, 3, SIZE, SIZE), np.float32), narrow)
    (tmp_path / "junk.npz").write_bytes(b"not a bank")
    with pytest.raises(BankError, match="not a reference bank"):
        Bank.load(tmp_path / "junk.npz")
    with pytest.raises(FileExistsError):
        bank.save(folder / "bank.npz")


def test_one_bank_file_for_torch_and_openvino(exported, synthetic_root, tmp_path) -> None:
    """A bank saved from torch scores identically when loaded back into torch and when given to OpenVINO."""
    model, _, _, folder = exported
    model.set_references(load_images(_paths(synthetic_root, "stripes", "train", 2), (96, 96)))
    path = save_model_bank(model, tmp_path / "stripes.npz")
    queries = _paths(synthetic_root, "stripes", "test")
    expected = _torch_predict(model, queries).pred_score
    model.set_references(load_images(_paths(synthetic_root, "waves", "train", 2), (96, 96)))
    assert not torch.allclose(_torch_predict(model, queries).pred_score, expected)
    load_model_bank(model, path)
    assert torch.allclose(_torch_predict(model, queries).pred_score, expected)
    assert all(np.array_equal(a, b) for a, b in zip(model_bank(model).tensors, Bank.load(path).tensors, strict=True))
    ov_scores = BankInferencer(folder).predict(queries, path)["pred_score"]
    assert np.abs(ov_scores - expected.numpy()).max() <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("model_cls", [ResAD, MetaAD])
def test_parity_resad_and_metaad(model_cls, synthetic_root, tmp_path) -> None:
    torch.manual_seed(0)
    kwargs = {"flow": {"coupling_blocks": 2}} if model_cls is ResAD else {}
    model, _, xml = _train_and_export(model_cls, synthetic_root, tmp_path, **kwargs)
    diffs = _parity(model, Path(xml).parent, synthetic_root)
    assert diffs["pred_score"] <= TOLERANCE
    assert diffs["anomaly_map"] <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("adaptation", ["meta_scale", "latent_centre"])
def test_parity_cgad_with_class_adaptation(synthetic_root, tmp_path, adaptation: str) -> None:
    """The class descriptor is bank tensors the exported encoder computes from the references, and the bank
    graph applies them as torch does: ``meta_scale``'s channel scales with the learned ``α``, ``β``;
    ``latent_centre``'s latent centres (the references' leave-one-out residuals through the constraintor and
    the flow, inside the exported encoder)."""
    torch.manual_seed(0)
    training = {"adaptation": adaptation, "synthetic_per_class": 4}
    model, _, xml = _train_and_export(CGAD, synthetic_root, tmp_path, flow={"coupling_blocks": 2}, training=training)
    assert len(model.model.bank_tensors()) == 2 * len(model.model.backbone.channels) + 1
    diffs = _parity(model, Path(xml).parent, synthetic_root)
    assert diffs["bank"] <= TOLERANCE
    assert diffs["pred_score"] <= TOLERANCE
    assert diffs["anomaly_map"] <= TOLERANCE
    assert diffs["label_flips"] == 0


@pytest.mark.slow
def test_anomalib_export_cli_from_a_checkpoint(synthetic_root, tmp_path) -> None:
    """``anomalib export --model CGAD --export_type openvino --ckpt_path ...`` (subprocess, the real CLI)."""
    datamodule = CrossClass(
        source_dataset="MVTecAD", source_root=str(synthetic_root), source_categories=SOURCES,
        target_categories=["waves"], k_shot=2, train_batch_size=8, eval_batch_size=8,
    )  # fmt: skip
    model = CGAD(
        pre_processor=CGAD.configure_pre_processor((SIZE, SIZE)),
        visualizer=False,
        k_shot=2,
        flow=FlowOptions(coupling_blocks=2),
    )
    engine = Engine(max_epochs=1, default_root_dir=tmp_path / "run", accelerator="cpu", devices=1, logger=False,
                    enable_progress_bar=False)  # fmt: skip
    engine.fit(model=model, datamodule=datamodule)
    callback = engine.trainer.checkpoint_callback
    checkpoint = callback.best_model_path or callback.last_model_path
    assert checkpoint
    command = [sys.executable, "-m", "anomalib_cgad.cli", "export", "--model", "CGAD", "--export_type", "openvino",
               "--ckpt_path", checkpoint, "--default_root_dir", str(tmp_path / "export")]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    folder = tmp_path / "export" / "weights" / "openvino"
    assert (folder / "model.xml").is_file()
    if not issubclass(CGAD, BankExportMixin):
        pytest.xfail("CGAD does not list BankExportMixin in its bases yet: only anomalib's model.xml was written.")
    inferencer = BankInferencer(folder)
    scores = inferencer.predict(_paths(synthetic_root, "waves", "test"), inferencer.default_bank)["pred_score"]
    assert np.isfinite(scores).all()


# ----------------------------------------------------------------- the input policy, OpenVINO side
def test_openvino_paths_score_every_format_alike_and_check_arrays(exported, synthetic_root, tmp_path) -> None:
    """BankInferencer (bank and predict-ov): 16-bit, gray, RGBA and palette copies give the 8-bit scores."""
    from test_input_policy import FORMATS, save_as

    from anomalib_cgad.deploy.inferencer import ImageInputError, read_image

    _, _, _, folder = exported
    inferencer = BankInferencer(folder)
    refs, queries = _paths(synthetic_root, "waves", "train", 2), _paths(synthetic_root, "waves", "test")[:3]
    banks, scores = {}, {}
    for how in FORMATS:
        ref_files = [save_as(p, tmp_path / how / "refs" / p.name, how) for p in refs]
        query_files = [save_as(p, tmp_path / how / "queries" / p.name, how) for p in queries]
        banks[how] = inferencer.compute_bank(ref_files)
        scores[how] = inferencer.predict(query_files, banks[how])["pred_score"]
    for how in FORMATS:
        assert all(np.array_equal(a, b) for a, b in zip(banks[how].tensors, banks["rgb"].tensors, strict=True)), how
        assert np.array_equal(scores[how], scores["rgb"]), how
    floats = np.stack([read_image(p, None) for p in sorted((tmp_path / "rgb" / "queries").iterdir())])
    as_uint8 = np.round(floats * 255).astype(np.uint8)
    from_uint8 = inferencer.predict(as_uint8, banks["rgb"])["pred_score"]
    assert np.allclose(from_uint8, inferencer.predict(as_uint8 / 255.0, banks["rgb"])["pred_score"], atol=1e-6)
    assert np.allclose(from_uint8, scores["rgb"], atol=1e-6)
    with pytest.raises(ImageInputError, match=r"^images hold values in \[\d+, \d+\], but float images must lie in"):
        inferencer.predict(as_uint8.astype(np.float32), banks["rgb"])
    with pytest.raises(ImageInputError, match=r"^images hold values .* divide 0\.\.255 images by 255"):
        inferencer.compute_bank(as_uint8[:2].astype(np.float64))


def test_predict_ov_writes_the_scores_it_has_when_it_stops_on_a_bad_image(exported, synthetic_root, tmp_path) -> None:
    from test_input_policy import truncate

    _, _, _, folder = exported
    images = tmp_path / "line"
    images.mkdir()
    for path in _paths(synthetic_root, "waves", "test"):
        shutil.copy(path, images / path.name)
    truncate(images / "003.png")
    out = tmp_path / "maps"
    argv = ["predict-ov", "--model", str(folder), "--images", str(images), "--out", str(out), "--batch-size", "2"]
    with pytest.raises(SystemExit) as error:
        cli_main(argv)
    assert re.fullmatch(
        r"anomalib-cgad predict-ov: error: Could not read image '.*003\.png': image file is truncated \(the 3 "
        r"image\(s\) scored before it are in .*predictions\.csv\)\. Fix or remove it, or pass --bad-images skip\.",
        str(error.value.code),
    )
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [Path(r["image"]).name for r in rows] == ["000.png", "001.png", "002.png"]
    assert all(float(r["score"]) >= 0 for r in rows)
    skipped = tmp_path / "maps_skip"
    cli_main([*argv[:-4], "--out", str(skipped), "--bad-images", "skip"])
    rows = list(csv.DictReader((skipped / "predictions.csv").open()))
    assert [(Path(r["image"]).name, r["label"] == "unreadable") for r in rows][2:5] == [
        ("002.png", False),
        ("003.png", True),
        ("004.png", False),
    ]
    assert len(rows) == 6
    with pytest.raises(SystemExit, match=r"bank: error: Could not read image '.*003\.png'.*pass --bad-images skip"):
        cli_main(
            ["bank", "--images", str(images), "--model", str(folder), "--out", str(tmp_path / "b.npz"), "--k", "4"]
        )
    cli_main(["bank", "--images", str(images), "--model", str(folder), "--out", str(tmp_path / "b.npz"), "--k", "4",
              "--bad-images", "skip"])  # fmt: skip
    assert Bank.load(tmp_path / "b.npz").metadata["num_refs"] == 4


def test_operating_point_torch_and_openvino_give_the_same_labels(exported, synthetic_root, tmp_path) -> None:
    """Same references: the same (location, scale) from both leave-one-out passes, the same labels at every
    requested false-alarm rate, and a threshold that falls as the requested rate rises."""
    model, _, _, folder = exported
    inferencer = BankInferencer(folder)
    refs = _paths(synthetic_root, "waves", "train", 2)
    bank = inferencer.compute_bank(refs)
    model.set_references(load_images(refs, (96, 96)))
    torch_stats = model.operating_point.reference_stats.cpu().numpy()
    assert np.abs(bank.reference_stats - torch_stats).max() <= TOLERANCE * max(1.0, float(np.abs(torch_stats).max()))
    load_model_bank(model, bank.save(tmp_path / "waves.npz"))
    queries = [*_paths(synthetic_root, "waves", "test"), *list_images(synthetic_root / "waves" / "test" / "blob")]
    rate_before = model.false_alarm_rate
    thresholds, flagged = [], []
    try:
        for rate in (0.01, 0.05, 0.1, 0.3):
            model.false_alarm_rate = rate
            expected = _torch_predict(model, queries).pred_label.numpy().astype(bool)
            result = inferencer.predict(queries, bank, false_alarm_rate=rate)
            assert np.array_equal(result["pred_label"].astype(bool).reshape(-1), expected.reshape(-1)), rate
            raw = result["raw_score"].reshape(-1)
            threshold = inferencer.threshold(bank, rate)
            assert np.array_equal(raw > threshold, expected.reshape(-1)), rate  # label = raw score above threshold
            assert abs(threshold - model.image_threshold(rate)) <= TOLERANCE * max(1.0, abs(threshold))
            thresholds.append(threshold)
            flagged.append(int(expected.sum()))
    finally:
        model.false_alarm_rate = rate_before
    assert thresholds == sorted(thresholds, reverse=True) and thresholds[0] > thresholds[-1]
    assert flagged == sorted(flagged)


def test_bank_from_before_the_operating_point_is_refused_with_how_to_recompute(
    exported, synthetic_root, tmp_path
) -> None:
    _, _, _, folder = exported
    current = Bank.load(folder / "bank.npz")
    legacy = tmp_path / "legacy.npz"
    arrays = {f"bank_{i}": t for i, t in enumerate(current.tensors)}
    metadata = json.dumps({**current.metadata, "format": "anomalib-cgad-bank/2"})
    np.savez(legacy, __metadata__=np.array(metadata), **arrays)
    with pytest.raises(BankError, match=r"before banks carried a normal-only operating point.*anomalib-cgad bank"):
        Bank.load(legacy)
    images = str(synthetic_root / "waves" / "test" / "good")
    with pytest.raises(SystemExit, match=r"anomalib-cgad predict-ov: error: .*normal-only operating point"):
        cli_main(["predict-ov", "--model", str(folder), "--bank", str(legacy), "--images", images])
