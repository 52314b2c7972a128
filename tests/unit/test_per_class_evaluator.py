"""PerClassEvaluator: one metric copy per class, ``<metric>/<class>`` and the class mean, driven by its hooks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from anomalib.data import ImageBatch
from anomalib.metrics import AUPRO, AUROC

from anomalib_cgad.metrics import PerClassEvaluator


def _batch(scores: list[float], labels: list[int], paths: list[str]) -> ImageBatch:
    return ImageBatch(
        image=torch.zeros(len(scores), 3, 8, 8),
        pred_score=torch.tensor(scores),
        gt_label=torch.tensor(labels),
        image_path=paths,
    )


def _trainer(val=None, test=None, class_of=None):
    datamodule = SimpleNamespace(val_categories=val, test_categories=test, category="single")
    if class_of is not None:
        datamodule.class_index = lambda stage, path: class_of[stage][path]
    return SimpleNamespace(datamodule=datamodule, barebones=False)


def _evaluator(**kwargs) -> tuple[PerClassEvaluator, dict[str, float]]:
    logged: dict[str, float] = {}
    evaluator = PerClassEvaluator(**kwargs)
    evaluator.log = lambda key, value: logged.__setitem__(key, float(value))
    return evaluator, logged


# class "a" is perfectly separated, class "b" perfectly inverted; pooled, the scores would give 0.5 < AUROC < 1.
BATCHES = [
    ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], ["a0", "a1", "a2", "a3"]),
    ([0.7, 0.6, 0.3, 0.25], [0, 0, 1, 1], ["b0", "b1", "b2", "b3"]),
]
CLASS_OF = {stage: {p: int(p[0] == "b") for _, _, paths in BATCHES for p in paths} for stage in ("test", "validate")}


def test_test_metrics_are_kept_per_class_and_averaged() -> None:
    evaluator, logged = _evaluator(test_metrics=[AUROC(fields=["pred_score", "gt_label"], prefix="image_")])
    trainer = _trainer(test=["a", "b"], class_of=CLASS_OF)
    for i, (scores, labels, paths) in enumerate(BATCHES):
        evaluator.on_test_batch_end(trainer, None, None, _batch(scores, labels, paths), i)
    evaluator.on_test_epoch_end(trainer, None)
    assert logged == pytest.approx({"image_AUROC/a": 1.0, "image_AUROC/b": 0.0, "image_AUROC": 0.5})


def test_classes_come_from_class_index_not_batch_order() -> None:
    evaluator, logged = _evaluator(test_metrics=[AUROC(fields=["pred_score", "gt_label"], prefix="image_")])
    trainer = _trainer(test=["a", "b"], class_of=CLASS_OF)
    # split each class over two batches, interleaved with the other class
    for scores, labels, paths in BATCHES:
        for half in (slice(0, 4, 2), slice(1, 4, 2)):
            evaluator.on_test_batch_end(trainer, None, None, _batch(scores[half], labels[half], paths[half]), 0)
    evaluator.on_test_epoch_end(trainer, None)
    assert logged["image_AUROC/a"] == pytest.approx(1.0)
    assert logged["image_AUROC/b"] == pytest.approx(0.0)


def test_without_class_index_the_dataloader_index_names_the_class() -> None:
    evaluator, logged = _evaluator(test_metrics=[AUROC(fields=["pred_score", "gt_label"], prefix="image_")])
    trainer = _trainer(test=["a", "b"])
    for index, (scores, labels, paths) in enumerate(BATCHES):
        evaluator.on_test_batch_end(trainer, None, None, _batch(scores, labels, paths), 0, dataloader_idx=index)
    evaluator.on_test_epoch_end(trainer, None)
    assert logged == pytest.approx({"image_AUROC/a": 1.0, "image_AUROC/b": 0.0, "image_AUROC": 0.5})


def test_validation_uses_val_categories_and_epochs_start_afresh() -> None:
    evaluator, logged = _evaluator(val_metrics=[AUROC(fields=["pred_score", "gt_label"], prefix="image_")])
    trainer = _trainer(val=["src_a", "src_b"], test=["tgt"], class_of=CLASS_OF)
    for scores, labels, paths in BATCHES:
        evaluator.on_validation_batch_end(trainer, None, None, _batch(scores, labels, paths), 0)
    evaluator.on_validation_epoch_end(trainer, None)
    assert set(logged) == {"image_AUROC/src_a", "image_AUROC/src_b", "image_AUROC"}
    logged.clear()
    scores, labels, paths = BATCHES[1]  # second epoch: class b now perfectly separated, nothing of epoch 1 left
    evaluator.on_validation_batch_end(trainer, None, None, _batch([1 - s for s in scores], labels, paths), 0)
    evaluator.on_validation_epoch_end(trainer, None)
    assert logged == pytest.approx({"image_AUROC/src_b": 1.0, "image_AUROC": 1.0})


def test_one_class_datamodule_logs_that_class_and_an_equal_mean() -> None:
    evaluator, logged = _evaluator(test_metrics=[AUROC(fields=["pred_score", "gt_label"], prefix="image_")])
    trainer = _trainer()  # plain anomalib datamodule: no categories lists, only ``category``
    scores, labels, paths = BATCHES[0]
    evaluator.on_test_batch_end(trainer, None, None, _batch(scores, labels, paths), 0)
    evaluator.on_test_epoch_end(trainer, None)
    assert logged == pytest.approx({"image_AUROC/single": 1.0, "image_AUROC": 1.0})


def test_a_metric_that_cannot_be_computed_for_a_class_is_skipped() -> None:
    """Pixel metrics on a class without masks (e.g. ELPV) are left out instead of failing the run."""
    evaluator, logged = _evaluator(
        test_metrics=[
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        ],
    )
    trainer = _trainer(test=["a", "b"], class_of=CLASS_OF)
    for scores, labels, paths in BATCHES:
        evaluator.on_test_batch_end(trainer, None, None, _batch(scores, labels, paths), 0)
    evaluator.on_test_epoch_end(trainer, None)
    assert set(logged) == {"image_AUROC/a", "image_AUROC/b", "image_AUROC"}


def test_default_has_anomalib_test_metrics() -> None:
    names = [metric.name for metric in PerClassEvaluator.default().test_metrics]
    assert names == ["image_AUROC", "image_F1Score", "image_FalseAlarmRate", "pixel_AUROC", "pixel_F1Score"]


@pytest.mark.parametrize("name", ["ResAD", "MetaAD", "CGAD"])
def test_models_resolve_the_evaluator_through_anomalib_hook(name: str) -> None:
    """``evaluator=True`` goes through ``configure_evaluator`` (per class); a passed one is kept, ``False`` is none."""
    from anomalib.metrics import Evaluator
    from anomalib.models import get_model

    default = get_model(name.lower(), backbone_weights=None).evaluator
    assert type(default) is PerClassEvaluator
    assert [m.name for m in default.test_metrics] == [m.name for m in PerClassEvaluator.default().test_metrics]
    model_class = type(get_model(name.lower(), backbone_weights=None, evaluator=False))
    assert model_class.__name__ == name
    mine = Evaluator(test_metrics=[AUROC(fields=["pred_score", "gt_label"], prefix="image_")])
    assert model_class(backbone_weights=None, evaluator=mine).evaluator is mine
    assert model_class(backbone_weights=None, evaluator=False).evaluator is None
    with pytest.raises(TypeError, match="Evaluator"):
        model_class(backbone_weights=None, evaluator="yes")
