"""CGAD: ResAD's residual representation trained with multi-directional meta-learning.

Each training step is one episode over the *training* classes (components/episodes.py):

1. **inner level** (representation): on normal images of the episode's inner class, residuals against k
   references of that class are constrained (pseudo-Huber OCC) and fitted by the flow (maximum likelihood);
2. **outer level** (decision calibration): on the OOD classes, normals (ID) and a few anomalies (OOD; real
   labelled ones when the training set has them, Perlin-synthetic otherwise) are scored through
   ``z = logp̄ − b`` and the softmax confidence margin loss (components/confidence_margin.py) tunes the flow,
   the boundaries ``b`` and the temperature ``T``; PCGrad reconciles the per-class outer losses with a clean
   maximum-likelihood term on the ID normals.

At test time an unseen class needs k normal references; scores are logits of the calibrated decision
``1 − σ((logp̄ − b)/T)`` whose boundaries and temperature were learned on the training classes, so anomalib's
threshold learned on the training classes transfers.

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_cgad import CGAD
    >>> from anomalib_cgad.data import CrossClass
    >>> datamodule = CrossClass(source_dataset="ELPV", source_categories=["mono"], target_categories=["poly"])
    >>> Engine(max_epochs=4).train(CGAD(), datamodule=datamodule)  # doctest: +SKIP

See Also:
    :class:`anomalib_cgad.models.cgad.torch_model.CGADModel`: the PyTorch model.
    :class:`anomalib_cgad.components.episodes.EpisodeSampler`: the episodes.
    :class:`anomalib_cgad.models.episodic.EpisodicMixin`: the episode loop shared with MetaAD.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from anomalib.models.components import AnomalibModule

from anomalib_cgad.components.flow import FlowOptions
from anomalib_cgad.components.reference_bank import BankOptions, flatten_patches
from anomalib_cgad.components.residual_loss import BoundaryEMA, flow_loss_paper, occ_paper
from anomalib_cgad.deploy.export_mixin import BankExportMixin
from anomalib_cgad.models.base import FewShotModuleMixin
from anomalib_cgad.models.cgad.torch_model import (
    ADAPTATIONS,
    CGADModel,
)
from anomalib_cgad.models.episodic import EpisodeOptions, EpisodicMixin, OuterTerms
from anomalib_cgad.validation import check_choice, check_count


@dataclass(frozen=True)
class CGADTraining:
    """CGAD's training beyond the episodes: learning rates, anomalies and a scoring ablation.

    Args:
        lr (float): inner learning rate (constraintor + flow). Defaults to ``2e-4``.
        outer_lr (float): outer learning rate of the flow. Defaults to ``1e-4``.
        calibration_lr (float): learning rate of ``b`` and ``T``. Defaults to ``1e-2``.
        synthetic_per_class (int): Perlin anomalies made per training class. Defaults to ``16``.
        inner_anomalies (int): anomalous images per inner class and episode that the inner level also fits:
            their residuals are pushed below a boundary of the normal log-likelihood (ResAD's BG-SPP,
            ``flow_loss_paper``). ``0`` = the inner level sees normal images only. Defaults to ``0``
            (measured in the model README).
        normalise_by_references (bool): also standardise scores by the references' leave-one-out map. Defaults
            to ``False``: the boundaries and temperature learned on the training classes already put every class
            on one scale, and the standardisation collapsed F1 from mono to poly on ELPV (model README).
        adaptation (str): how the model adapts to a class's k references (``"none"``, ``"reference_scale"``,
            ``"level_scale"``, ``"meta_scale"``, ``"latent_centre"``;
            :class:`~anomalib_cgad.models.cgad.torch_model.CGADModel`). In every episode the inner and outer
            classes are adapted to their own drawn references, as a new class is to its bank. Defaults to
            ``"none"``: the three residual scalings lost 0.03-0.07 image AUROC on the generated leave-one-class-out
            classes; ``"latent_centre"`` ranks level with ``"none"`` at k = 4 and holds the requested false-alarm
            rate on ELPV at k = 4, but costs up to 0.034 on ELPV at k = 1 and 2 and over-alarms at k = 8 from poly
            to mono (model README, *Class adaptation*).
    """

    lr: float = 2e-4
    outer_lr: float = 1e-4
    calibration_lr: float = 1e-2
    synthetic_per_class: int = 16
    inner_anomalies: int = 0
    normalise_by_references: bool = False
    adaptation: str = "none"

    def __post_init__(self) -> None:
        check_count("inner_anomalies", self.inner_anomalies, minimum=0)
        check_choice("adaptation", self.adaptation, ADAPTATIONS)


class CGAD(EpisodicMixin, BankExportMixin, FewShotModuleMixin, AnomalibModule):
    """CGAD lightning module (the default model of anomalib-cgad).

    Args:
        bank (BankOptions): matching, residual and coreset of the reference bank. Defaults to cosine matching
            (ResAD's released code; measured better than ``"l2"`` on ELPV, see the model README), squared
            residuals and every patch (``coreset=0.5`` halves the nearest-reference search; measured in the
            model README).
        flow (FlowOptions): coupling blocks per level and positional-code length. Defaults to 8 blocks and
            ``condition_dim=None``: CGAD's 16-long code (ResAD: 128; measured, see the model README).
        episodes (EpisodeOptions): the episodes of the two levels (reference counts, direction, margin,
            PCGrad, outer level on/off, queries, anomalies per class, episodes per epoch, learned ``T``).
            Defaults to :class:`~anomalib_cgad.models.episodic.EpisodeOptions`'s.
        training (CGADTraining): learning rates, synthetic and inner anomalies, the score standardisation
            ablation. Defaults to :class:`CGADTraining`'s.
        **kwargs: the arguments every model shares, declared once in
            :class:`~anomalib_cgad.models.base.FewShotModuleMixin`: ``backbone``, ``layers``, ``backbone_weights``,
            ``k_shot``, ``few_shot_source``, ``false_alarm_rate``, ``seed`` and anomalib's four components.

    Example:
        >>> model = CGAD(backbone_weights=None, flow=FlowOptions(coupling_blocks=4))  # code length: CGAD's
        >>> len(model.model.flow.flows[0].module_list), model.model.flow.condition_dim
        (4, 16)
    """

    demo_epochs = 4
    inner_log_name = "inner_nll"
    FLAT_ALIASES: ClassVar[dict[str, str]] = {"reference_coreset": "bank.coreset"}
    """Flat names of anomalib-cgad 0.1 that are not their field's name (:mod:`anomalib_cgad.models.options`)."""

    def __init__(
        self,
        bank: BankOptions = BankOptions(),
        flow: FlowOptions = FlowOptions(),
        episodes: EpisodeOptions = EpisodeOptions(),
        training: CGADTraining = CGADTraining(),
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)  # references, operating point, anomalib's components (FewShotModuleMixin)
        self._init_episodes(episodes)
        self.inner_anomalies = training.inner_anomalies
        self._inner_boundaries: list[BoundaryEMA] | None = None  # made at the first inner step
        self.lr, self.outer_lr, self.calibration_lr = training.lr, training.outer_lr, training.calibration_lr
        self.synthetic_per_class = training.synthetic_per_class
        self.model = CGADModel(
            **self.backbone_args,
            bank=bank,
            flow=flow,
            learn_temperature=episodes.learn_temperature,
            normalise_by_references=training.normalise_by_references,
            adaptation=training.adaptation,
        )

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """Inner (constraintor + flow), outer (flow) and calibration (``b``, ``T``) optimisers."""
        inner = torch.optim.Adam(
            [*self.model.constraintor.parameters(), *self.model.flow.parameters()], lr=self.lr, weight_decay=5e-4
        )
        outer = torch.optim.Adam(self.model.flow.parameters(), lr=self.outer_lr)
        calibration = torch.optim.Adam(
            [self.model.boundary, self.model.temperature.rho, *self.model.adaptation_parameters()],
            lr=self.calibration_lr,
        )
        return [inner, outer, calibration]

    def on_train_start(self) -> None:
        """Encode the training classes once and set up the episode sampler."""
        if self.training_pool is None:
            self.build_training_pool(self.synthetic_per_class, self.seed)
        self._init_sampler()

    # ----------------------------------------------------------------- episode pieces
    def _class_rows(self, category: str, k: int, n_normal: int, n_anomalous: int):
        """Residual maps and coverage of ``n_normal`` normals + ``n_anomalous`` anomalies vs k references."""
        refs, feats, covs = self.training_pool.draw_class(category, k, n_normal, n_anomalous)
        refs = [r.to(self.device) for r in refs]
        bank = [flatten_patches(r) for r in refs]
        residuals = self.model.bank.residuals([f.to(self.device) for f in feats], bank)
        latent_means = None
        if self.model.adaptation != "none":  # the class's descriptor from its drawn references, as at bank time
            descriptor = self.model.episode_descriptor(refs)
            residuals = self.model.adapt(residuals, descriptor)
            latent_means = self.model.latent_means(descriptor)
        return residuals, [c.to(self.device) for c in covs], latent_means

    def _logp_rows(self, constrained: list[torch.Tensor], latent_means=None) -> list[torch.Tensor]:
        return [logp.reshape(-1) for logp, _ in self.model.flow_levels(constrained, latent_means)]

    def _inner_step(self, category: str, k: int, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        residuals, coverage, latent_means = self._class_rows(category, k, self.inner_queries, self.inner_anomalies)
        constrained = self.model.constraintor(residuals)
        occ = sum(
            occ_paper(flatten_patches(x), flatten_patches(r).detach(), c.reshape(-1))
            for x, r, c in zip(constrained, residuals, coverage, strict=True)
        )
        logps = self._logp_rows([x.detach() for x in constrained], latent_means)
        if not self.inner_anomalies:
            nll = -sum(logp.mean() for logp in logps)
            flow_loss = nll
        else:  # normal NLL + BG-SPP: anomalous residuals below the EMA boundary of normal log-likelihood
            if self._inner_boundaries is None:
                self._inner_boundaries = [BoundaryEMA() for _ in logps]
            flow_loss, nll = 0.0, 0.0
            for logp, cov, ema in zip(logps, coverage, self._inner_boundaries, strict=True):
                cov = cov.reshape(-1)
                normal = logp[cov < 0.5]
                flow_loss = flow_loss + flow_loss_paper(logp, cov, ema.update(normal))
                nll = nll - normal.mean()
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(occ + flow_loss)
        optimizer.step()
        return nll.detach()

    def _outer_step(self, outer_classes: Sequence[str], k: int, optimizers: list[torch.optim.Optimizer]) -> dict:
        temperature = self.model.temperature()
        terms = OuterTerms()
        for category in outer_classes:
            n = max(self.anomalies_per_class, 1)
            residuals, coverage, latent_means = self._class_rows(category, k, n, self.anomalies_per_class)
            # the constraintor is the inner level's; with "meta_scale" its input carries the outer level's α, β
            with torch.set_grad_enabled(bool(self.model.adaptation_parameters())):
                constrained = self.model.constraintor(residuals)
            logps = self._logp_rows(constrained, latent_means)
            z = torch.cat([(logp - self.model.boundary[level]) for level, logp in enumerate(logps)])
            cov = torch.cat([c.reshape(-1) for c in coverage])
            if self._add_margin_term(terms, category, z[cov == 0], z[cov >= 0.5], temperature):
                normal = [logp[cov_l.reshape(-1) == 0] for logp, cov_l in zip(logps, coverage, strict=True)]
                terms.clean.append(-torch.cat(normal).mean())
        return self._outer_update(
            outer_classes,
            terms,
            optimizers,
            shared=list(self.model.flow.parameters()),
            calibration=[self.model.boundary, self.model.temperature.rho, *self.model.adaptation_parameters()],
        )
