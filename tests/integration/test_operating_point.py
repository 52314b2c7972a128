"""Normal-only operating point: per-class statistics from the k references, tau calibrated on the source classes.

The end-to-end tests use the training-free PatchKNN (offline ImageNet Lite0, 64 px) on the generated classes:
its calibration runs in ``Engine.fit`` (a validation), and everything is carried by checkpoints. The
torch-vs-OpenVINO label parity of the operating point is in ``test_openvino.py`` (one trained CGAD export).
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from anomalib.engine import Engine

from anomalib_cgad import CGAD, MetaAD, ResAD
from anomalib_cgad.components.operating_point import (
    OperatingPoint,
    OperatingPointPostProcessor,
    leave_one_out_statistics,
)
from anomalib_cgad.deploy.inferencer import (
    FAR_GRID,
    Bank,
    BankError,
    calibrated_tau,
    check_false_alarm_rate,
    normal_quantiles,
)
from benchmarks.patch_knn import PatchKNN

pytestmark = pytest.mark.filterwarnings("ignore")

SIZE = 64


def test_rates_outside_the_calibrated_grid_are_refused() -> None:
    with pytest.raises(ValueError, match=r"false_alarm_rate must lie in \[0.001, 0.5\]"):
        check_false_alarm_rate(0.7)
    with pytest.raises(ValueError, match="false_alarm_rate must lie"):
        PatchKNN(backbone_weights=None, false_alarm_rate=0.0, visualizer=False)


def test_tau_falls_as_the_requested_rate_rises_and_torch_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    point = OperatingPoint()
    point.set_calibration(rng.standard_normal(5000), k=4)
    point.reference_stats = torch.tensor([2.0, 0.5])
    taus = [point.tau(rate) for rate in (0.001, 0.01, 0.03, 0.05, 0.1, 0.3, 0.5)]
    assert taus == sorted(taus, reverse=True) and taus[0] > taus[-1]
    assert abs(point.tau(0.05) - 1.645) < 0.1  # the 95 % quantile of a standard normal
    for rate in (0.01, 0.04, 0.05, 0.12):
        vector = point.vector(rate)  # tensor-only path (the one exported graphs use)
        assert vector[:2].tolist() == [2.0, 0.5]
        assert abs(float(vector[2]) - point.tau(rate)) < 1e-5
        assert abs(point.threshold(rate) - (2.0 + 0.5 * point.tau(rate))) < 1e-5
    assert np.all(np.diff(normal_quantiles(rng.standard_normal(50))) <= 0)  # monotone even with few scores


def test_non_finite_calibration_scores_are_refused_naming_the_cause() -> None:
    """NaN scores (a Padim peer's covariance from one image) must not become a silent "not calibrated" state."""
    with pytest.raises(ValueError, match=r"2 of 5 normalised normal scores .* are NaN or inf"):
        normal_quantiles([0.1, float("nan"), 0.3, float("inf"), 0.2])


def test_uncalibrated_model_has_no_threshold_and_says_how_to_calibrate() -> None:
    point = OperatingPoint()
    assert not point.calibrated
    assert float(point.vector(0.05)[2]) == 0.0
    with pytest.raises(BankError, match=r"calibrate_operating_point\(datamodule\)"):
        calibrated_tau(FAR_GRID, point.tau_grid.tolist(), 0.05)


def test_bank_file_round_trips_the_reference_statistics(tmp_path) -> None:
    bank = Bank([np.ones((3, 2), np.float32)], {"model": "ResADModel"}, np.array([1.5, 0.25], np.float32))
    loaded = Bank.load(bank.save(tmp_path / "bank.npz"))
    assert loaded.reference_stats.tolist() == [1.5, 0.25]
    with pytest.raises(BankError, match="reference_stats must be a finite"):
        Bank(bank.tensors, {}, np.array([0.0, -1.0], np.float32)).check({})


def test_leave_one_out_scores_each_reference_against_the_others() -> None:
    """Identical references find themselves in the others' bank (location ≈ 0); different ones do not."""
    model = PatchKNN(backbone_weights=None, pre_processor=PatchKNN.configure_pre_processor((SIZE, SIZE)))
    model.model.eval()
    torch.manual_seed(0)
    image = torch.rand(1, 3, SIZE, SIZE)
    same = leave_one_out_statistics(model.model, image.expand(3, -1, -1, -1), model.pre_processor.transform)
    different = leave_one_out_statistics(model.model, torch.rand(3, 3, SIZE, SIZE), model.pre_processor.transform)
    assert same[0] < 1e-3 < different[0]
    single = leave_one_out_statistics(model.model, image, model.pre_processor.transform)  # k = 1: the mirror
    assert torch.isfinite(single).all() and single[1] > 0


@pytest.fixture(scope="module")
def fitted(synthetic_root, tmp_path_factory):
    """PatchKNN after ``Engine.fit`` on the three source classes (which calibrates it), plus its checkpoint."""
    from anomalib_cgad.data import CrossClass

    datamodule = CrossClass(
        source_dataset="MVTecAD", source_root=str(synthetic_root), source_categories=["stripes", "dots", "checker"],
        target_categories=["waves"], k_shot=2, train_batch_size=8, eval_batch_size=8,
    )  # fmt: skip
    root = tmp_path_factory.mktemp("operating_point")
    model = PatchKNN(pre_processor=PatchKNN.configure_pre_processor((SIZE, SIZE)), k_shot=2, visualizer=False)
    engine = Engine(default_root_dir=root, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    checkpoint = root / "patchknn.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    return model, datamodule, checkpoint


def test_fit_calibrates_and_labels_follow_the_requested_rate(fitted) -> None:
    model, datamodule, _ = fitted
    assert isinstance(model.post_processor, OperatingPointPostProcessor)
    assert model.operating_point.calibrated and int(model.operating_point.calibrated_k) == 2
    assert float(model.post_processor.image_threshold) == 0.0  # not learned from labelled anomalies
    model.eval()
    model.set_references(datamodule.reference_images("test", 0))
    test = datamodule.test_data
    normal = [test[i].image for i in range(len(test)) if int(test[i].gt_label) == 0]
    images = torch.stack(normal)
    before = model.false_alarm_rate
    alarms = []
    try:
        for rate in (0.01, 0.1, 0.5):
            model.false_alarm_rate = rate
            with torch.no_grad():
                output = model(images)
            raw = model.model(model.pre_processor(images)).pred_score
            assert torch.equal(output.pred_label, raw > model.image_threshold(rate))
            alarms.append(float(output.pred_label.float().mean()))
    finally:
        model.false_alarm_rate = before
    assert alarms == sorted(alarms)  # a higher requested rate never labels fewer normals anomalous
    assert alarms[0] <= 0.5 and alarms[-1] > 0  # the unseen class's normals are neither all flagged nor never


def test_checkpoint_keeps_the_calibration_and_the_class_statistics(fitted) -> None:
    model, _, checkpoint = fitted
    loaded = PatchKNN.load_from_checkpoint(checkpoint)
    assert torch.equal(loaded.operating_point.tau_grid, model.operating_point.tau_grid)
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert torch.equal(loaded.operating_point.reference_stats, saved["operating_point.reference_stats"])
    assert loaded.false_alarm_rate == model.false_alarm_rate


def test_checkpoint_from_before_the_operating_point_loads_with_how_to_recalibrate(fitted, tmp_path, caplog) -> None:
    model, datamodule, checkpoint = fitted
    payload = torch.load(checkpoint, weights_only=True)
    payload["state_dict"] = {k: v for k, v in payload["state_dict"].items() if not k.startswith("operating_point.")}
    payload["state_dict"]["post_processor._image_threshold"] = torch.tensor(3.0)  # an old learned threshold
    legacy = tmp_path / "legacy.ckpt"
    torch.save(payload, legacy)
    with caplog.at_level(logging.WARNING):
        loaded = PatchKNN.load_from_checkpoint(legacy)
    assert "saved before the normal-only operating point" in caplog.text
    assert "calibrate_operating_point(datamodule)" in caplog.text
    assert not loaded.operating_point.calibrated
    assert float(loaded.post_processor.image_threshold) == 0.0
    loaded.calibrate_operating_point(datamodule)
    assert torch.allclose(loaded.operating_point.tau_grid, model.operating_point.tau_grid)


def test_calibration_from_cached_features_equals_re_encoding_every_draw(tmp_path) -> None:
    """The shipped calibration (each image encoded once) gives the scores of re-encoding at every draw."""
    import pandas as pd

    from benchmarks.calibration_time import main

    folder = main(["--models", "ResAD", "--image-size", "64", "--draws", "4", "--normals", "8", "--out", str(tmp_path)])
    row = pd.read_csv(folder / "results.csv").iloc[0]
    assert row.scores == 4 * (8 - 4)  # 4 draws of k = 4 references, the other 4 images scored each time
    assert row.max_abs_diff < 1e-4, row.max_abs_diff
    assert (folder / "results.md").read_text().count("| ResAD") == 1


@pytest.mark.parametrize("model_cls", [CGAD, MetaAD, ResAD])
@pytest.mark.parametrize("training", [True, False])
def test_set_references_encodes_once_and_equals_the_bank_and_leave_one_out_pass(model_cls, training) -> None:
    """``set_references`` reuses one backbone pass for the bank and the leave-one-out statistics: same numbers as
    ``model.set_reference`` followed by :func:`leave_one_out_statistics` (each encoding the images itself)."""
    torch.manual_seed(0)
    images = torch.rand(3, 3, 64, 64)
    model = model_cls(
        pre_processor=model_cls.configure_pre_processor((64, 64)), visualizer=False, backbone_weights=None
    )
    twin = copy.deepcopy(model)
    model.train(training)
    twin.train(training)
    model.set_references(images)
    with torch.no_grad():
        twin.model.set_reference(twin.pre_processor.transform(images))
        twin.model.eval()
        stats = leave_one_out_statistics(twin.model, images, twin.pre_processor.transform)
    for ours, theirs in zip(model.model.bank_tensors(), twin.model.bank_tensors(), strict=True):
        assert torch.equal(ours, theirs)
    assert torch.equal(model.operating_point.reference_stats, stats)
    assert model.model.training == training  # the leave-one-out pass puts the mode back
