"""Episode sampler of the multi-directional meta-learning models (MetaAD, CGAD).

One episode = one optimisation step built from the *training* classes only:

- ``inner``: class(es) whose normal images play in-distribution (ID) at the inner level (normal manifold);
- ``outer``: out-of-distribution (OOD) classes for the outer level, each contributing a few anomalies (real
  labelled ones when the training set has them, synthetic otherwise) and as many normals; chosen as the
  ``n_hard`` hardest classes (lowest separation measured by the model) plus ``n_random`` others, never an
  inner class of the same episode;
- ``k``: the number of normal references the episode's residuals are computed against, drawn per episode
  from ``k_choices`` so the model meets every k it will be used with.

``direction="multi"`` (default) rotates roles: over a cycle every ordered pair (inner A, outer B) of
training classes occurs, in both directions (hence "multi-directional"). ``direction="single"`` fixes one seeded split
of the classes into an ID pool and an OOD pool (the ablation). With a single training class (e.g. ELPV
mono → poly) both roles fall to that class and episodes differ only in their draws.

The sampler sees class names only; the models turn an :class:`Episode` into features with the
:class:`~anomalib_cgad.components.training_pool.TrainingPool`, which holds only training-class images.

Example:
    >>> sampler = EpisodeSampler(["a", "b", "c"], seed=0)
    >>> episode = sampler.sample()
    >>> episode.inner[0] not in episode.outer
    True
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from anomalib_cgad.validation import check_choice

DIRECTIONS = ("multi", "single")


@dataclass(frozen=True)
class Episode:
    """Roles of the training classes in one episode."""

    inner: tuple[str, ...]
    outer: tuple[str, ...]
    k: int


class EpisodeSampler:
    """Draw episodes over training classes.

    Args:
        classes (Sequence[str]): training classes.
        direction (str): ``"multi"`` or ``"single"``. Defaults to ``"multi"``.
        n_hard (int): hardest OOD classes per episode. Defaults to ``2``.
        n_random (int): random further OOD classes per episode. Defaults to ``1``.
        k_choices (Sequence[int]): reference counts to draw from. Defaults to ``(1, 2, 4, 8)``.
        seed (int): seed of all draws. Defaults to ``0``.
    """

    def __init__(
        self,
        classes: Sequence[str],
        direction: str = "multi",
        n_hard: int = 2,
        n_random: int = 1,
        k_choices: Sequence[int] = (1, 2, 4, 8),
        seed: int = 0,
    ) -> None:
        check_choice("direction", direction, DIRECTIONS)
        if not classes:
            msg = "The episode sampler needs at least one training class."
            raise ValueError(msg)
        if not k_choices or min(k_choices) < 1:
            msg = f"k_choices must be positive reference counts, got {list(k_choices)}."
            raise ValueError(msg)
        self.classes = sorted(dict.fromkeys(str(c) for c in classes))
        self.direction = direction
        self.n_hard = n_hard
        self.n_random = n_random
        self.k_choices = list(k_choices)
        self.rng = random.Random(seed)
        self._cycle: list[tuple[str, str]] = []
        shuffled = list(self.classes)
        self.rng.shuffle(shuffled)
        half = max(1, len(shuffled) // 2)
        self.id_pool = shuffled[:half] if len(shuffled) > 1 else shuffled
        self.ood_pool = shuffled[half:] if len(shuffled) > 1 else shuffled

    def _next_pair(self) -> tuple[str, str | None]:
        if len(self.classes) == 1:
            return self.classes[0], None
        if self.direction == "single":
            return self.rng.choice(self.id_pool), None
        if not self._cycle:
            self._cycle = list(itertools.permutations(self.classes, 2))
            self.rng.shuffle(self._cycle)
        return self._cycle.pop()

    def sample(self, hardness: Mapping[str, float] | None = None) -> Episode:
        """Draw one episode.

        Args:
            hardness (Mapping[str, float] | None): per class, higher = harder to separate (e.g. the mean
                normal probability the model gives its anomalies). ``None``: all equally hard.
        """
        inner, partner = self._next_pair()
        if len(self.classes) == 1:
            return Episode(inner=(inner,), outer=(inner,), k=self.rng.choice(self.k_choices))
        candidates = [c for c in (self.ood_pool if self.direction == "single" else self.classes) if c != inner]
        if not candidates:
            candidates = [c for c in self.classes if c != inner]
        scores = hardness or {}
        ranked = sorted(candidates, key=lambda c: (-scores.get(c, 0.0), self.rng.random()))
        outer = [partner] if partner is not None else []
        outer += [c for c in ranked if c not in outer][: max(self.n_hard - len(outer), 0)]
        rest = [c for c in candidates if c not in outer]
        outer += self.rng.sample(rest, min(self.n_random, len(rest)))
        return Episode(inner=(inner,), outer=tuple(outer), k=self.rng.choice(self.k_choices))
