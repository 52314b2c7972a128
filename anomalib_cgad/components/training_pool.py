"""Backbone features of the training classes, computed once per fit (one place for training references).

The backbone is frozen, so every model here encodes each training image once, when training starts:

- ``normals[c]``: per-level features ``(N_c, C_l, H_l, W_l)`` of the normal training images of class ``c``
  (the pool that training references and episode queries are drawn from);
- ``anomalies[c]``: features of labelled anomalies of class ``c`` found in the training set (e.g. the
  cross-class datamodule's ``few_anomalies``) plus synthetic ones made by anomalib's
  ``PerlinAnomalyGenerator`` from normal images, with their masks as per-level coverage in ``[0, 1]``.

Training references are drawn per query *without replacement* and *never include the query itself*
(the released ResAD code draws with replacement and may use the query as its own reference, which gives
an all-zero residual, so the model would learn that a perfect match is normal).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator

logger = logging.getLogger(__name__)

Encoder = Callable[[torch.Tensor], list[torch.Tensor]]


@dataclass
class ClassPool:
    """Cached features of one training class."""

    normals: list[torch.Tensor]
    paths: list[str]
    anomalies: list[torch.Tensor] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)
    real_anomalies: int = 0

    @property
    def num_normals(self) -> int:
        """Number of normal images."""
        return self.normals[0].shape[0]

    @property
    def num_anomalies(self) -> int:
        """Number of anomalous images (real + synthetic)."""
        return self.anomalies[0].shape[0] if self.anomalies else 0


def level_coverage(masks: torch.Tensor, sizes: Iterable[tuple[int, int]]) -> list[torch.Tensor]:
    """Area-downsample ``(N, H, W)`` masks to each level's grid: fraction of defective pixels per patch."""
    masks = masks.float().unsqueeze(1)
    return [F.adaptive_avg_pool2d(masks, size).squeeze(1) for size in sizes]


class TrainingPool:
    """Per-class cache of training features, references and anomalies.

    Args:
        synthetic_per_class (int): synthetic anomalies made per class with ``PerlinAnomalyGenerator``.
            Defaults to ``16``.
        seed (int): seed of reference draws and synthetic anomalies. Defaults to ``0``.
    """

    def __init__(self, synthetic_per_class: int = 16, seed: int = 0) -> None:
        self.synthetic_per_class = synthetic_per_class
        self.seed = seed
        self.classes: dict[str, ClassPool] = {}
        self.index: dict[str, tuple[str, int]] = {}
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def build(
        self,
        batches: Iterable,
        encode: Encoder,
        normalise: Callable[[torch.Tensor], torch.Tensor],
        category_of: Callable[[str], str],
    ) -> TrainingPool:
        """Encode every training batch once and make the synthetic anomalies.

        Args:
            batches (Iterable): anomalib ``ImageBatch`` es (``image`` in [0, 1], ``gt_label``, ``gt_mask``,
                ``image_path``).
            encode (Encoder): normalised images → per-level features.
            normalise (Callable): the model's pre-processing transform (ImageNet normalisation).
            category_of (Callable[[str], str]): image path → class name.

        Returns:
            TrainingPool: ``self``.
        """
        normal_feats: dict[str, list[list[torch.Tensor]]] = {}
        normal_imgs: dict[str, list[torch.Tensor]] = {}
        normal_paths: dict[str, list[str]] = {}
        anomaly_feats: dict[str, list[list[torch.Tensor]]] = {}
        anomaly_masks: dict[str, list[torch.Tensor]] = {}
        for batch in batches:
            images = batch.image
            features = [f.cpu() for f in encode(normalise(images))]
            labels = batch.gt_label if batch.gt_label is not None else torch.zeros(len(images), dtype=torch.bool)
            for i, path in enumerate(batch.image_path):
                category = category_of(path)
                per_image = [f[i : i + 1] for f in features]
                if bool(labels[i]):
                    mask = batch.gt_mask[i] if batch.gt_mask is not None else torch.ones(images.shape[-2:])
                    anomaly_feats.setdefault(category, []).append(per_image)
                    anomaly_masks.setdefault(category, []).append(mask.float().cpu().reshape(images.shape[-2:]))
                else:
                    normal_feats.setdefault(category, []).append(per_image)
                    normal_imgs.setdefault(category, []).append(images[i].cpu())
                    normal_paths.setdefault(category, []).append(str(path))
        if not normal_feats:
            msg = "The training set holds no normal images: the model needs normal images of the training classes."
            raise ValueError(msg)
        perlin = PerlinAnomalyGenerator(probability=1.0, blend_factor=(0.5, 1.0))
        for category, items in normal_feats.items():
            levels = [torch.cat(level) for level in zip(*items, strict=True)]
            sizes = [tuple(level.shape[-2:]) for level in levels]
            pool = ClassPool(normals=levels, paths=normal_paths[category])
            real = anomaly_feats.get(category, [])
            feats = [list(level) for level in zip(*real, strict=True)] if real else [[] for _ in levels]
            masks = list(anomaly_masks.get(category, []))
            pool.real_anomalies = len(real)
            if self.synthetic_per_class > 0:
                sources = normal_imgs[category]
                pick = torch.randint(len(sources), (self.synthetic_per_class,), generator=self.generator)
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)))
                augmented, synthetic_masks = [], []
                for j in pick.tolist():
                    image, mask = perlin(sources[j])
                    augmented.append(image.clamp(0, 1))
                    synthetic_masks.append(mask.reshape(sources[j].shape[-2:]))
                synthetic = encode(normalise(torch.stack(augmented).to(_device(encode))))
                for level, tensor in enumerate(synthetic):
                    feats[level].extend(tensor.cpu().split(1))
                masks.extend(synthetic_masks)
            if masks:
                pool.anomalies = [torch.cat(level) for level in feats]
                pool.masks = level_coverage(torch.stack(masks), sizes)
            self.classes[category] = pool
            for row, path in enumerate(pool.paths):
                self.index[path] = (category, row)
        logger.info(
            "Training pool: %s",
            ", ".join(f"{c}: {p.num_normals} normal, {p.num_anomalies} anomalous" for c, p in self.classes.items()),
        )
        return self

    def draw_references(self, category: str, k: int, exclude: Iterable[int] = ()) -> list[torch.Tensor]:
        """k distinct normal images of ``category`` (never one of ``exclude``) as per-level features."""
        pool = self.classes[category]
        excluded = {int(i) for i in exclude}  # ints: a set of 0-d tensors would match nothing
        candidates = [i for i in range(pool.num_normals) if i not in excluded]
        if len(candidates) < k:
            msg = (
                f"Class '{category}' has {pool.num_normals} normal training images ({len(excluded)} excluded as "
                f"queries); {k} references were requested."
            )
            raise ValueError(msg)
        order = torch.randperm(len(candidates), generator=self.generator)[:k]
        rows = torch.tensor([candidates[i] for i in order.tolist()])
        return [level[rows] for level in pool.normals]

    def draw_class(
        self,
        category: str,
        k: int,
        n_normal: int,
        n_anomalous: int = 0,
        prefer_real: bool = True,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """References, queries and query coverage of one class for an episode.

        Args:
            category (str): training class.
            k (int): references (capped so at least one normal query remains).
            n_normal (int): normal query images, disjoint from the references.
            n_anomalous (int): anomalous query images (real ones first when ``prefer_real``, else synthetic).
            prefer_real (bool): draw from the real labelled anomalies when the class has them.

        Returns:
            per-level reference features ``(k, C, H, W)``, query features ``(n, C, H, W)`` and query coverage
            ``(n, H, W)`` (0 for normal queries).
        """
        pool = self.classes[category]
        k = max(1, min(k, pool.num_normals - 1))
        order = torch.randperm(pool.num_normals, generator=self.generator)
        refs, queries = order[:k], order[k : k + n_normal]
        ref_feats = [level[refs] for level in pool.normals]
        feats = [level[queries] for level in pool.normals]
        covs = [torch.zeros(len(queries), *f.shape[-2:]) for f in feats]
        if n_anomalous and pool.num_anomalies:
            real = pool.real_anomalies if prefer_real else 0
            source = torch.arange(real) if real else torch.arange(pool.real_anomalies, pool.num_anomalies)
            if len(source) == 0:
                source = torch.arange(pool.num_anomalies)
            pick = source[torch.randint(len(source), (n_anomalous,), generator=self.generator)]
            feats = [torch.cat([f, a[pick]]) for f, a in zip(feats, pool.anomalies, strict=True)]
            covs = [torch.cat([c, m[pick]]) for c, m in zip(covs, pool.masks, strict=True)]
        return ref_feats, feats, covs

    def normals_of(self, category: str, rows: torch.Tensor) -> list[torch.Tensor]:
        """Per-level features of the given normal rows of ``category``."""
        return [level[rows] for level in self.classes[category].normals]


def _device(encode: Encoder) -> torch.device:
    owner = getattr(encode, "__self__", None)
    if isinstance(owner, torch.nn.Module):
        parameter = next(owner.parameters(), None)
        if parameter is not None:
            return parameter.device
    return torch.device("cpu")
