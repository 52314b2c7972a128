"""Training-free k-shot patch-kNN baseline on the same backbone, layers and references as the anomalib-cgad models.

Steps (for a test image of a class whose k normal references are known):

1. features of the query and of the k references from the shared frozen backbone
   (:class:`anomalib_cgad.components.backbone.FeatureExtractor`, the same layers as CGAD/ResAD/MetaAD);
2. per level, every query patch is matched to its nearest reference patch
   (:func:`anomalib_cgad.components.reference_bank.nearest_reference`); the patch score is the L2 distance;
3. the per-level distance maps are upsampled to the input size, averaged over levels and smoothed with a
   Gaussian (anomalib's ``GaussianBlur2d``);
4. the image score is the maximum of the map.

The Lightning module mixes in :class:`~anomalib_cgad.models.base.FewShotModuleMixin`, so it receives exactly the
references the trained models receive (the cross-class datamodule's ``reference_images``), uses the same
pre-processor and per-class evaluator, and learns its threshold with anomalib's post-processor on the source
classes' validation. It is a baseline: it is *not* registered as an anomalib-cgad plugin model.

Example:
    >>> from anomalib.engine import Engine
    >>> from benchmarks.patch_knn import PatchKNN
    >>> from anomalib_cgad.data import CrossClass
    >>> datamodule = CrossClass(source_dataset="ELPV", source_categories=["mono"], target_categories=["poly"])
    >>> Engine().test(PatchKNN(k_shot=4), datamodule=datamodule)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import InferenceBatch
from anomalib.models.components import AnomalibModule, GaussianBlur2d

from anomalib_cgad.components.backbone import FeatureExtractor
from anomalib_cgad.components.bank_model import BankModel
from anomalib_cgad.components.patch_knn import patch_knn_map
from anomalib_cgad.components.reference_bank import ReferenceBank
from anomalib_cgad.models.base import FewShotModuleMixin


class PatchKNNModel(BankModel):
    """Torch model: nearest-reference-patch distance map and its maximum.

    Args:
        backbone (str): timm backbone. Defaults to ``"tf_efficientnet_lite0"``.
        layers (Sequence[int] | None): backbone stages (CNN) or blocks (ViT). Defaults to ``None``:
            the backbone's default (CNN stages ``(2, 3)``, strides 8 and 16; a ViT's middle and last blocks).
        backbone_weights (str | None): ``"pretrained"``, a checkpoint path or ``None``. Defaults to ``"pretrained"``.
        sigma (float): Gaussian smoothing of the map, in pixels. Defaults to ``4.0``.

    Example:
        >>> model = PatchKNNModel(backbone_weights=None).eval()
        >>> model.set_reference(torch.rand(2, 3, 64, 64))
        >>> out = model(torch.rand(3, 3, 64, 64))
        >>> tuple(out.pred_score.shape), tuple(out.anomaly_map.shape)
        ((3,), (3, 1, 64, 64))
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: Sequence[int] | None = None,
        backbone_weights: str | None = "pretrained",
        sigma: float = 4.0,
    ) -> None:
        super().__init__()
        self.backbone = FeatureExtractor(backbone, layers=layers, weights=backbone_weights)
        self.bank = ReferenceBank(num_levels=len(self.backbone.layers))
        kernel = 2 * int(4.0 * sigma + 0.5) + 1
        self.blur = GaussianBlur2d(kernel_size=(kernel, kernel), sigma=(sigma, sigma), channels=1)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen backbone's levels of normalised images."""
        return self.backbone(images)

    def score_features(
        self, features: Sequence[torch.Tensor], bank: Sequence[torch.Tensor], size: Sequence[int]
    ) -> InferenceBatch:
        """Scores and maps of backbone levels against explicit bank tensors."""
        anomaly_map = self.blur(patch_knn_map(features, bank, size))
        return InferenceBatch(pred_score=anomaly_map.flatten(1).amax(1), anomaly_map=anomaly_map)

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Score normalised images ``(B, 3, H, W)`` against the stored references.

        Returns:
            InferenceBatch: ``pred_score (B,)`` and ``anomaly_map (B, 1, H, W)``.
        """
        if not self.bank.is_set:
            msg = "PatchKNN has no references: set them with set_reference(images) first."
            raise RuntimeError(msg)
        return self.forward_with_bank(images, self.bank.tensors())


class PatchKNN(FewShotModuleMixin, AnomalibModule):
    """Training-free k-shot patch-kNN baseline (FEW_SHOT: ``Engine.fit`` only validates, to learn thresholds).

    Args:
        sigma (float): Gaussian smoothing of the map. Defaults to ``4.0``.
        **kwargs: the arguments every model shares (``backbone``, ``layers``, ``backbone_weights``, ``k_shot``,
            ``few_shot_source``, ``false_alarm_rate``, ``seed``, anomalib's four components), as the models:
            :class:`~anomalib_cgad.models.base.FewShotModuleMixin`.
    """

    def __init__(self, sigma: float = 4.0, **kwargs) -> None:
        super().__init__(**kwargs)  # references, operating point, anomalib's components (FewShotModuleMixin)
        self.model = PatchKNNModel(**self.backbone_args, sigma=sigma)

    def configure_optimizers(self) -> None:
        """Training-free: no optimiser."""
        return

    def training_step(self, batch: Any, *args, **kwargs) -> torch.Tensor:
        """Nothing to train (never called by ``Engine`` for a FEW_SHOT model)."""
        del batch, args, kwargs
        return torch.tensor(0.0, requires_grad=True, device=self.device)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """One epoch at most, no sanity validation."""
        return {"max_epochs": 1, "num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """``FEW_SHOT``: nothing is fitted; validation on the source classes learns the threshold."""
        return LearningType.FEW_SHOT
