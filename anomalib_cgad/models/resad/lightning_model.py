"""ResAD: residual feature learning for class-generalizable anomaly detection.

ResAD matches every patch feature of an image to its nearest patch among k normal reference images of the
*same* class and learns the distribution of the residuals with a feature constraintor and a conditional
normalizing flow. Residuals of normal patches look alike across classes, so the model trained on some
classes scores an unseen class from its k references, with no retraining. The ``official`` preset adds the
released code's (ResAD++) feature distribution matching: a codebook of normal training residuals and, at test
time, EFDM of the residuals towards it (:mod:`anomalib_cgad.components.distribution_matching`).

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_cgad import ResAD
    >>> from anomalib_cgad.data import CrossClass
    >>> datamodule = CrossClass(source_dataset="ELPV", source_categories=["mono"], target_categories=["poly"])
    >>> engine = Engine(max_epochs=5)
    >>> engine.train(ResAD(), datamodule=datamodule)  # doctest: +SKIP

Paper: https://arxiv.org/abs/2410.20047

See Also:
    :class:`anomalib_cgad.models.resad.torch_model.ResADModel`: the PyTorch model.
    :class:`anomalib_cgad.components.anomaly_map.AnomalyMapGenerator`: the anomaly map.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from anomalib.models.components import AnomalibModule
from lightning.pytorch.utilities.types import STEP_OUTPUT

from anomalib_cgad.components.distribution_matching import CodebookOptions
from anomalib_cgad.components.flow import FlowOptions, chunks
from anomalib_cgad.components.reference_bank import BankOptions, flatten_patches, residual_features
from anomalib_cgad.components.residual_loss import (
    BoundaryEMA,
    flow_loss_official,
    flow_loss_paper,
    occ_log_barrier,
    occ_paper,
)
from anomalib_cgad.deploy.export_mixin import BankExportMixin
from anomalib_cgad.models.base import FewShotModuleMixin
from anomalib_cgad.models.resad.torch_model import ResADModel
from anomalib_cgad.validation import check_choice, check_count

logger = logging.getLogger(__name__)

OCC_LOSSES = ("paper", "log_barrier")
FLOW_LOSSES = ("paper", "official")
SCORES = ("likelihood", "merged")

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "matching": "l2",
        "residual": "diff",
        "occ": "paper",
        "flow_loss": "paper",
        "score": "likelihood",
        "fdm": False,
    },
    "official": {
        "matching": "cosine",
        "residual": "sq_diff",
        "occ": "log_barrier",
        "flow_loss": "official",
        "score": "merged",
        "fdm": True,
    },
}


@dataclass(frozen=True)
class PresetOverrides:
    """Single entries of ResAD's preset to override (``None``: the preset's).

    Args:
        occ (str | None): feature constraintor loss, ``"paper"`` (pseudo-Huber) or ``"log_barrier"``.
        flow_loss (str | None): ``"paper"`` (NLL + BG-SPP hinge) or ``"official"`` (ψ-NLL + abnormal density + focal).
        score (str | None): ``"likelihood"`` or ``"merged"``.
        fdm (bool | None): ResAD++'s feature distribution matching: a codebook of normal training residuals per
            level, and EFDM of the test residuals towards it before the constraintor (released code only)
            (``official``: on, ``paper``: off).
    """

    occ: str | None = None
    flow_loss: str | None = None
    score: str | None = None
    fdm: bool | None = None

    def __post_init__(self) -> None:
        for name, choices in (("occ", OCC_LOSSES), ("flow_loss", FLOW_LOSSES), ("score", SCORES)):
            if getattr(self, name) is not None:
                check_choice(name, getattr(self, name), choices)


@dataclass(frozen=True)
class ResADTraining:
    """ResAD's training: reference draws, learning rates, anomalies per batch.

    Args:
        train_k_shot (int): references drawn per training query. Defaults to ``4``.
        lr (float): Adam learning rate of constraintor and flows. Defaults to ``2e-4``.
        weight_decay (float): Adam L2 decay. Defaults to ``5e-4``.
        bgspp_weight (float): λ of the BG-SPP term. Defaults to ``1.0``.
        anomalies_per_batch (int): real or synthetic anomalous images added to each training batch.
            Defaults to ``4``.
        synthetic_per_class (int): synthetic (Perlin) anomalies made per training class. Defaults to ``16``.
        fiber_batch (int): flow rows per optimiser step (the remainder chunk is kept). Defaults to ``8192``.
        codebook_lr (float): learning rate of the codebook's Adam, relative to the spread of each level's
            residuals (level ``l`` uses ``codebook_lr · std_l``; see :class:`ResAD`'s Notes). Defaults to ``1e-2``.
    """

    train_k_shot: int = 4
    lr: float = 2e-4
    weight_decay: float = 5e-4
    bgspp_weight: float = 1.0
    anomalies_per_batch: int = 4
    synthetic_per_class: int = 16
    fiber_batch: int = 8192
    codebook_lr: float = 1e-2

    def __post_init__(self) -> None:
        check_count("train_k_shot", self.train_k_shot)


class ResAD(BankExportMixin, FewShotModuleMixin, AnomalibModule):
    """ResAD lightning module.

    Args:
        preset (str): ``"official"`` (cosine matching, squared residual, log-barrier OCC, ψ-NLL + abnormal
            density + focal, merged score, VQ + EFDM distribution matching) or ``"paper"`` (L2 matching, signed
            residual, pseudo-Huber OCC, NLL + BG-SPP hinge, likelihood score, no distribution matching).
            Defaults to ``"official"``.
        bank (BankOptions | None): matching, residual and coreset of the reference bank. ``None``: the preset's
            matching and residual, every patch. A given one replaces all three (its own defaults are the
            ``official`` preset's). Defaults to ``None``.
        overrides (PresetOverrides): single preset entries to override. Defaults to none.
        flow (FlowOptions): coupling blocks per level and positional-code length. Defaults to 8 and
            ``condition_dim=None``: ResAD's 128.
        codebook (CodebookOptions): codes per level, EFDM weight and VQ β of the distribution matching (used
            when the preset or ``overrides.fdm`` turns it on). Defaults to ``1536``, ``0.4``, ``0.25``.
        training (ResADTraining): reference draws, learning rates, anomalies per batch. Defaults to
            :class:`ResADTraining`'s.
        **kwargs: the arguments every model shares, declared once in
            :class:`~anomalib_cgad.models.base.FewShotModuleMixin`: ``backbone``, ``layers``, ``backbone_weights``,
            ``k_shot``, ``few_shot_source``, ``false_alarm_rate``, ``seed`` and anomalib's four components.

    Notes:
        ``learning_type`` is ``ONE_CLASS`` so that ``Engine.train`` fits the model on the source classes;
        testing on an unseen class needs only its k references.

        Codebook training (``fdm``) deviates from the released code on purpose: instead of codes drawn from
        ``U(−1/K, 1/K)`` (≈ 0, which a short run never moves onto residuals of scale ~1–10, so that EFDM would
        drag test residuals towards 0), the first training step sets the codes to randomly drawn normal
        residuals of that step; from then on the β-term of the VQ loss trains them with their own Adam
        (no weight decay, learning rate ``codebook_lr · std_l`` per level). The codebook is saved in checkpoints
        together with its ``initialised`` flags, so a reloaded or resumed model is not re-initialised.
    """

    demo_epochs = 6
    FLAT_ALIASES: ClassVar[dict[str, str]] = {
        "reference_coreset": "bank.coreset",
        "fdm_codes": "codebook.codes",
        "fdm_alpha": "codebook.alpha",
        "fdm_beta": "codebook.beta",
        "fdm_lr": "training.codebook_lr",
    }
    """Flat names of anomalib-cgad 0.1 that are not their field's name (:mod:`anomalib_cgad.models.options`)."""

    def __init__(
        self,
        preset: str = "official",
        bank: BankOptions | None = None,
        overrides: PresetOverrides = PresetOverrides(),
        flow: FlowOptions = FlowOptions(),
        codebook: CodebookOptions = CodebookOptions(),
        training: ResADTraining = ResADTraining(),
        **kwargs,
    ) -> None:
        check_choice("preset", preset, sorted(PRESETS))
        bank = self.group_default("bank", {"preset": preset}) if bank is None else bank
        super().__init__(**kwargs)  # references, operating point, anomalib's components (FewShotModuleMixin)
        options = {**PRESETS[preset], "matching": bank.matching, "residual": bank.residual}
        options.update({key: value for key, value in asdict(overrides).items() if value is not None})
        self.options = options
        self.train_k_shot = training.train_k_shot
        self.lr, self.weight_decay, self.bgspp_weight = training.lr, training.weight_decay, training.bgspp_weight
        self.anomalies_per_batch = training.anomalies_per_batch
        self.synthetic_per_class = training.synthetic_per_class
        self.fiber_batch = training.fiber_batch
        self.codebook_lr = training.codebook_lr
        self.model = ResADModel(
            **self.backbone_args,
            bank=bank,
            flow=flow,
            score=options["score"],
            codebook=codebook if options["fdm"] else None,
        )
        self.automatic_optimization = False
        self._boundaries = [BoundaryEMA() for _ in self.model.backbone.channels]
        self._epoch_logp_max: torch.Tensor | None = None
        self._codebook_generator: torch.Generator | None = None

    @staticmethod
    def group_default(name: str, args: dict[str, Any]) -> BankOptions | None:
        """The bank options a preset implies (``None`` for the other groups: their declared default)."""
        if name != "bank":
            return None
        recipe = PRESETS.get(args.get("preset", "official"))
        return None if recipe is None else BankOptions(recipe["matching"], recipe["residual"])

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """One Adam for the constraintor, one for the flows (the flow sees detached features, as in the released code).

        With ``fdm`` a third Adam trains the codebook: one group per level, learning rate ``codebook_lr · std_l``,
        no weight decay (decay would pull the codes towards 0, the bias the data initialisation removes).
        """
        constraintor = torch.optim.Adam(
            self.model.constraintor.parameters(), lr=self.lr, weight_decay=self.weight_decay
        )
        flow = torch.optim.Adam(self.model.flow.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.model.codebook is None:
            return [constraintor, flow]
        codebook = torch.optim.Adam(self.model.codebook.param_groups(self.codebook_lr), weight_decay=0.0)
        return [constraintor, flow, codebook]

    def on_train_start(self) -> None:
        """Encode the training classes once (references, anomalies)."""
        if self.training_pool is None:
            self.build_training_pool(self.synthetic_per_class, self.seed)

    def on_train_epoch_start(self) -> None:
        """Restart the running max of normal ``logp̄`` that normalises the score levels."""
        self._epoch_logp_max = None

    # ----------------------------------------------------------------- training
    def _training_rows(self, batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Residual maps and anomaly coverage of the batch's normals plus pool anomalies."""
        pool = self.training_pool
        by_class: dict[str, list[int]] = {}
        for path in batch.image_path:
            found = pool.index.get(str(path))
            if found is not None:
                by_class.setdefault(found[0], []).append(found[1])
        residuals: list[list[torch.Tensor]] = [[] for _ in self.model.backbone.channels]
        coverage: list[list[torch.Tensor]] = [[] for _ in self.model.backbone.channels]
        classes = list(by_class)
        anomalous = [c for c in classes if pool.classes[c].num_anomalies] or [
            c for c in pool.classes if pool.classes[c].num_anomalies
        ]
        per_class_anomalies = dict.fromkeys(anomalous, 0)
        for i in range(self.anomalies_per_batch if anomalous else 0):
            per_class_anomalies[anomalous[i % len(anomalous)]] += 1
        for category in dict.fromkeys([*classes, *per_class_anomalies]):
            rows = by_class.get(category, [])
            cls_pool = pool.classes[category]
            feats = [level[rows].to(self.device) for level in cls_pool.normals]
            covs = [torch.zeros(f.shape[0], *f.shape[-2:], device=self.device) for f in feats]
            count = per_class_anomalies.get(category, 0)
            if count:
                # real labelled anomalies when the class has them (as the paper), else the synthetic ones
                source = cls_pool.real_anomalies or cls_pool.num_anomalies
                pick = torch.randint(source, (count,), generator=pool.generator)
                extra = [a[pick].to(self.device) for a in cls_pool.anomalies]
                extra_covs = [m[pick].to(self.device) for m in cls_pool.masks]
                feats = [torch.cat(pair) for pair in zip(feats, extra, strict=True)]
                covs = [torch.cat(pair) for pair in zip(covs, extra_covs, strict=True)]
            for level, residual in enumerate(self._class_residuals(category, rows, feats)):
                residuals[level].append(residual)
                coverage[level].append(covs[level])
        residual_maps = [torch.cat(level) for level in residuals]
        return residual_maps, [torch.cat(level) for level in coverage]

    def _class_residuals(self, category: str, rows: list[int], feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Residuals of one class's training queries against normal references that never include a query.

        Official-like: one set of ``train_k_shot`` references for the class, drawn without replacement from
        its normals outside the batch. When the batch holds (almost) the whole class, every query gets its
        own references instead, drawn from all normals but itself (itself would give an all-zero residual).

        Args:
            category (str): training class.
            rows (list[int]): pool rows of the class's normal queries (the first ``len(rows)`` of ``feats``).
            feats (list[torch.Tensor]): per-level query features ``(n, C_l, H_l, W_l)``; rows past
                ``len(rows)`` are anomalies.

        Returns:
            list[torch.Tensor]: per-level residual maps ``(n, C_l, H_l, W_l)``.
        """
        pool = self.training_pool
        num_normals = pool.classes[category].num_normals
        if num_normals - len(rows) >= self.train_k_shot:
            refs = pool.draw_references(category, self.train_k_shot, rows)
            return self.model.bank.residuals(feats, [flatten_patches(r.to(self.device)) for r in refs])
        k = min(self.train_k_shot, num_normals - 1)
        if k < 1:
            msg = (
                f"Training class '{category}' has {num_normals} normal image(s); ResAD needs at least 2 to give "
                "each training image a reference other than itself."
            )
            raise ValueError(msg)
        excludes = [[row] for row in rows] + [[] for _ in range(feats[0].shape[0] - len(rows))]
        per_sample = [pool.draw_references(category, k, exclude) for exclude in excludes]
        banks = [
            torch.stack([flatten_patches(refs[level]) for refs in per_sample]).to(self.device)
            for level in range(len(feats))
        ]
        return residual_features(feats, banks, self.model.bank.matching, self.model.bank.residual)

    def _codebook_step(
        self,
        optimizer,
        residual_maps: list[torch.Tensor],
        coverage: list[torch.Tensor],
    ) -> torch.Tensor:
        """VQ update of the codebook on the normal positions of the (pre-constraintor) residuals.

        Levels not yet initialised are first set to randomly drawn normal residuals of this step (see Notes
        of the class), and the optimizer's per-level learning rates follow their spread.
        """
        codebook = self.model.codebook
        normal = [c < 0.5 for c in coverage]
        if not bool(codebook.initialised.all()):
            if self._codebook_generator is None:
                self._codebook_generator = torch.Generator().manual_seed(self.seed)
            if codebook.initialise(residual_maps, normal, generator=self._codebook_generator):
                codebook.update_learning_rates(getattr(optimizer, "optimizer", optimizer), self.codebook_lr)
        loss = codebook.loss(residual_maps, normal)
        if loss.requires_grad:
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            optimizer.step()
        return loss.detach()

    def training_step(self, batch, *args, **kwargs) -> STEP_OUTPUT:
        """One step: codebook VQ update (``fdm``), constraintor OCC update, then chunked flow updates.

        The codebook and the constraintor see the same residuals; EFDM is never applied in training.
        """
        del args, kwargs
        opt_constraintor, opt_flow, *opt_codebook = self.optimizers()
        residual_maps, coverage = self._training_rows(batch)
        if opt_codebook:
            self.log("train_vq", self._codebook_step(opt_codebook[0], residual_maps, coverage))
        constrained = self.model.constraintor(residual_maps)
        occ_fn = occ_paper if self.options["occ"] == "paper" else occ_log_barrier
        occ = sum(
            occ_fn(flatten_patches(x), flatten_patches(r).detach(), c.reshape(-1))
            for x, r, c in zip(constrained, residual_maps, coverage, strict=True)
        )
        opt_constraintor.zero_grad(set_to_none=True)
        self.manual_backward(occ)
        opt_constraintor.step()

        flow_total = torch.zeros((), device=self.device)
        level_max = []
        for level, (feature, cov) in enumerate(zip(constrained, coverage, strict=True)):
            rows = flatten_patches(feature.detach())
            batch_size, _, height, width = feature.shape
            condition = self.model.flow.position_code(batch_size, height, width, rows)
            cov_rows = cov.reshape(-1)
            normal_max = []
            for index in chunks(len(rows), self.fiber_batch):
                logp, zmean = self.model.flow.rows(level, rows[index], condition[index])
                normal = cov_rows[index] < 0.5
                boundary = self._boundaries[level].update(logp[normal])
                if self.options["flow_loss"] == "paper":
                    loss = flow_loss_paper(logp, cov_rows[index], boundary, weight=self.bgspp_weight)
                else:
                    loss = flow_loss_official(logp, zmean, cov_rows[index], boundary, weight=self.bgspp_weight)
                opt_flow.zero_grad(set_to_none=True)
                self.manual_backward(loss)
                opt_flow.step()
                flow_total = flow_total + loss.detach()
                if normal.any():
                    normal_max.append(logp[normal].detach().max())
            level_max.append(torch.stack(normal_max).max() if normal_max else self.model.logp_max[level])
        current = torch.stack(level_max)
        self._epoch_logp_max = current if self._epoch_logp_max is None else torch.maximum(self._epoch_logp_max, current)
        self.model.logp_max.copy_(self._epoch_logp_max)
        self.log("train_occ", occ.detach(), prog_bar=True)
        self.log("train_flow", flow_total, prog_bar=True)
        return {"loss": occ.detach() + flow_total}
