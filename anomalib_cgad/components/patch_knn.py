"""The training-free patch-kNN score: each query patch's distance to its nearest reference patch.

The reference point every few-shot model here must beat. One function, shared by the benchmark baseline
(``benchmarks/patch_knn.py``, its own frozen backbone) and the demo (the trained model's backbone and its
references), so both compute the same score.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from anomalib_cgad.components.reference_bank import flatten_patches, nearest_reference


def patch_knn_map(
    features: Sequence[torch.Tensor], references: Sequence[torch.Tensor], size: Sequence[int]
) -> torch.Tensor:
    """Mean over levels of the nearest-reference-patch L2 distance, upsampled to ``size``.

    Args:
        features (Sequence[torch.Tensor]): per level, the query features ``(B, C, h, w)``.
        references (Sequence[torch.Tensor]): per level, the reference patches ``(M, C)``.
        size (Sequence[int]): output ``(H, W)``.

    Returns:
        torch.Tensor: ``(B, 1, H, W)`` distance map (unsmoothed).

    Example:
        >>> maps = patch_knn_map([torch.zeros(1, 2, 4, 4)], [torch.zeros(3, 2)], (8, 8))
        >>> tuple(maps.shape), float(maps.max())
        ((1, 1, 8, 8), 0.0)
    """
    maps = []
    for feature, refs in zip(features, references, strict=True):
        batch, _, height, width = feature.shape
        queries = flatten_patches(feature)
        distance = (queries - nearest_reference(queries, refs.to(queries.dtype))).norm(dim=-1)
        level_map = distance.reshape(batch, 1, height, width)
        maps.append(F.interpolate(level_map, size=tuple(size), mode="bilinear", align_corners=False))
    return torch.stack(maps).mean(0)
