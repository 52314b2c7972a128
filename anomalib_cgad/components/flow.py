"""Per-level conditional normalizing flow on patch features (ResAD's distribution estimator).

Built from anomalib's CFlow parts (``cflow_head`` = FrEIA-style ``AllInOneBlock`` coupling layers,
``positional_encoding_2d``, ``get_logp``), so it exports to ONNX/OpenVINO like anomalib's CFlow.

Steps of :meth:`ConditionalFlow.forward` for one level:

1. flatten ``(B, C, H, W)`` to ``(B·H·W, C)`` rows, each with the 2-D sin/cos code of its position;
2. push the rows through the level's flow → latent ``z`` and ``log|det J|``;
3. ``logp̄ = (−C/2·log 2π − ½‖z‖² + log|det J|) / C`` per position (the per-dimension log-likelihood,
   which does not underflow like the raw ``exp(logp)`` of ResAD's Eq. 7);
4. reshape to ``(B, H, W)``.

It also returns ``mean_c(z)``: with ResAD's abnormal density ``N(𝟙, I)`` the two-class softmax of normal
vs abnormal likelihood is exactly ``σ(mean_c(z) − ½)`` (resad.md §8).

Example:
    >>> import torch
    >>> flow = ConditionalFlow(channels=[8], coupling_blocks=2, condition_dim=16)
    >>> logp, zmean = flow(0, torch.rand(2, 8, 4, 4))
    >>> logp.shape, zmean.shape
    (torch.Size([2, 4, 4]), torch.Size([2, 4, 4]))
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from anomalib.models.image.cflow.utils import cflow_head, get_logp, positional_encoding_2d
from torch import nn

from anomalib_cgad.components.reference_bank import flatten_patches


class ConditionalFlow(nn.Module):
    """One conditional flow per feature level.

    Args:
        channels (Sequence[int]): channels of each level.
        coupling_blocks (int): ``AllInOneBlock`` layers per level (paper: 8, official code: 10).
            Defaults to ``8``.
        condition_dim (int): length of the positional code (paper: 256; multiple of 4). Defaults to ``128``.
        clamp_alpha (float): soft clamp of the affine scales. Defaults to ``1.9``.
        permute_soft (bool): random rotations from SO(C) between blocks (as in ResAD). Defaults to ``True``.
    """

    def __init__(
        self,
        channels: Sequence[int],
        coupling_blocks: int = 8,
        condition_dim: int = 128,
        clamp_alpha: float = 1.9,
        permute_soft: bool = True,
    ) -> None:
        super().__init__()
        self.channels = list(channels)
        self.condition_dim = condition_dim
        self.flows = nn.ModuleList(
            cflow_head(
                condition_vector=condition_dim,
                coupling_blocks=coupling_blocks,
                clamp_alpha=clamp_alpha,
                n_features=c,
                permute_soft=permute_soft,
            )
            for c in self.channels
        )

    def position_code(self, batch: int, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """``(B·H·W, condition_dim)`` positional code rows in the order of :func:`flatten_patches`."""
        code = positional_encoding_2d(self.condition_dim, height, width).to(like)
        return flatten_patches(code.unsqueeze(0).expand(batch, -1, -1, -1))

    def rows(self, level: int, rows: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row ``logp̄`` and ``mean_c(z)`` for flattened rows ``(N, C)`` with their codes ``(N, D)``."""
        z, log_jac_det = self.flows[level](rows, [condition])
        channels = rows.shape[1]
        return get_logp(channels, z, log_jac_det) / channels, z.mean(dim=1)

    def forward(self, level: int, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``logp̄`` and ``mean_c(z)`` maps ``(B, H, W)`` of level ``level``."""
        batch, _, height, width = feature.shape
        condition = self.position_code(batch, height, width, feature)
        logp, zmean = self.rows(level, flatten_patches(feature), condition)
        return logp.reshape(batch, height, width), zmean.reshape(batch, height, width)


def chunks(num_rows: int, chunk_size: int, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Shuffled row indices in chunks of at most ``chunk_size``; the remainder forms the last chunk.

    (ResAD's released code floors the division and drops the remainder, which left its coarsest flow level
    untrained for WideResNet50; see resad.md §15.2.)
    """
    order = torch.randperm(num_rows, generator=generator)
    yield from order.split(chunk_size)
