"""Normal-only operating point: a good/bad threshold for a new class from its k normal references alone.

anomalib's F1-adaptive threshold needs anomalous validation images of the class it labels; a new product
has none. Here (the rule is written out in :mod:`anomalib_cgad.deploy.inferencer`, whose numpy helpers both
sides share, so torch and OpenVINO compute the same numbers):

1. **per class, from its references**: ``(location, scale)`` of leave-one-out scores, each reference scored
   against a bank of the other k − 1 (:func:`leave_one_out_statistics`);
2. **once per model, from its training classes** ("meta-calibration", :func:`calibrate`): episodes in which
   a training class plays the new product: k references drawn from its normal images give its
   ``(location, scale)``, its other normal images are scored and normalised, ``(score − location) / scale``;
   pooled over draws and classes, the ``1 − rate`` quantile is ``tau(rate)``, kept for a grid of rates;
3. **scores**: ``(raw − location) / scale − tau(rate)`` for the image score and every map pixel
   (:func:`apply_operating_point`), so 0 is every class's threshold and
   :class:`OperatingPointPostProcessor` (anomalib's post-processor with its threshold fixed at 0 instead of
   learned from labelled validation images) labels every class at its own operating point.

The requested rate is a user setting (``false_alarm_rate``, default 0.05); changing it needs no retraining.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np
import torch
from anomalib.data import InferenceBatch
from anomalib.post_processing import PostProcessor
from torch import nn

from anomalib_cgad.deploy.inferencer import (
    DEFAULT_FALSE_ALARM_RATE,
    FAR_GRID,
    calibrated_tau,
    check_false_alarm_rate,
    interpolation_weights,
    leave_one_out_sets,
    normal_quantiles,
    reference_statistics,
)

logger = logging.getLogger(__name__)

CALIBRATION_DRAWS = 32  # reference draws per calibration, spread over the training classes (at least 4 each)
CALIBRATION_NORMALS = 48  # normal training images kept per class for the calibration episodes

Transform = Callable[[torch.Tensor], torch.Tensor]


def apply_operating_point(output: InferenceBatch, operating_point: torch.Tensor) -> InferenceBatch:
    """``(raw − location) / scale − tau`` of ``pred_score`` and ``anomaly_map`` (``operating_point``: the three).

    One affine map per class: it keeps the ranking inside a class (AUROC unchanged) and makes 0 the threshold.
    """
    location, scale, tau = operating_point[0], operating_point[1], operating_point[2]

    def shift(value: torch.Tensor | None) -> torch.Tensor | None:
        return None if value is None else (value - location) / scale - tau

    return output._replace(pred_score=shift(output.pred_score), anomaly_map=shift(output.anomaly_map))


@torch.no_grad()
def encode(model: nn.Module, images: torch.Tensor, transform: Transform, batch_size: int = 32) -> list[torch.Tensor]:
    """``model.features`` of un-normalised images, in batches: each image crosses the frozen backbone once."""
    chunks = [
        model.features(transform(images[start : start + batch_size])) for start in range(0, len(images), batch_size)
    ]
    return [torch.cat(level) for level in zip(*chunks, strict=True)]


def _rows(features: list[torch.Tensor], index) -> list[torch.Tensor]:
    return [level[index] for level in features]


@torch.no_grad()
def leave_one_out_statistics(
    model: nn.Module,
    images: torch.Tensor,
    transform: Transform,
    features: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """``(location, scale)`` of a class from un-normalised reference images ``(k, 3, H, W)``.

    Each reference is scored (``model.score_features``) against ``model.bank_from_features`` of the others
    (k = 1: of its own horizontal mirror image); ``transform`` is the pre-processor, ``features`` the images'
    :func:`encode` when the caller has it. See :func:`~anomalib_cgad.deploy.inferencer.reference_statistics`.
    """
    features = encode(model, images, transform) if features is None else features
    size = transform(images[:1]).shape[-2:]
    scores, maps = [], []
    for held, others in leave_one_out_sets(len(images)):
        refs = (
            _rows(features, others)
            if others is not None
            else encode(model, images[held : held + 1].flip(-1), transform)
        )
        output = model.score_features(
            _rows(features, slice(held, held + 1)), model.bank_from_features(refs, size), size
        )
        scores.append(float(output.pred_score.reshape(-1)[0]))
        maps.append(output.anomaly_map.float().cpu().numpy())
    return torch.from_numpy(reference_statistics(scores, maps))


@torch.no_grad()
def normalised_normal_scores(
    model: nn.Module,
    normals: Mapping[str, torch.Tensor],
    k: int,
    transform: Transform,
    draws: int = CALIBRATION_DRAWS,
    seed: int = 0,
    batch_size: int = 32,
) -> np.ndarray:
    """Pooled ``(score − location) / scale`` of held-out normals over reference draws of each class.

    Each class's images are encoded once (:func:`encode`); every draw then works on their features.

    Args:
        model (nn.Module): a :class:`~anomalib_cgad.components.bank_model.BankModel` (eval mode).
        normals (Mapping[str, torch.Tensor]): un-normalised normal images ``(N_c, 3, H, W)`` per class.
        k (int): references per draw (the k the model will be used with).
        transform (Transform): the pre-processor.
        draws (int): reference draws in all, split over the classes (at least 4 per class).
        seed (int): seed of the draws (a local generator; the global RNG is not touched).
        batch_size (int): scoring batch size.

    Returns:
        np.ndarray: the pooled normalised scores.
    """
    generator = torch.Generator().manual_seed(seed)
    usable = {name: images for name, images in normals.items() if len(images) > k}
    if not usable:
        msg = f"Calibrating the operating point needs a training class with more than k={k} normal images."
        raise ValueError(msg)
    per_class = max(4, -(-draws // len(usable)))
    pooled = []
    for images in usable.values():
        features = encode(model, images, transform, batch_size)
        size = transform(images[:1]).shape[-2:]
        for _ in range(per_class):
            order = torch.randperm(len(images), generator=generator)
            refs, held_out = order[:k].to(images.device), order[k:].to(images.device)
            ref_features = _rows(features, refs)
            location, scale = leave_one_out_statistics(model, images[refs], transform, ref_features).tolist()
            bank = model.bank_from_features(ref_features, size)
            for start in range(0, len(held_out), batch_size):
                batch = _rows(features, held_out[start : start + batch_size])
                scores = model.score_features(batch, bank, size).pred_score.float().cpu().numpy()
                pooled.append((scores - location) / scale)
    return np.concatenate(pooled)


class OperatingPoint(nn.Module):
    """The model's calibration and the current class's reference statistics (buffers, so checkpoints keep them).

    Attributes:
        far_grid (torch.Tensor): the requested rates the calibration covers.
        tau_grid (torch.Tensor): ``tau`` at each rate; NaN until :meth:`set_calibration`.
        calibrated_k (torch.Tensor): the k the calibration episodes used (0: not calibrated).
        reference_stats (torch.Tensor): ``(location, scale)`` of the current class.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("far_grid", torch.tensor(FAR_GRID, dtype=torch.float32))
        self.register_buffer("tau_grid", torch.full((len(FAR_GRID),), float("nan")))
        self.register_buffer("calibrated_k", torch.tensor(0))
        self.register_buffer("reference_stats", torch.tensor([0.0, 1.0]))

    @property
    def calibrated(self) -> bool:
        """Whether a calibration is stored."""
        return bool(torch.isfinite(self.tau_grid).all())

    def set_calibration(self, normalised: np.ndarray, k: int) -> None:
        """Store ``tau`` at every grid rate from pooled normalised normal scores."""
        self.tau_grid = torch.from_numpy(normal_quantiles(normalised, FAR_GRID)).to(self.tau_grid.device)
        self.calibrated_k = torch.tensor(int(k), device=self.tau_grid.device)

    def tau(self, rate: float) -> float:
        """``tau(rate)`` (raises :class:`~anomalib_cgad.deploy.inferencer.BankError` when not calibrated)."""
        return calibrated_tau(self.far_grid.tolist(), self.tau_grid.tolist(), rate)

    def vector(self, rate: float) -> torch.Tensor:
        """``(location, scale, tau(rate))``; without a calibration ``tau = 0`` (threshold = the LOO mean score).

        Tensor operations only (no ``.item()``), so exporting the model keeps it as part of the graph.
        """
        low, weight = interpolation_weights(FAR_GRID, rate)
        tau = self.tau_grid[low] * (1 - weight) + self.tau_grid[low + 1] * weight
        tau = torch.where(torch.isfinite(tau), tau, torch.zeros_like(tau))
        return torch.cat([self.reference_stats, tau.reshape(1)])

    def threshold(self, rate: float) -> float:
        """The current class's threshold on the raw image score, ``location + scale · tau(rate)``."""
        location, scale = self.reference_stats.tolist()
        return location + scale * self.tau(rate)


class OperatingPointPostProcessor(PostProcessor):
    """anomalib's post-processor with the image and pixel thresholds fixed at 0, the operating point.

    The models output ``(raw − location) / scale − tau`` (:func:`apply_operating_point`), so 0 is each class's
    threshold and the labels need no anomalous image. Validation still learns the min/max that map scores
    into [0, 1] (0 maps to 0.5); only the F1-adaptive threshold, which would need labelled anomalies of the
    class, is not learned.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._image_threshold.fill_(0.0)
        self._pixel_threshold.fill_(0.0)

    def on_validation_batch_end(self, trainer, pl_module, outputs, *args, **kwargs) -> None:
        """Update the min/max normalisation only (the thresholds stay at 0)."""
        del trainer, pl_module, args, kwargs
        if self.enable_normalization:
            self._image_min_max_metric.update(outputs)
            self._pixel_min_max_metric.update(outputs)


def collect_normals(dataset, category_of: Callable[[str], str], limit: int = CALIBRATION_NORMALS) -> dict:
    """The first ``limit`` normal (label 0) un-normalised images of each class of an anomalib dataset.

    In the dataset's order, not a shuffled loader's, so a calibration is repeatable; only those images are read.
    """
    samples = dataset.samples
    labels = samples.label_index.tolist() if "label_index" in samples else [0] * len(samples)
    chosen: dict[str, list[int]] = {}
    for index, (path, label) in enumerate(zip(samples.image_path.astype(str), labels, strict=True)):
        rows = chosen.setdefault(category_of(path), [])
        if int(label) == 0 and len(rows) < limit:
            rows.append(index)
    return {name: torch.stack([dataset[i].image for i in rows]) for name, rows in chosen.items() if rows}


__all__ = [
    "DEFAULT_FALSE_ALARM_RATE",
    "OperatingPoint",
    "OperatingPointPostProcessor",
    "apply_operating_point",
    "check_false_alarm_rate",
    "collect_normals",
    "encode",
    "leave_one_out_statistics",
    "normalised_normal_scores",
]
