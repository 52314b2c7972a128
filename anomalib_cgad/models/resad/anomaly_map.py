"""Anomaly map from per-level patch scores (shared by ResAD, MetaAD and CGAD).

Steps:

1. bilinearly up-sample each level's ``(B, 1, H_l, W_l)`` patch scores to the input size;
2. sum over levels;
3. smooth with anomalib's ``GaussianBlur2d`` (σ = 4 → 33×33 kernel, as in ResAD and PatchCore).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from anomalib.models.components import GaussianBlur2d
from torch import nn


class AnomalyMapGenerator(nn.Module):
    """Up-sample, sum and smooth per-level patch scores.

    Args:
        sigma (float): standard deviation of the Gaussian smoothing. Defaults to ``4``.
    """

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        kernel_size = 2 * int(4.0 * sigma + 0.5) + 1
        self.blur = GaussianBlur2d(kernel_size=(kernel_size, kernel_size), sigma=(sigma, sigma), channels=1)

    def forward(self, scores: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        """Return the ``(B, 1, H, W)`` anomaly map for per-level scores and the input ``size``."""
        total = sum(F.interpolate(s, size=tuple(size), mode="bilinear", align_corners=False) for s in scores)
        return self.blur(total)
