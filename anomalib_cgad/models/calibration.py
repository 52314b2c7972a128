"""The normal-only operating point of a model: calibrated on the training classes, applied to every new class.

:class:`OperatingPointMixin` owns the model's :class:`~anomalib_cgad.components.operating_point.OperatingPoint`
(``tau`` per requested false-alarm rate) and the requested rate itself. Setting a class's references computes
its leave-one-out ``(location, scale)`` (:class:`~anomalib_cgad.models.references.ReferenceMixin`); scores
leave the model as ``(raw − location) / scale − tau(false_alarm_rate)``, so anomalib's post-processor labels at
a threshold fixed at 0. ``tau`` comes from :meth:`OperatingPointMixin.calibrate_operating_point`: episodes on
the training classes, run at the start of every validation while fitting.
"""

from __future__ import annotations

import logging
from typing import Protocol, runtime_checkable

import torch
from anomalib.data import InferenceBatch
from anomalib.post_processing import PostProcessor

from anomalib_cgad.components.operating_point import (
    OperatingPoint,
    OperatingPointPostProcessor,
    apply_operating_point,
    check_false_alarm_rate,
    collect_normals,
    normalised_normal_scores,
)

logger = logging.getLogger(__name__)

__all__ = ["OperatingPointHost", "OperatingPointMixin"]


@runtime_checkable
class OperatingPointHost(Protocol):
    """What :class:`OperatingPointMixin` needs from the class it is mixed into (an ``AnomalibModule``).

    ``model`` is the torch model (scores of normalised images), ``pre_processor`` and ``post_processor``
    anomalib's, ``k_shot`` the references per class and ``_category_resolver(datamodule)`` the image path →
    training class mapping of the datamodule.
    """

    model: torch.nn.Module
    k_shot: int

    def _category_resolver(self, datamodule=None): ...


class OperatingPointMixin:
    """The operating point: ``false_alarm_rate``, its calibration, its threshold and the forward that applies it."""

    def _init_operating_point(self, false_alarm_rate: float) -> None:
        """The requested false-alarm rate (checked) and an uncalibrated operating point."""
        self.false_alarm_rate = check_false_alarm_rate(false_alarm_rate)
        self.operating_point = OperatingPoint()

    def configure_post_processor(self) -> PostProcessor:
        """anomalib's post-processor with its threshold fixed at 0: the normal-only operating point of each class."""
        return OperatingPointPostProcessor()

    def calibrate_operating_point(self, datamodule=None, k: int | None = None, seed: int = 0) -> None:
        """Calibrate ``tau`` per requested false-alarm rate on the training classes' normal images.

        Episodes: each training class in turn plays the new product (k of its normal training images are the
        references, the others are scored and normalised by the references' leave-one-out statistics);
        the pooled normalised scores give ``tau(rate)``, their ``1 − rate`` quantile. Runs automatically at
        the start of every validation while fitting; call it yourself to recalibrate a loaded model (e.g. a
        checkpoint from before the operating point) or for another ``k``.

        Args:
            datamodule: a set-up datamodule with ``train_data`` (default: the trainer's).
            k (int | None): references per episode. Defaults to ``k_shot``.
            seed (int): seed of the reference draws. Defaults to ``0``.
        """
        datamodule = datamodule if datamodule is not None else self.trainer.datamodule
        k = int(k or self.k_shot)
        resolver = self._category_resolver(datamodule)
        normals = collect_normals(datamodule.train_data, resolver)
        device = self.device
        normals = {name: images.to(device) for name, images in normals.items()}
        was_training = self.model.training
        self.model.eval()
        try:
            pooled = normalised_normal_scores(self.model, normals, k, self.pre_processor.transform, seed=seed)
        finally:
            self.model.train(was_training)
        self.operating_point.set_calibration(pooled, k)
        logger.info(
            "Operating point of %s calibrated on %d training classes (%d normalised normal scores, k=%d): "
            "tau(%.3g) = %.3f.", type(self).__name__, len(normals), len(pooled), k, self.false_alarm_rate,
            self.operating_point.tau(self.false_alarm_rate),
        )  # fmt: skip

    def forward(self, batch: torch.Tensor, *args, **kwargs):
        """anomalib's forward (pre-processor → model → post-processor) with the operating point before the post.

        Used by anomalib's exporters (``model.xml`` freezes the current class's operating point with its bank)
        and by direct calls on image tensors.
        """
        del args, kwargs
        batch = self.pre_processor(batch) if self.pre_processor else batch
        batch = self.at_operating_point(self.model(batch))
        return self.post_processor(batch) if self.post_processor else batch

    def at_operating_point(self, output: InferenceBatch) -> InferenceBatch:
        """The torch model's raw ``output`` as scores at the operating point (labelled anomalous above 0)."""
        return apply_operating_point(output, self.operating_point.vector(self.false_alarm_rate))

    def image_threshold(self, false_alarm_rate: float | None = None) -> float:
        """The current class's threshold on the raw image score at a requested false-alarm rate."""
        return self.operating_point.threshold(self.false_alarm_rate if false_alarm_rate is None else false_alarm_rate)
