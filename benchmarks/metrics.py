"""Benchmark metrics, computed in one place from raw per-image scores so every model is measured identically.

torch is imported inside the functions: :mod:`benchmarks.report` reads :data:`REQUESTED_RATES` from here and
builds its tables from the CSV without it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

METRICS = (
    "image_AUROC",
    "image_AUROC_clear",
    "image_AUROC_subtle",
    "pixel_AUROC",
    "AUPRO",
    "F1_transferred",
    "F1_oracle",
    "F1_normal_only",
    "false_alarm_rate",
    "miss_rate",
    "false_alarm_rate_at_0.01",
    "false_alarm_rate_at_0.05",
    "false_alarm_rate_at_0.1",
    "F1_normal_only_at_0.01",
    "F1_normal_only_at_0.1",
)
REQUESTED_RATES = (0.01, 0.05, 0.1)  # requested false-alarm rates every pass is also evaluated at


def unit_scale(values: torch.Tensor) -> torch.Tensor:
    """Min-max scale to [0, 1] (rank-preserving).

    torchmetrics applies a sigmoid to scores outside [0, 1], which saturates raw anomaly scores (e.g. 20–90)
    to 1.0 and would turn every AUROC into 0.5; scaling first keeps the ranking intact.
    """
    import torch

    values = values.float()
    low, high = values.min(), values.max()
    return (values - low) / (high - low) if high > low else torch.zeros_like(values)


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Binary AUROC of raw scores (NaN when only one label is present)."""
    from torchmetrics.functional.classification import binary_auroc

    if len(labels) == 0 or labels.min() == labels.max():
        return float("nan")
    return float(binary_auroc(unit_scale(scores), labels.int()))


def f1_max(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """F1 at the best threshold on these scores (the oracle F1; NaN without anomalies)."""
    from torchmetrics.functional.classification import binary_precision_recall_curve

    if len(labels) == 0 or labels.max() == 0:
        return float("nan")
    precision, recall, _ = binary_precision_recall_curve(unit_scale(scores), labels.int())
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    return float(f1.max())


def f1_score(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """F1 of binary predictions (NaN for an empty set)."""
    from torchmetrics.functional.classification import binary_f1_score

    if len(labels) == 0:
        return float("nan")
    return float(binary_f1_score(predicted.int(), labels.int()))


def normal_only_offsets(module, rates: tuple[float, ...] = REQUESTED_RATES) -> dict[float, float]:
    """Thresholds, per requested rate, on the scores our models output (already ``(raw − loc) / scale − tau``).

    The models subtract ``tau`` at their own ``false_alarm_rate``; another rate's threshold is the difference.
    """
    rates = tuple(sorted({*rates, float(module.false_alarm_rate)}))
    point = module.operating_point
    return {rate: point.tau(rate) - point.tau(module.false_alarm_rate) for rate in rates}


def normal_only_metrics(
    scores: torch.Tensor, labels: torch.Tensor, thresholds: dict[float, float] | None, rate: float
) -> dict[str, float]:
    """F1, false-alarm rate (normals labelled anomalous) and miss rate at the normal-only thresholds.

    ``thresholds`` maps each requested rate to the threshold on ``scores`` (``None``: all NaN); ``rate`` is the
    run's requested rate, reported in ``F1_normal_only`` / ``false_alarm_rate`` / ``miss_rate``.
    """
    names = ("F1_normal_only", "false_alarm_rate", "miss_rate",
             *(f"false_alarm_rate_at_{r:g}" for r in REQUESTED_RATES),
             *(f"F1_normal_only_at_{r:g}" for r in REQUESTED_RATES if r != 0.05))  # fmt: skip
    out = dict.fromkeys(names, float("nan"))
    if not thresholds or len(labels) == 0:
        return out
    normal, anomalous = labels == 0, labels == 1

    def at(threshold: float) -> tuple[float, float, float]:
        predicted = scores > threshold
        far = float(predicted[normal].float().mean()) if normal.any() else float("nan")
        miss = float((~predicted[anomalous]).float().mean()) if anomalous.any() else float("nan")
        return f1_score(predicted, labels), far, miss

    out["F1_normal_only"], out["false_alarm_rate"], out["miss_rate"] = at(thresholds[rate])
    for requested in REQUESTED_RATES:
        if requested in thresholds:
            f1, far, _ = at(thresholds[requested])
            out[f"false_alarm_rate_at_{requested:g}"] = far
            if f"F1_normal_only_at_{requested:g}" in out:
                out[f"F1_normal_only_at_{requested:g}"] = f1
    return out


def class_metrics(
    scores: torch.Tensor,
    labels: torch.Tensor,
    threshold: float,
    probability: np.ndarray | None = None,
    maps: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
    normal_only: dict[float, float] | None = None,
    rate: float = 0.05,
) -> dict[str, float]:
    """All benchmark metrics of one class from raw per-image scores.

    Args:
        scores (torch.Tensor): raw image scores ``(N,)``.
        labels (torch.Tensor): 0 normal / 1 anomalous ``(N,)``.
        threshold (float): the model's raw image threshold (learned on source validation).
        probability (np.ndarray | None): ELPV defect probability per image; splits anomalies into clear (1.0)
            and subtle (⅓, ⅔). Defaults to ``None`` (no split).
        maps (torch.Tensor | None): anomaly maps ``(N, H, W)`` when masks exist. Defaults to ``None``.
        masks (torch.Tensor | None): ground-truth masks ``(N, H, W)``. Defaults to ``None``.
        normal_only (dict[float, float] | None): the normal-only threshold on ``scores`` per requested
            false-alarm rate (see :func:`normal_only_metrics`). Defaults to ``None`` (those columns NaN).
        rate (float): the run's requested false-alarm rate. Defaults to ``0.05``.

    Returns:
        dict[str, float]: the :data:`METRICS` (NaN where not applicable).

    Example:
        >>> import torch
        >>> out = class_metrics(torch.tensor([0.1, 0.2, 0.9, 0.8]), torch.tensor([0, 0, 1, 1]), threshold=0.5)
        >>> out["image_AUROC"], out["F1_transferred"], out["F1_oracle"]
        (1.0, 1.0, 1.0)
    """
    import torch

    out = dict.fromkeys(METRICS, float("nan"))
    out["image_AUROC"] = auroc(scores, labels)
    out["F1_transferred"] = f1_score(scores > threshold, labels) if math.isfinite(threshold) else float("nan")
    out["F1_oracle"] = f1_max(scores, labels)
    out.update(normal_only_metrics(scores, labels, normal_only, rate))
    if probability is not None:
        probability = np.asarray(probability, dtype=float)
        normal = probability == 0.0
        for name, anomalous in (("clear", probability == 1.0), ("subtle", (probability > 0) & (probability < 1))):
            rows = torch.from_numpy(np.flatnonzero(normal | anomalous))
            if anomalous.any():
                out[f"image_AUROC_{name}"] = auroc(scores[rows], labels[rows])
    if maps is not None and masks is not None and masks.any():
        from anomalib.metrics.aupro import _AUPRO

        flat_maps, flat_masks = maps.float().flatten(), masks.flatten().int()
        out["pixel_AUROC"] = auroc(flat_maps, flat_masks)
        aupro = _AUPRO()
        aupro.update(unit_scale(maps), masks.int())
        out["AUPRO"] = float(aupro.compute())
    return out
