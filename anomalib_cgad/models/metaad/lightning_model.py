"""MetaAD: the multi-directional meta-learning framework on image patch features.

Each training step is one episode over the training classes (components/episodes.py):

1. **inner level**: the encoder, decoder and head learn the normal manifold of the inner class's patches:
   one-class BCE ``BCE(σ(z), 1)`` at ``T = 1`` plus ``0.1 ×`` feature reconstruction (``inner_mode="one_class"``,
   the paper's Eq. 4), or binary BCE with synthetic anomalies as negatives (``"supervised"``, what the
   authors' notebooks ran);
2. **outer level** (``episodes.outer=True``): with the encoder frozen except its last layer, the head and ``T`` are
   calibrated on normals (ID) and a few anomalies (OOD) of other classes, after one ODIN step, by the
   softmax confidence margin loss; PCGrad reconciles the per-class outer losses with a clean inner term.

Paper: https://arxiv.org/abs/2601.19833 (tabular data; the image adaptation is ours, see the model README).

See Also:
    :class:`anomalib_cgad.models.metaad.torch_model.MetaADModel`: the PyTorch model.
    :class:`anomalib_cgad.models.episodic.EpisodicMixin`: the episode loop shared with CGAD.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from anomalib.models.components import AnomalibModule

from anomalib_cgad.components.reference_bank import flatten_patches
from anomalib_cgad.deploy.export_mixin import BankExportMixin
from anomalib_cgad.models.base import FewShotModuleMixin
from anomalib_cgad.models.episodic import EpisodeOptions, EpisodicMixin, OuterTerms
from anomalib_cgad.models.metaad.torch_model import MetaADModel
from anomalib_cgad.validation import check_choice

INNER_MODES = ("one_class", "supervised")


@dataclass(frozen=True)
class MetaADScoring:
    """How MetaAD turns a patch into a score.

    Args:
        input_mode (str): ``"residual"`` (against the nearest reference patch) or ``"raw"`` features. Defaults
            to ``"residual"``.
        head (str): normality logit: ``"distance"`` ``z = s(ρ − ‖f_θ(x)‖/ν)`` with a bias-free encoder, or
            ``"cosine"`` ``z = s·cos(w, f_θ(x))``. Defaults to ``"distance"`` (README: measured).
        score (str): patch score ``"logit"`` (``−z/T``) or ``"confidence"`` (``1 − σ(z/T)``, the paper's).
            Defaults to ``"logit"``.
        odin (bool): one ODIN step before scoring (ε = 2e-3). Defaults to ``True``.
        image_score (str): ``"max"`` of the smoothed map or ``"top1p"`` (mean of its top 1%). Defaults to ``"max"``.
    """

    input_mode: str = "residual"
    head: str = "distance"
    score: str = "logit"
    odin: bool = True
    image_score: str = "max"


@dataclass(frozen=True)
class MetaADTraining:
    """MetaAD's training beyond the episodes: the inner objective and the learning rates.

    Args:
        inner_mode (str): ``"one_class"`` (the paper's) or ``"supervised"`` (synthetic anomalies as
            negatives, the authors' notebooks). Defaults to ``"one_class"``.
        reconstruction_weight (float): λ_rec. Defaults to ``0.1``.
        lr (float): inner AdamW learning rate. Defaults to ``1e-3``.
        head_lr (float): outer learning rate of the head. Defaults to ``3e-3``.
        encoder_lr (float): outer learning rate of the last encoder layer. Defaults to ``1e-4``.
        temperature_lr (float): learning rate of ``T``. Defaults to ``1e-3``.
        synthetic_per_class (int): Perlin anomalies made per training class. Defaults to ``16``.
    """

    inner_mode: str = "one_class"
    reconstruction_weight: float = 0.1
    lr: float = 1e-3
    head_lr: float = 3e-3
    encoder_lr: float = 1e-4
    temperature_lr: float = 1e-3
    synthetic_per_class: int = 16

    def __post_init__(self) -> None:
        check_choice("inner_mode", self.inner_mode, INNER_MODES)


class MetaAD(EpisodicMixin, BankExportMixin, FewShotModuleMixin, AnomalibModule):
    """MetaAD lightning module.

    Args:
        scoring (MetaADScoring): input, head, patch score, ODIN and image score. Defaults to
            :class:`MetaADScoring`'s.
        episodes (EpisodeOptions): the episodes of the two levels. ``anomalies_per_class`` (K_anom) uses real
            labelled anomalies of the class when the training set has them, synthetic Perlin ones otherwise;
            ``0`` is the "synthetic only" ablation: the outer level still runs, on ``SYNTHETIC_ONLY_COUNT``
            synthetic anomalies per class, and real labelled anomalies are never used. Defaults to
            :class:`~anomalib_cgad.models.episodic.EpisodeOptions`'s.
        training (MetaADTraining): inner objective, learning rates, synthetic anomalies. Defaults to
            :class:`MetaADTraining`'s.
        **kwargs: the arguments every model shares, declared once in
            :class:`~anomalib_cgad.models.base.FewShotModuleMixin`: ``backbone``, ``layers``, ``backbone_weights``,
            ``k_shot``, ``few_shot_source``, ``false_alarm_rate``, ``seed`` and anomalib's four components.
    """

    demo_epochs = 4
    SYNTHETIC_ONLY_COUNT = 2

    def __init__(
        self,
        scoring: MetaADScoring = MetaADScoring(),
        episodes: EpisodeOptions = EpisodeOptions(),
        training: MetaADTraining = MetaADTraining(),
        **kwargs,
    ) -> None:
        if episodes.outer and episodes.anomalies_per_class == 0 and training.synthetic_per_class == 0:
            msg = "anomalies_per_class=0 (synthetic only) needs synthetic_per_class > 0 for the outer level."
            raise ValueError(msg)
        super().__init__(**kwargs)  # references, operating point, anomalib's components (FewShotModuleMixin)
        self._init_episodes(episodes)
        self.inner_mode = training.inner_mode
        self.reconstruction_weight = training.reconstruction_weight
        self.lr, self.head_lr = training.lr, training.head_lr
        self.encoder_lr, self.temperature_lr = training.encoder_lr, training.temperature_lr
        self.synthetic_per_class = training.synthetic_per_class
        self.model = MetaADModel(
            **self.backbone_args,
            input_mode=scoring.input_mode,
            odin_eps=2e-3 if scoring.odin else 0.0,
            learn_temperature=episodes.learn_temperature,
            image_score=scoring.image_score,
            head=scoring.head,
            score=scoring.score,
        )

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """Inner AdamW (encoder, decoder, head), outer Adam (head, last encoder layer) and a T-only Adam."""
        model = self.model
        inner = torch.optim.AdamW(
            [*model.encoder.parameters(), model.head], lr=self.lr, weight_decay=1e-4, betas=(0.9, 0.99)
        )
        outer = torch.optim.Adam(
            [
                {"params": [model.head], "lr": self.head_lr},
                {"params": list(model.encoder.last.parameters()), "lr": self.encoder_lr},
            ]
        )
        temperature = torch.optim.Adam([model.temperature.rho], lr=self.temperature_lr)
        return [inner, outer, temperature]

    @torch.no_grad()
    def _fit_standardisation(self, chunk: int = 32) -> None:
        """Per-channel mean/std of the projected normal patches of the training classes (streamed, float64)."""
        count, total, squares = 0, 0.0, 0.0
        for pool in self.training_pool.classes.values():
            for start in range(0, pool.num_normals, chunk):
                levels = [level[start : start + chunk].to(self.device) for level in pool.normals]
                rows = flatten_patches(self.model.project(levels)).double()
                count += rows.shape[0]
                total = total + rows.sum(0)
                squares = squares + (rows**2).sum(0)
        mean = total / count
        variance = (squares - count * mean**2) / max(count - 1, 1)
        self.model.mean.copy_(mean.float())
        self.model.std.copy_(variance.clamp(min=0).sqrt().float().clamp(min=1e-6))

    @torch.no_grad()
    def _fit_latent_scale(self, queries: int = 8) -> None:
        """Distance head: ``ν`` = median ``‖f_θ(x)‖`` of training-normal residual patches at initialisation.

        A fixed unit for the radius, so that ``z = s(ρ − ‖u‖/ν)`` starts near ``s(ρ − 1)`` on normals whatever
        the backbone's feature scale (like the per-channel standardisation of the inputs).
        """
        if self.model.head_type != "distance":
            return
        norms = []
        for category in self.training_pool.classes:
            x, coverage = self._class_inputs(category, self.k_shot, queries, 0, prefer_real=False)
            norms.append(self.model.encoder(x).norm(dim=1)[coverage == 0])
        self.model.latent_scale.copy_(torch.cat(norms).median().clamp(min=1e-6))

    def on_train_start(self) -> None:
        """Encode the training classes once, fit the standardisation, set up the episode sampler."""
        if self.training_pool is None:
            self.build_training_pool(self.synthetic_per_class, self.seed)
            self._fit_standardisation()
            self._fit_latent_scale()
        self._init_sampler()

    # ----------------------------------------------------------------- episode pieces
    def _class_inputs(self, category: str, k: int, n_normal: int, n_anomalous: int, prefer_real: bool = True):
        """Head inputs ``(N, C_in, H, W)`` and coverage ``(N, H, W)`` of one class's queries."""
        refs, feats, covs = self.training_pool.draw_class(category, k, n_normal, n_anomalous, prefer_real)
        model = self.model
        with torch.no_grad():
            bank = flatten_patches(model.standardise(model.project([r.to(self.device) for r in refs])))
            embedded = model.standardise(model.project([f.to(self.device) for f in feats]))
            x = model.inputs(embedded, bank)
        return x, covs[0].to(self.device)

    def _inner_step(self, category: str, k: int, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        negatives = self.anomalies_per_class or self.SYNTHETIC_ONLY_COUNT
        n_anomalous = negatives if self.inner_mode == "supervised" else 0
        # supervised negatives are synthetic (authors' notebooks): real labelled anomalies stay for the outer level
        x, coverage = self._class_inputs(category, k, self.inner_queries, n_anomalous, prefer_real=False)
        u = self.model.encoder(x)
        z = self.model.logits_from_latent(u)
        normal = coverage == 0
        loss = F.binary_cross_entropy_with_logits(z[normal], torch.ones_like(z[normal]))
        if self.inner_mode == "supervised" and (coverage >= 0.5).any():
            abnormal = coverage >= 0.5
            loss = loss + F.binary_cross_entropy_with_logits(z[abnormal], torch.zeros_like(z[abnormal]))
        reconstruction = F.mse_loss(self.model.encoder.decoder(u), x)
        loss = loss + self.reconstruction_weight * reconstruction
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()
        return loss.detach()

    def _outer_step(self, outer_classes: Sequence[str], k: int, optimizers: list[torch.optim.Optimizer]) -> dict:
        temperature = self.model.temperature()
        terms = OuterTerms()
        synthetic_only = self.anomalies_per_class == 0
        n_anomalous = self.SYNTHETIC_ONLY_COUNT if synthetic_only else self.anomalies_per_class
        for category in outer_classes:
            x, coverage = self._class_inputs(category, k, n_anomalous, n_anomalous, prefer_real=not synthetic_only)
            with torch.no_grad():
                perturbed = self.model.odin(x)
            z_clean = self.model.logits(x)
            z = self.model.logits(perturbed)
            if self._add_margin_term(terms, category, z[coverage == 0], z[coverage >= 0.5], temperature):
                normal_clean = z_clean[coverage == 0]
                terms.clean.append(F.binary_cross_entropy_with_logits(normal_clean, torch.ones_like(normal_clean)))
        return self._outer_update(
            outer_classes,
            terms,
            optimizers,
            shared=[self.model.head, *self.model.encoder.last.parameters()],
            calibration=[self.model.temperature.rho],
        )
