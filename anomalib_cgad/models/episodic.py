"""The episode loop shared by the meta-learning models (MetaAD, CGAD).

:class:`EpisodicMixin` holds what the two models do the same way around their own inner and outer levels:

1. one training step is one episode drawn by :class:`~anomalib_cgad.components.episodes.EpisodeSampler`
   (classes the outer level separates worst are drawn more often, through ``hardness``);
2. the inner level runs once per inner class of the episode with the first optimiser;
3. the outer level (unless ``episodes.outer=False``) scores each OOD class's normals (ID) and anomalies (OOD) as
   normality logits ``z``; :meth:`~EpisodicMixin._add_margin_term` turns them into the softmax confidence
   margin loss of the class (collected in :class:`OuterTerms`), and :meth:`~EpisodicMixin._outer_update`
   reconciles the per-class losses with the clean term by PCGrad and steps the remaining optimisers.

The length of an epoch is bounded in the number of training classes (``epoch_classes``, see
:meth:`~EpisodicMixin._episode_budget`): an episode costs the same whatever the number of classes (one inner
class, at most ``n_hard + n_random`` = 3 outer classes), but Lightning runs one step per training batch, and the
batches grow with the classes; so with more than ``epoch_classes`` classes an epoch runs as many episodes as
``epoch_classes`` classes' batches would give, and training time stops growing with the number of classes.

What differs between the models stays in them: ``_inner_step(category, k, optimizer)`` (maximum likelihood
of residuals for CGAD, one-class BCE for MetaAD) and ``_outer_step(classes, k, optimizers)`` (how ``z`` is
computed and which parameters the outer level tunes).
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Protocol, runtime_checkable

import torch
from lightning.pytorch.utilities.types import STEP_OUTPUT

from anomalib_cgad.components.confidence_margin import MARGINS, confidence_margin_loss, outer_backward
from anomalib_cgad.components.episodes import DIRECTIONS, EpisodeSampler
from anomalib_cgad.components.training_pool import TrainingPool
from anomalib_cgad.validation import check_choice, check_count

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpisodeOptions:
    """What an episode is made of: the options group MetaAD and CGAD share (their ``episodes`` argument).

    Checked when made, so a bad option fails before the backbone is built.

    Args:
        k_choices (Sequence[int]): reference counts drawn per episode. Defaults to ``(1, 2, 4, 8)``.
        direction (str): ``"multi"`` (roles rotate over the classes) or ``"single"`` (one fixed split).
        margin (str): the outer level's confidence-margin loss, ``"mean_gap"``, ``"pairwise"`` or ``"energy"``.
        pcgrad (bool): PCGrad across the outer classes' losses. Defaults to ``True``.
        outer (bool): run the outer level (``False``: the inner-only ablation). Defaults to ``True``.
        inner_queries (int): normal images per episode at the inner level. Defaults to ``8``.
        anomalies_per_class (int): anomalous images per outer class and episode. Defaults to ``2``.
        epoch_classes (int | None): bound of the episodes per epoch (:meth:`EpisodicMixin._episode_budget`).
            Defaults to ``4``.
        learn_temperature (bool): the outer level learns the temperature ``T`` (else fixed at 1). Defaults to
            ``True``.
    """

    k_choices: Sequence[int] = (1, 2, 4, 8)
    direction: str = "multi"
    margin: str = "mean_gap"
    pcgrad: bool = True
    outer: bool = True
    inner_queries: int = 8
    anomalies_per_class: int = 2
    epoch_classes: int | None = 4
    learn_temperature: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "k_choices", tuple(self.k_choices))
        if not self.k_choices:
            msg = "k_choices needs at least one reference count, got none."
            raise ValueError(msg)
        for k in self.k_choices:
            check_count("k_choices", k)
        check_choice("direction", self.direction, DIRECTIONS)
        check_choice("margin", self.margin, MARGINS)
        check_count("anomalies_per_class", self.anomalies_per_class, minimum=0)
        if self.epoch_classes is not None:
            check_count("epoch_classes", self.epoch_classes)


@dataclass
class OuterTerms:
    """The per-class terms of one outer update, in the order of the episode's OOD classes that had both ID and
    OOD logits: margin losses, clean (ID-only) terms and (detached) confidence gaps."""

    losses: list[torch.Tensor] = field(default_factory=list)
    clean: list[torch.Tensor] = field(default_factory=list)
    gaps: list[torch.Tensor] = field(default_factory=list)


@runtime_checkable
class EpisodicHost(Protocol):
    """What :class:`EpisodicMixin` needs from the class it is mixed into, besides the two abstract steps.

    ``training_pool`` (with ``classes`` and a seeded ``generator``) comes from
    :class:`~anomalib_cgad.models.base.FewShotModuleMixin`, built in ``on_train_start``; ``model`` is the
    torch model, whose ``temperature()`` is logged each step; ``seed`` (the model's, from ``FewShotModuleMixin``)
    seeds the episode sampler; ``optimizers``, ``manual_backward``, ``log``
    and ``automatic_optimization`` are Lightning's.
    """

    training_pool: TrainingPool | None
    model: torch.nn.Module
    automatic_optimization: bool
    seed: int

    def optimizers(self) -> list[torch.optim.Optimizer]: ...

    def manual_backward(self, loss: torch.Tensor, *args, **kwargs) -> None: ...

    def log(self, name: str, value, *args, **kwargs) -> None: ...


class EpisodicMixin(ABC):
    """Episode sampling, the outer update and ``training_step`` of a meta-learning model.

    The host (:class:`EpisodicHost`) implements :meth:`_inner_step` and :meth:`_outer_step` (a model missing
    one cannot be built: ``TypeError``) and lists this mixin first in its bases, before
    ``FewShotModuleMixin`` and ``AnomalibModule``, so that its ``training_step`` is the one Lightning calls.
    Init order, in the model's ``__init__`` and hooks:

    1. an :class:`EpisodeOptions` made before ``AnomalibModule.__init__`` (a bad option fails before the
       backbone is built);
    2. ``FewShotModuleMixin.__init__`` (``AnomalibModule.__init__``, ``seed``), then :meth:`_init_episodes` (it
       switches to manual optimisation, which must happen before Lightning's trainer sees the model);
    3. :meth:`_init_sampler` in ``on_train_start``, after the training pool is built (the sampler draws from
       the pool's classes);
    4. ``configure_optimizers`` returns ``[inner, *outer]``: :meth:`training_step` gives the first to
       :meth:`_inner_step` and the others to :meth:`_outer_step`.
    """

    inner_log_name = "inner_loss"
    """Progress-bar name of the inner level's loss."""
    margin_pairs = 4096
    """At most this many ID and as many OOD patches enter one class's margin loss."""

    @abstractmethod
    def _inner_step(self, category: str, k: int, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """One inner-level update on ``category`` with ``k`` references, stepping ``optimizer``.

        Returns:
            torch.Tensor: the (detached) inner loss, averaged over the episode's inner classes and logged.
        """

    @abstractmethod
    def _outer_step(
        self, outer_classes: Sequence[str], k: int, optimizers: list[torch.optim.Optimizer]
    ) -> dict[str, torch.Tensor]:
        """The outer-level update on the episode's OOD classes, usually through :meth:`_outer_update`.

        Returns:
            dict[str, torch.Tensor]: values to log (``outer_loss`` is added to the step's loss), ``{}`` if
            nothing was stepped.
        """

    def _init_episodes(self, options: EpisodeOptions) -> None:
        """Store the episode options as attributes of the same names; manual optimisation, no sampler yet (it
        needs the training classes and the host's ``seed``), no hardness, no outer step taken."""
        for option in fields(options):
            setattr(self, option.name, getattr(options, option.name))
        self.k_choices = list(options.k_choices)
        self.automatic_optimization = False
        self.sampler: EpisodeSampler | None = None
        self.hardness: dict[str, float] = {}
        self.outer_steps = 0
        self._epoch_episodes = 0  # episodes run in the current epoch (reset in on_train_epoch_start)

    def _init_sampler(self) -> None:
        """The episode sampler over the training pool's classes (kept across ``fit`` calls)."""
        if self.sampler is None:
            self.sampler = EpisodeSampler(
                list(self.training_pool.classes), direction=self.direction, k_choices=self.k_choices, seed=self.seed
            )

    def _episode_budget(self) -> int | float:
        """Episodes per epoch: one per training batch, scaled by ``epoch_classes / classes`` when that is below 1.

        With ``C`` training classes and ``B`` training batches per epoch, an epoch runs
        ``ceil(B * epoch_classes / C)`` episodes when ``C > epoch_classes`` (what ``epoch_classes`` classes of
        the same size would give), else ``B`` (every batch: nothing changes up to ``epoch_classes`` classes).
        ``epoch_classes=None`` or an unsized training loader: ``B``.
        """
        batches = self.trainer.num_training_batches
        classes = len(self.sampler.classes)
        if self.epoch_classes is None or classes <= self.epoch_classes or not math.isfinite(batches):
            return batches
        return math.ceil(batches * self.epoch_classes / classes)

    def on_train_epoch_start(self) -> None:
        """Start the epoch's episode count; say once when the bound shortens the epochs."""
        super().on_train_epoch_start()
        self._epoch_episodes = 0
        budget = self._episode_budget()
        if budget < self.trainer.num_training_batches and not getattr(self, "_told_budget", False):
            logger.info(
                "%d training classes > epoch_classes=%d: each epoch runs %d episodes, not one per training batch "
                "(%d); set epoch_classes=None for every batch.",
                len(self.sampler.classes), self.epoch_classes, budget, self.trainer.num_training_batches,
            )  # fmt: skip
            self._told_budget = True

    def _add_margin_term(
        self, terms: OuterTerms, category: str, z_id: torch.Tensor, z_ood: torch.Tensor, temperature: torch.Tensor
    ) -> bool:
        """Add one OOD class's confidence margin loss and confidence gap to ``terms``; update its hardness.

        Equal numbers of ID and OOD logits (at most :attr:`margin_pairs`), drawn with the training pool's
        generator so that episodes replay exactly from the seed.

        Returns:
            bool: ``False``, and nothing added, when the class has no ID or no OOD logit; the caller then adds
            no clean term either.
        """
        if len(z_id) == 0 or len(z_ood) == 0:
            return False
        limit = min(len(z_id), len(z_ood), self.margin_pairs)
        generator = self.training_pool.generator
        z_id = z_id[torch.randperm(len(z_id), generator=generator)[:limit].to(z_id.device)]
        z_ood = z_ood[torch.randperm(len(z_ood), generator=generator)[:limit].to(z_ood.device)]
        terms.losses.append(confidence_margin_loss(z_id, z_ood, temperature, margin=self.margin))
        p_ood = torch.sigmoid(z_ood / temperature).mean().detach()
        self.hardness[category] = float(p_ood)
        terms.gaps.append(torch.sigmoid(z_id / temperature).mean().detach() - p_ood)
        return True

    def _outer_update(
        self,
        outer_classes: Sequence[str],
        terms: OuterTerms,
        optimizers: Sequence[torch.optim.Optimizer],
        shared: list[torch.Tensor],
        calibration: list[torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """PCGrad over the per-class margin losses and the clean term, then one step of each outer optimiser.

        Args:
            outer_classes (Sequence[str]): the episode's OOD classes (named in the warning when none had both
                normal and anomalous patches).
            terms (OuterTerms): the margin losses, clean terms and gaps of the classes that had both.
            optimizers (Sequence[torch.optim.Optimizer]): the outer optimisers.
            shared (list[torch.Tensor]): parameters the losses share (PCGrad projects their gradients).
            calibration (list[torch.Tensor]): calibration parameters (boundaries, temperature): summed gradients.

        Returns:
            dict[str, torch.Tensor]: ``outer_loss`` and ``outer_gap`` to log, or ``{}`` when nothing was stepped.
        """
        losses = terms.losses
        if not losses:
            if not getattr(self, "_warned_no_outer", False):
                logger.warning("Outer level skipped: no anomalous patches for classes %s.", list(outer_classes))
                self._warned_no_outer = True
            return {}
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        outer_backward(
            torch.stack(terms.clean).mean(),
            losses,
            shared=shared,
            calibration=calibration,
            pcgrad=self.pcgrad,
            backward=self.manual_backward,
            seed=self.outer_steps,
        )
        for optimizer in optimizers:
            optimizer.step()
        self.outer_steps += 1
        return {"outer_loss": torch.stack(losses).mean().detach(), "outer_gap": torch.stack(terms.gaps).mean()}

    def training_step(self, batch, *args, **kwargs) -> STEP_OUTPUT:
        """One episode: the inner level on each inner class, then (unless ``episodes.outer=False``) the outer level.

        Nothing (``None``, Lightning's "skip this step") once the epoch has run its :meth:`_episode_budget`:
        the step ignores its batch anyway (episodes are drawn from the training pool), and ending the epoch
        early instead (``on_train_batch_start`` returning ``-1``) would skip its validation too.
        """
        del batch, args, kwargs
        if self._epoch_episodes >= self._episode_budget():
            return None
        self._epoch_episodes += 1
        inner_optimizer, *outer_optimizers = self.optimizers()
        episode = self.sampler.sample(self.hardness)
        inner = torch.stack([self._inner_step(c, episode.k, inner_optimizer) for c in episode.inner]).mean()
        self.log(self.inner_log_name, inner, prog_bar=True)
        logs = self._outer_step(episode.outer, episode.k, outer_optimizers) if self.outer else {}
        for key, value in logs.items():
            self.log(key, value, prog_bar=True)
        self.log("temperature", self.model.temperature().detach())
        return {"loss": inner + logs.get("outer_loss", 0.0)}
