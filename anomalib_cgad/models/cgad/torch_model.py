"""PyTorch model of CGAD: ResAD's residual representation with a calibrated, class-normalised decision.

CGAD keeps ResAD's pipeline (residuals against the k references → feature constraintor → conditional flow
→ per-level ``logp̄``) and replaces its fixed likelihood-to-score mapping by the meta-learned decision of
the multi-directional framework:

1. normality logit per patch and level: ``z_l = logp̄_l − b_l`` (learned boundary ``b_l``);
2. patch score ``−z_l / T`` (learned temperature ``T``): the logit of ``1 − σ(z_l / T)``, the probability
   the outer level calibrates. The logit ranks patches exactly as the probability does but never saturates:
   on an unseen class whose residuals are all larger than the training classes', ``1 − σ`` rounds to 1.0
   for every patch in float32 and the image scores tie; → up-sample, sum, smooth → raw map;
3. **threshold transfer**: ``b_l`` and ``T`` are learned on the training classes, so the score means the same
   on any class and anomalib's threshold learned on the training classes' validation images carries over.
   Optionally (``normalise_by_references=True``, off by default) the raw map is also standardised,
   ``(map − μ) / σ``, by the mean and standard deviation of the references' own leave-one-out maps (each
   reference against the patches of the *other* references; with k = 1, against its own other positions);
   ``(μ, σ)`` is always part of the bank, computed from the same k images. On ELPV this standardisation
   collapsed F1 from mono to poly (poly's defects are few of poly's large σ above normal), hence off.

Example:
    >>> import torch
    >>> model = CGADModel(backbone_weights=None).eval()
    >>> model.set_reference(torch.rand(2, 3, 128, 128))
    >>> [tuple(t.shape) for t in model.bank_tensors()][-1]
    (2,)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_cgad.components.backbone import OFFLINE_BACKBONE, PRETRAINED
from anomalib_cgad.components.confidence_margin import BoundedTemperature
from anomalib_cgad.components.flow import FlowOptions
from anomalib_cgad.components.reference_bank import BankOptions, best_index, flatten_patches
from anomalib_cgad.models.resad.torch_model import LevelOutputs, ResADModel


def leave_one_out_residuals(features: Sequence[torch.Tensor], matching: str, residual: str) -> list[torch.Tensor]:
    """Residuals of each reference patch against the patches of the *other* references.

    With a single reference the patch itself is excluded instead (nearest other position of the same
    image). Written with masks, not Python branches, so it exports with a dynamic number of references.
    """
    out = []
    for feature in features:
        k, channels, height, width = feature.shape
        rows = flatten_patches(feature)
        image_id = torch.arange(rows.shape[0], device=rows.device) // (height * width)
        same_image = image_id[:, None] == image_id[None, :]
        several = image_id.max() > 0
        identical = torch.eye(rows.shape[0], dtype=torch.bool, device=rows.device)
        excluded = same_image & (several | identical)
        if matching == "cosine":
            normed = torch.nn.functional.normalize(rows, dim=1)
            cost = -(normed @ normed.T)
        else:
            cost = (rows**2).sum(1, keepdim=True) - 2 * rows @ rows.T + (rows**2).sum(1)[None]
        cost = cost + excluded.to(cost.dtype) * 1e12
        diff = rows - rows[best_index(-cost)]
        diff = diff * diff if residual == "sq_diff" else diff
        out.append(diff.reshape(k, height, width, channels).permute(0, 3, 1, 2))
    return out


class CGADModel(ResADModel):
    """CGAD torch model (a :class:`ResADModel` with a learned, reference-normalised decision).

    Args:
        backbone (str): timm backbone. Defaults to ``"tf_efficientnet_lite0"``.
        layers (Sequence[int] | None): backbone stages (CNN) or blocks (ViT). Defaults to ``None``:
            the backbone's default (CNN stages ``(2, 3)``, strides 8 and 16; a ViT's middle and last blocks).
        backbone_weights (str | None): ``"pretrained"``, a checkpoint path or ``None``.
        bank (BankOptions): matching, residual and coreset of the reference bank. Defaults to cosine matching,
            squared residuals, every patch.
        flow (FlowOptions): coupling blocks and positional-code length. Defaults to 8 blocks and a 16-long code
            (:attr:`default_condition_dim`; ResAD: 128; measured, see the model README).
        temperature_bounds (tuple[float, float]): bounds of the learned temperature. Defaults to ``(0.5, 10)``.
        learn_temperature (bool): learn T (else fixed at 1). Defaults to ``True``.
        normalise_by_references (bool): standardise scores by the references' leave-one-out map. Defaults to
            ``False`` (the learned ``b`` and ``T`` are the class-agnostic normalisation).

    Attributes:
        boundary (nn.Parameter): per-level ``b_l``.
        temperature (BoundedTemperature): ``T``.
        scale (torch.Tensor): ``(μ, σ)`` reference normaliser of the current class (part of the bank).
    """

    default_condition_dim = 16
    """ResAD's 128-long positional code cost CGAD accuracy (measured, model README)."""

    def __init__(
        self,
        backbone: str = OFFLINE_BACKBONE,
        layers: Sequence[int] | None = None,
        backbone_weights: str | None = PRETRAINED,
        bank: BankOptions = BankOptions(),
        flow: FlowOptions = FlowOptions(),
        temperature_bounds: tuple[float, float] = (0.5, 10.0),
        learn_temperature: bool = True,
        normalise_by_references: bool = False,
    ) -> None:
        super().__init__(backbone, layers, backbone_weights, bank, flow, score="likelihood")
        self.boundary = nn.Parameter(torch.zeros(len(self.backbone.channels)))
        self.temperature = BoundedTemperature(1.0, temperature_bounds, learn=learn_temperature)
        self.normalise_by_references = normalise_by_references
        self.register_buffer("scale", torch.tensor([0.0, 1.0]))

    def normality_logits(self, logps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``z_l = logp̄_l − b_l`` per level."""
        return [logp - self.boundary[level] for level, logp in enumerate(logps)]

    def patch_scores(self, levels: LevelOutputs) -> list[torch.Tensor]:
        """CGAD's score head: ``−z_l / T`` per level, ``(B, 1, H_l, W_l)``, the logit of ``1 − σ(z_l / T)``
        (it never saturates); the decision is on ``logp̄`` alone."""
        temperature = self.temperature()
        return [(-z / temperature).unsqueeze(1) for z in self.normality_logits(levels.logps)]

    def bank_from_features(self, features: Sequence[torch.Tensor], size: Sequence[int]) -> list[torch.Tensor]:
        """Bank levels of the references plus ``scale = (μ, σ)`` of their leave-one-out maps (shape ``(2,)``)."""
        levels = self.bank.build(features)
        residuals = leave_one_out_residuals(features, self.bank.matching, self.bank.residual)
        loo_map = self.anomaly_map(self.levels_from_residuals(residuals), size)
        scale = torch.stack([loo_map.mean(), loo_map.std(unbiased=False).clamp(min=1e-6)])
        return [*levels, scale]

    def bank_tensors(self) -> list[torch.Tensor]:
        """Bank levels followed by the score scale (the order of :meth:`compute_bank`)."""
        return [*self.bank.tensors(), self.scale]

    def set_bank_tensors(self, tensors: Sequence[torch.Tensor], num_refs: int | None = None) -> None:
        """Store bank levels and the score scale (the order of :meth:`bank_tensors`)."""
        *levels, scale = tensors
        self.bank.set_tensors(list(levels), num_refs=num_refs)
        self.scale = scale.reshape(-1).to(self.scale.device)

    def is_bank_state(self, name: str) -> bool:
        """The bank levels and the score scale (both computed from the references)."""
        return super().is_bank_state(name) or name == "scale"

    def score_features(
        self, features: Sequence[torch.Tensor], bank: Sequence[torch.Tensor], size: Sequence[int]
    ) -> InferenceBatch:
        """Scores and maps of backbone levels against explicit bank tensors (levels + scale)."""
        *levels, scale = bank
        anomaly_map = self.anomaly_map(self.level_outputs(features, levels), size)
        if self.normalise_by_references:
            anomaly_map = (anomaly_map - scale[0]) / scale[1]
        pred_score = torch.amax(anomaly_map, dim=(-2, -1)).reshape(-1)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Score normalised ``images`` against the stored bank."""
        return self.forward_with_bank(images, self.bank_tensors())
