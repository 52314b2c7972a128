"""Per-class evaluation: anomalib's metrics computed separately for each unseen class, plus their mean.

anomalib's ``Evaluator`` aggregates the whole test set. Class-generalizable AD is judged per unseen class
(scores of different classes need not share a scale), so :class:`PerClassEvaluator` keeps one copy of each
metric per class (the cross-class datamodule's batches hold one class each; ``class_index`` names it) and
logs

- ``<metric>/<class>`` for every class, e.g. ``image_AUROC/poly``;
- ``<metric>`` = the mean over classes (with one class, simply that class's value).

Class names come from ``trainer.datamodule.test_categories`` / ``val_categories`` when the datamodule has
them, else the datamodule's ``category``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from anomalib.metrics import AUROC, Evaluator, F1Score
from anomalib.metrics.base import AnomalibMetric
from lightning.pytorch import LightningModule, Trainer
from torch.nn import ModuleDict
from torchmetrics.classification import BinarySpecificity


class FalseAlarmRate(AnomalibMetric, BinarySpecificity):
    """Share of normal images labelled anomalous, ``1 − specificity`` (logged as ``image_FalseAlarmRate``).

    With the models' normal-only operating point it is the rate the user requested (``false_alarm_rate``),
    achieved on the tested class.
    """

    def compute(self) -> torch.Tensor:
        """``1 − specificity`` of ``pred_label`` against ``gt_label``."""
        return 1 - super().compute()


class PerClassEvaluator(Evaluator):
    """Evaluator that reports anomalib metrics per class and as a class mean.

    Args:
        val_metrics: metrics for validation (as anomalib's ``Evaluator``).
        test_metrics: metrics for testing (as anomalib's ``Evaluator``).
        compute_on_cpu (bool): as anomalib's ``Evaluator``. Defaults to ``True``.
    """

    def __init__(self, val_metrics: Any = None, test_metrics: Any = None, compute_on_cpu: bool = True) -> None:
        super().__init__(val_metrics=val_metrics, test_metrics=test_metrics, compute_on_cpu=compute_on_cpu)
        self._per_class = ModuleDict()

    @classmethod
    def default(cls) -> PerClassEvaluator:
        """anomalib's default test metrics (image/pixel AUROC and F1; pixel ones skipped without masks) and the
        image false-alarm rate (the labels are the normal-only operating point's)."""
        return cls(
            test_metrics=[
                AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
                F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
                FalseAlarmRate(fields=["pred_label", "gt_label"], prefix="image_"),
                AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
                F1Score(fields=["pred_mask", "gt_mask"], prefix="pixel_", strict=False),
            ],
        )

    @staticmethod
    def class_name(trainer: Trainer, stage: str, batch: Any, dataloader_idx: int) -> str:
        """Class of a batch: from the datamodule's ``class_index`` (cross-class), else the dataloader index."""
        datamodule = getattr(trainer, "datamodule", None)
        index = dataloader_idx
        paths = getattr(batch, "image_path", None)
        if datamodule is not None and hasattr(datamodule, "class_index") and paths:
            index = datamodule.class_index("validate" if stage == "val" else "test", paths[0])
        names = getattr(datamodule, f"{stage}_categories", None)
        if names and index < len(names):
            return str(names[index])
        return str(getattr(datamodule, "category", None) or f"class{index}")

    def _metrics_for(self, stage: str, name: str, template) -> Any:
        key = f"{stage}::{name}"
        if key not in self._per_class:
            metrics = copy.deepcopy(template)
            for metric in metrics:
                metric.reset()
            self._per_class[key] = metrics
        return self._per_class[key]

    def _update(self, trainer: Trainer, stage: str, template, batch, dataloader_idx: int) -> None:
        name = self.class_name(trainer, stage, batch, dataloader_idx)
        for metric in self._metrics_for(stage, name, template):
            metric.update(batch)

    def _log(self, trainer: Trainer, stage: str) -> dict[str, float]:
        results: dict[str, list[float]] = {}
        logged: dict[str, float] = {}
        prefix = f"{stage}::"
        for key in [k for k in self._per_class if k.startswith(prefix)]:
            name = key[len(prefix) :]
            for metric in self._per_class[key]:
                if metric.update_count == 0:  # strict=False metric that never got its fields (no masks, e.g.
                    continue  # ELPV): computing it would only make torchmetrics warn "compute before update"
                try:
                    value = metric.compute()
                except Exception:
                    continue
                if value is None:  # strict=False metric whose fields never came (no masks, e.g. ELPV)
                    metric.reset()
                    continue
                value = float(value)
                logged[f"{metric.name}/{name}"] = value
                results.setdefault(metric.name, []).append(value)
                metric.reset()
            del self._per_class[key]
        for metric_name, values in results.items():
            logged[metric_name] = float(torch.tensor(values).mean())
        for key, value in logged.items():
            self.log(key, value)
            if trainer.barebones:
                trainer.callback_metrics[key] = torch.tensor(value)
                trainer.logged_metrics[key] = torch.tensor(value)
        return logged

    def on_validation_batch_end(self, trainer: Trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """Update the validation metrics of the batch's class."""
        del pl_module, outputs, batch_idx
        if len(self.val_metrics):
            self._update(trainer, "val", self.val_metrics, batch, dataloader_idx)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log per-class and mean validation metrics."""
        del pl_module
        self._log(trainer, "val")

    def on_test_batch_end(self, trainer: Trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """Update the test metrics of the batch's class."""
        del pl_module, outputs, batch_idx
        self._update(trainer, "test", self.test_metrics, batch, dataloader_idx)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log per-class and mean test metrics."""
        del pl_module
        self._log(trainer, "test")
