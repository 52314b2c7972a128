"""PyTorch model of ResAD: residual features → feature constraintor → conditional flow → anomaly map.

With a ``codebook`` (the ``official`` preset of the lightning module) the model also holds ResAD++'s residual
codebook, and in eval mode every residual map is moved towards the codes by EFDM before the constraintor
(:mod:`anomalib_cgad.components.distribution_matching`). This happens inside :meth:`ResADModel.test_residuals`,
so ``forward``, ``forward_with_bank`` and the exported graphs all include it; training never applies it.

Example:
    >>> import torch
    >>> from anomalib_cgad.models.resad.torch_model import ResADModel
    >>> model = ResADModel(backbone_weights=None).eval()
    >>> model.set_reference(torch.rand(2, 3, 128, 128))
    >>> out = model(torch.rand(1, 3, 128, 128))
    >>> out.pred_score.shape, out.anomaly_map.shape
    (torch.Size([1]), torch.Size([1, 1, 128, 128]))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_cgad.components.anomaly_map import AnomalyMapGenerator
from anomalib_cgad.components.backbone import OFFLINE_BACKBONE, PRETRAINED, FeatureExtractor
from anomalib_cgad.components.bank_model import BankModel
from anomalib_cgad.components.distribution_matching import CodebookOptions, ResidualCodebook, efdm
from anomalib_cgad.components.flow import ConditionalFlow, FlowOptions
from anomalib_cgad.components.reference_bank import BankOptions, ReferenceBank


class FeatureConstraintor(nn.ModuleList):
    """ResAD's feature constraintor: one ``Conv3×3 → BN → ReLU`` per level (paper Sec. 3.2, Tab. 2b)."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__(
            nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=False)) for c in channels
        )

    def forward(self, residuals: Sequence[torch.Tensor]) -> list[torch.Tensor]:  # type: ignore[override]
        """Constrain each level's residual map."""
        return [block(r) for block, r in zip(self, residuals, strict=True)]


class LevelOutputs(NamedTuple):
    """What the model computes per feature level before the score head (each a list over levels)."""

    residuals: list[torch.Tensor]
    """``(B, C_l, H_l, W_l)`` residuals against the nearest reference patches (EFDM-matched in eval mode)."""
    constrained: list[torch.Tensor]
    """The feature constraintor's output."""
    logps: list[torch.Tensor]
    """``(B, H_l, W_l)`` per-patch mean log-likelihood ``logp̄`` of the flow."""
    zmeans: list[torch.Tensor]
    """``(B, H_l, W_l)`` per-patch ``mean_c(z)`` of the flow (the ``"merged"`` score's second term)."""


class ResADModel(BankModel):
    """ResAD torch model.

    Args:
        backbone (str): timm backbone. Defaults to ``"tf_efficientnet_lite0"`` (offline ImageNet weights).
        layers (Sequence[int] | None): backbone stages (CNN) or blocks (ViT). Defaults to ``None``:
            the backbone's default (CNN stages ``(2, 3)``, strides 8 and 16; a ViT's middle and last blocks).
        backbone_weights (str | None): ``"pretrained"``, a checkpoint path, or ``None`` (random).
        bank (BankOptions): matching, residual and coreset of the reference bank. Defaults to cosine matching,
            squared residuals, every patch (:class:`~anomalib_cgad.components.reference_bank.BankOptions`).
        flow (FlowOptions): coupling blocks and positional-code length. Defaults to 8 and
            :attr:`default_condition_dim` (128).
        score (str): ``"likelihood"`` (S1 = Σ_l 1 − exp(logp̄_l − m_l)) or ``"merged"`` ((S1 + S2)/2 with
            S2 = mean_l σ(mean_c z − ½), the official code's score). Defaults to ``"merged"``.
        sigma (float): Gaussian smoothing of the map. Defaults to ``4``.
        codebook (CodebookOptions | None): hold a residual codebook and apply EFDM to the residuals in eval mode
            (ResAD++'s feature distribution matching, released code only). Defaults to ``None`` (off; the
            lightning ``ResAD`` turns it on in its ``official`` preset).

    Attributes:
        backbone (FeatureExtractor): frozen feature extractor.
        bank (ReferenceBank): k-shot reference patches of the current class.
        constraintor (FeatureConstraintor): per-level Conv-BN-ReLU.
        flow (ConditionalFlow): per-level conditional normalizing flow.
        codebook (ResidualCodebook | None): per-level codes of normal training residuals (with ``codebook`` only).
        logp_max (torch.Tensor): per-level normaliser ``m_l`` (max ``logp̄`` on training normals).
    """

    default_condition_dim = 128
    """Positional-code length when ``flow.condition_dim`` is ``None`` (ResAD's released code)."""

    def __init__(
        self,
        backbone: str = OFFLINE_BACKBONE,
        layers: Sequence[int] | None = None,
        backbone_weights: str | None = PRETRAINED,
        bank: BankOptions = BankOptions(),
        flow: FlowOptions = FlowOptions(),
        score: str = "merged",
        sigma: float = 4.0,
        codebook: CodebookOptions | None = None,
    ) -> None:
        super().__init__()
        if score not in {"likelihood", "merged"}:
            msg = f"score must be 'likelihood' or 'merged', got '{score}'."
            raise ValueError(msg)
        self.backbone = FeatureExtractor(backbone, layers, backbone_weights)
        channels = self.backbone.channels
        self.bank = ReferenceBank(len(channels), bank.matching, bank.residual, bank.coreset)
        self.constraintor = FeatureConstraintor(channels)
        flow = flow.resolved(self.default_condition_dim)
        self.flow = ConditionalFlow(channels, flow.coupling_blocks, flow.condition_dim)
        self.codebook = None if codebook is None else ResidualCodebook(channels, codebook.codes, codebook.beta)
        self.fdm_alpha = 1.0 if codebook is None else codebook.alpha
        self.anomaly_map_generator = AnomalyMapGenerator(sigma=sigma)
        self.score = score
        self.register_buffer("logp_max", torch.zeros(len(channels)))

    # ----------------------------------------------------------------- bank
    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen backbone's levels of normalised images."""
        return self.backbone(images)

    def bank_metadata(self) -> dict:
        """What a bank must match to be used with this model."""
        return {
            "backbone": self.backbone.backbone,
            "layers": self.backbone.layers,
            "channels": self.backbone.channels,
            "matching": self.bank.matching,
            "residual": self.bank.residual,
            "reference_coreset": self.bank.coreset,
        }

    # ----------------------------------------------------------------- scoring
    def match_distribution(self, residuals: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """EFDM of every level's residual map towards its nearest codes (identity without a codebook)."""
        if self.codebook is None:
            return list(residuals)
        return [
            efdm(residual, self.codebook.nearest(level, residual), self.fdm_alpha)
            for level, residual in enumerate(residuals)
        ]

    def test_residuals(self, features: Sequence[torch.Tensor], bank: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-level residuals of backbone features against bank levels, as the constraintor sees them.

        In eval mode, with a codebook, they are the EFDM-matched ones (training never applies EFDM, as in the
        released code).
        """
        residuals = self.bank.residuals(features, bank)
        if self.codebook is not None and not self.training:
            residuals = self.match_distribution(residuals)
        return residuals

    def level_outputs(self, features: Sequence[torch.Tensor], bank: Sequence[torch.Tensor]) -> LevelOutputs:
        """The levels of backbone features against bank tensors (:class:`LevelOutputs`)."""
        return self.levels_from_residuals(self.test_residuals(features, bank))

    def levels_from_residuals(
        self, residuals: Sequence[torch.Tensor], latent_means: Sequence[torch.Tensor] | None = None
    ) -> LevelOutputs:
        """Constraintor and flow of per-level residual maps (``latent_means``: per-level base means of the flow)."""
        constrained = self.constraintor(residuals)
        flows = self.flow_levels(constrained, latent_means)
        return LevelOutputs(list(residuals), constrained, [logp for logp, _ in flows], [zmean for _, zmean in flows])

    def flow_levels(
        self, constrained: Sequence[torch.Tensor], latent_means: Sequence[torch.Tensor] | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(logp̄, mean_c(z))`` maps of each level's constrained residuals (``latent_means``: the flow's
        per-level base means, ``None``: ``N(0, I)`` at every level)."""
        means = [None] * len(constrained) if latent_means is None else list(latent_means)
        return [
            self.flow(level, feature, mean)
            for level, (feature, mean) in enumerate(zip(constrained, means, strict=True))
        ]

    def patch_scores(self, levels: LevelOutputs) -> list[torch.Tensor]:
        """Per-level patch anomaly scores ``(B, 1, H_l, W_l)`` before up-sampling: the model's score head.

        ResAD's: ``S1 = 1 − exp(logp̄_l − m_l)``, and with the ``"merged"`` score also the flow's ``mean_c(z)``
        term; a subclass with another decision (CGAD's calibrated logits) overrides this method alone.
        """
        scores = []
        for level, (logp, zmean) in enumerate(zip(levels.logps, levels.zmeans, strict=True)):
            s1 = 1 - torch.exp((logp - self.logp_max[level]).clamp(max=0))
            if self.score == "merged":
                s2 = torch.sigmoid(zmean - 0.5)
                scores.append(((s1 + s2 / len(levels.logps)) / 2).unsqueeze(1))
            else:
                scores.append(s1.unsqueeze(1))
        return scores

    def anomaly_map(self, levels: LevelOutputs, size: Sequence[int]) -> torch.Tensor:
        """The up-sampled, summed and smoothed map ``(B, 1, H, W)`` of the patch scores."""
        return self.anomaly_map_generator(self.patch_scores(levels), size)

    def score_features(
        self, features: Sequence[torch.Tensor], bank: Sequence[torch.Tensor], size: Sequence[int]
    ) -> InferenceBatch:
        """Scores and maps of backbone levels against explicit bank tensors."""
        anomaly_map = self.anomaly_map(self.level_outputs(features, bank), size)
        pred_score = torch.amax(anomaly_map, dim=(-2, -1)).reshape(-1)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Score normalised ``images`` against the stored bank (eval mode)."""
        return self.forward_with_bank(images, self.bank.tensors())
