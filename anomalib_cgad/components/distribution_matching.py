"""Feature distribution matching of ResAD++: a codebook of normal residuals (VQ) and EFDM at test time.

The released ResAD code (the ResAD++ method; not in the NeurIPS paper) learns, per feature level, a codebook of residual
vectors on **normal** training positions. At test time each residual map is moved towards the residual
distribution seen in training, per image and channel, by exact feature distribution matching (EFDM):

1. ``q`` = the nearest code (Euclidean) at every position of the residual map ``r``;
2. per image and channel, sort the ``H·W`` values of ``r`` and of ``q``;
3. replace ``sorted(r)`` by ``sorted(r) + (1 − α)(sorted(q) − sorted(r))`` (``α = 0.4`` in the released code);
4. put every value back at the position of the value of ``r`` it replaced, so the ranks of ``r`` are kept and
   only its value distribution moves ``(1 − α)`` of the way to that of the codes.

Training never applies EFDM; the codebook is fitted with the VQ-VAE loss
``mean‖sg(e) − r‖² + β·mean‖e − sg(r)‖²`` (``sg`` = stop-gradient, ``e`` = nearest code) on normal positions.
The residuals carry no gradient, so only the β-term trains the codes: an online k-means of normal residuals.

Codebook initialisation (a deliberate deviation, see the ResAD README): the released code draws the codes
from ``U(−1/K, 1/K)`` (``K = 1536``), i.e. almost 0, and moves them with Adam at ``lr = 1e-5`` for 100 epochs.
Adam moves a parameter by about ``lr`` per step, so on residuals of scale ~1–10 such codes never reach the
data in a short run, and EFDM then drags every test residual towards 0. :meth:`ResidualCodebook.initialise`
therefore sets the codes to randomly drawn normal training residuals (the first training step does it), and
records the spread of those residuals so that the codebook's Adam can use a learning rate proportional to
the scale of each level (:meth:`ResidualCodebook.param_groups`).

Every operation of :meth:`ResidualCodebook.nearest` and :func:`efdm` (matmul, ``argmin``, ``gather``,
``sort``/``argsort``, ``cumsum``, out-of-place ``scatter_add``) exports to ONNX/OpenVINO with dynamic batch and
spatial sizes. Tied residual values (exact zeros of squared residuals) get the mean of their target values,
so torch and OpenVINO agree although their sorts order ties differently.

Example:
    >>> import torch
    >>> from anomalib_cgad.components.distribution_matching import ResidualCodebook, efdm
    >>> codebook = ResidualCodebook(channels=[8], num_codes=16)
    >>> residual = torch.rand(2, 8, 4, 4)
    >>> codebook.initialise([residual], [torch.ones(2, 4, 4, dtype=torch.bool)])  # levels initialised
    [0]
    >>> matched = efdm(residual, codebook.nearest(0, residual), alpha=0.4)
    >>> matched.shape
    torch.Size([2, 8, 4, 4])
    >>> torch.equal(efdm(residual, codebook.nearest(0, residual), alpha=1.0), residual)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from anomalib_cgad.components.reference_bank import best_index, flatten_patches


def efdm(residual: torch.Tensor, quantised: torch.Tensor, alpha: float = 0.4) -> torch.Tensor:
    """Exact feature distribution matching of ``residual`` towards ``quantised``, per image and channel.

    For every image and channel the ``H·W`` values of ``residual`` keep their ranks, and the value of rank
    ``i`` becomes ``α·sorted(r)_i + (1 − α)·sorted(q)_i`` (= ``sorted(r) + (1 − α)(sorted(q) − sorted(r))``).
    Values of ``residual`` that tie share the mean of the sorted ``quantised`` values of their ranks, so the
    result is independent of the tie order of the sort (torch and OpenVINO order ties differently) and
    equivariant to permutations of the positions. Un-sorting is a gather with the inverse permutation
    (``argsort`` of the sort order); everything (``sort``, ``argsort``, ``gather``, ``cumsum``, out-of-place
    ``scatter_add``) exports to ONNX/OpenVINO.

    Args:
        residual (torch.Tensor): ``(B, C, H, W)`` residual map ``r``.
        quantised (torch.Tensor): ``(B, C, H, W)`` target map ``q`` (the nearest codes).
        alpha (float): weight of the original values, in ``[0, 1]``. ``1`` returns ``residual`` unchanged,
            ``0`` the sorted values of ``quantised`` in the rank order of ``residual``. Defaults to ``0.4``.

    Returns:
        torch.Tensor: ``(B, C, H, W)`` matched residual map.

    Raises:
        ValueError: ``alpha`` outside ``[0, 1]`` or shapes that differ.

    Example:
        >>> r = torch.tensor([3.0, 1.0, 2.0]).reshape(1, 1, 1, 3)
        >>> q = torch.tensor([10.0, 30.0, 20.0]).reshape(1, 1, 1, 3)
        >>> efdm(r, q, alpha=0.0).flatten().tolist()
        [30.0, 10.0, 20.0]
    """
    if not 0.0 <= alpha <= 1.0:
        msg = f"alpha must lie in [0, 1], got {alpha}."
        raise ValueError(msg)
    if residual.shape != quantised.shape:
        msg = f"residual and quantised maps differ in shape: {tuple(residual.shape)} vs {tuple(quantised.shape)}."
        raise ValueError(msg)
    if alpha == 1.0:
        return residual
    values = residual.flatten(2)
    order = values.argsort(dim=-1)
    ordered = values.gather(-1, order)
    target = quantised.flatten(2).to(values.dtype).sort(dim=-1).values
    # Ties of r (e.g. exact-zero squared residuals) share the mean of their sorted-q values: the result does not
    # depend on how a sort orders equal values, which differs between torch and OpenVINO.
    first = torch.ones_like(ordered[..., :1], dtype=torch.bool)
    group = torch.cat([first, ordered[..., 1:] != ordered[..., :-1]], dim=-1).long().cumsum(dim=-1) - 1
    sums = torch.zeros_like(target).scatter_add(-1, group, target)
    counts = torch.zeros_like(target).scatter_add(-1, group, torch.ones_like(target))
    target = (sums / counts.clamp(min=1)).gather(-1, group)
    rank = order.argsort(dim=-1)  # inverse permutation: un-sorting is a gather
    # α·r + (1 − α)·q_rank is sorted(r) + (1 − α)(sorted(q) − sorted(r)) un-sorted, and exact at α ∈ {0, 1}
    return (alpha * values + (1.0 - alpha) * target.gather(-1, rank)).reshape(residual.shape)


@dataclass(frozen=True)
class CodebookOptions:
    """ResAD++'s feature distribution matching: a residual codebook per level and EFDM towards it.

    Args:
        codes (int): codes per level (released code: 1536). Defaults to ``1536``.
        alpha (float): EFDM weight of the original residual values (``1`` = no change). Defaults to ``0.4``.
        beta (float): weight of the codebook term of the VQ loss. Defaults to ``0.25``.
    """

    codes: int = 1536
    alpha: float = 0.4
    beta: float = 0.25

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            msg = f"fdm_alpha must lie in [0, 1], got {self.alpha}."
            raise ValueError(msg)


class ResidualCodebook(nn.Module):
    """One codebook of residual vectors per feature level (the VQ part of ResAD++'s distribution matching).

    Args:
        channels (Sequence[int]): channels ``C_l`` of each level.
        num_codes (int): codes per level (released code: 1536). Defaults to ``1536``.
        beta (float): weight of the codebook term ``mean‖e − sg(r)‖²``. Defaults to ``0.25``.

    Attributes:
        codes_<l> (nn.Parameter): ``(num_codes, C_l)`` codes of level ``l``, drawn from ``U(−1/K, 1/K)`` until
            :meth:`initialise` replaces them by normal training residuals.
        initialised (torch.Tensor): ``(L,)`` bool, whether level ``l`` was initialised from residuals (saved in
            checkpoints, so a reloaded or resumed model is never re-initialised).
        spread (torch.Tensor): ``(L,)`` standard deviation of the residuals each level was initialised from
            (``1`` before), the scale of the per-level learning rate of :meth:`param_groups`.
    """

    def __init__(self, channels: Sequence[int], num_codes: int = 1536, beta: float = 0.25) -> None:
        super().__init__()
        if num_codes < 1:
            msg = f"num_codes must be >= 1, got {num_codes}."
            raise ValueError(msg)
        self.channels = list(channels)
        self.num_codes = num_codes
        self.beta = beta
        bound = 1.0 / num_codes
        for level, channel in enumerate(self.channels):
            codes = torch.empty(num_codes, channel).uniform_(-bound, bound)
            self.register_parameter(f"codes_{level}", nn.Parameter(codes))
        self.register_buffer("initialised", torch.zeros(len(self.channels), dtype=torch.bool))
        self.register_buffer("spread", torch.ones(len(self.channels)))

    @property
    def num_levels(self) -> int:
        """Number of feature levels."""
        return len(self.channels)

    def codes(self, level: int) -> nn.Parameter:
        """The ``(num_codes, C_l)`` codes of ``level``."""
        return getattr(self, f"codes_{level}")

    @staticmethod
    def _assign(rows: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (Euclidean) of every row: ``argmin ‖e‖² − 2 r·e`` (``‖r‖²`` is constant)."""
        distance = (codes * codes).sum(-1) - 2 * rows @ codes.transpose(0, 1)
        return best_index(-distance)

    def nearest(self, level: int, residual: torch.Tensor) -> torch.Tensor:
        """The nearest code of ``level`` at every position of a ``(B, C, H, W)`` residual map.

        Args:
            level (int): feature level.
            residual (torch.Tensor): ``(B, C_l, H, W)`` residual map.

        Returns:
            torch.Tensor: ``(B, C_l, H, W)`` map of nearest codes.
        """
        batch, channels, height, width = residual.shape
        rows = flatten_patches(residual)
        codes = self.codes(level).to(rows.dtype)
        index = self._assign(rows, codes)
        nearest = torch.gather(codes, 0, index.unsqueeze(-1).expand(-1, channels))
        return nearest.reshape(batch, height, width, channels).permute(0, 3, 1, 2)

    @staticmethod
    def _normal_rows(residual: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` residual rows at the normal positions (``normal``: ``(B, H, W)`` bool)."""
        return flatten_patches(residual)[normal.reshape(-1).to(torch.bool)]

    def loss(self, residuals: Sequence[torch.Tensor], normal_masks: Sequence[torch.Tensor]) -> torch.Tensor:
        """VQ loss ``Σ_l mean‖sg(e) − r‖² + β·mean‖e − sg(r)‖²`` over normal positions only.

        Means run over all elements of the selected rows (``F.mse_loss``). A level without any normal
        position contributes 0 (the released code returns NaN there, the mean of an empty set).

        Args:
            residuals (Sequence[torch.Tensor]): per level ``(B, C_l, H_l, W_l)`` residual maps.
            normal_masks (Sequence[torch.Tensor]): per level ``(B, H_l, W_l)`` bool, ``True`` at normal positions.

        Returns:
            torch.Tensor: scalar loss; it requires grad only when some level has a normal position.
        """
        total = residuals[0].new_zeros(())
        for level, (residual, normal) in enumerate(zip(residuals, normal_masks, strict=True)):
            rows = self._normal_rows(residual, normal)
            if rows.shape[0] == 0:
                continue
            codes = self.codes(level)
            with torch.no_grad():
                index = self._assign(rows.detach().to(codes.dtype), codes)
            nearest = codes[index]
            commitment = F.mse_loss(nearest.detach().to(rows.dtype), rows)
            codebook = F.mse_loss(nearest, rows.detach().to(codes.dtype))
            total = total + commitment + self.beta * codebook
        return total

    @torch.no_grad()
    def quantisation_error(self, residuals: Sequence[torch.Tensor], normal_masks: Sequence[torch.Tensor]) -> float:
        """Mean squared distance of normal residual elements to their nearest code, averaged over levels."""
        errors = []
        for level, (residual, normal) in enumerate(zip(residuals, normal_masks, strict=True)):
            rows = self._normal_rows(residual, normal)
            if rows.shape[0]:
                codes = self.codes(level).to(rows.dtype)
                errors.append(float(F.mse_loss(codes[self._assign(rows, codes)], rows)))
        return sum(errors) / len(errors) if errors else float("nan")

    @torch.no_grad()
    def initialise(
        self,
        residuals: Sequence[torch.Tensor],
        normal_masks: Sequence[torch.Tensor],
        generator: torch.Generator | None = None,
    ) -> list[int]:
        """Set the codes of every not yet initialised level to randomly drawn normal residuals.

        Rows are drawn without replacement; when a level has fewer normal rows than codes, every row is used
        and the remaining codes repeat them with a small jitter (1 % of the level's spread) so that they can
        separate during training. Levels without a normal position are left for a later call.

        Args:
            residuals (Sequence[torch.Tensor]): per level ``(B, C_l, H_l, W_l)`` residual maps.
            normal_masks (Sequence[torch.Tensor]): per level ``(B, H_l, W_l)`` bool, ``True`` at normal positions.
            generator (torch.Generator | None): CPU generator of the draws. Defaults to ``None``.

        Returns:
            list[int]: the levels initialised by this call.
        """
        done = []
        for level, (residual, normal) in enumerate(zip(residuals, normal_masks, strict=True)):
            if bool(self.initialised[level]):
                continue
            rows = self._normal_rows(residual, normal).detach()
            count = rows.shape[0]
            if count == 0:
                continue
            codes = self.codes(level)
            rows = rows.to(codes.dtype)
            spread = rows.std().clamp(min=1e-6) if rows.numel() > 1 else rows.new_ones(())
            order = torch.randperm(count, generator=generator)
            pick = order.repeat((self.num_codes + count - 1) // count)[: self.num_codes].to(rows.device)
            chosen = rows[pick]
            if count < self.num_codes:
                noise = torch.randn(self.num_codes - count, rows.shape[1], generator=generator).to(rows.device)
                chosen[count:] += 0.01 * spread * noise
            codes.copy_(chosen)
            self.spread[level] = spread
            self.initialised[level] = True
            done.append(level)
        return done

    def param_groups(self, lr: float) -> list[dict]:
        """Adam parameter groups, one per level, with learning rate ``lr · spread_l``.

        Adam moves a parameter by about its learning rate per step whatever the gradient's scale, so a
        learning rate relative to the spread of the level's residuals works for any backbone and residual type.
        """
        return [
            {"params": [self.codes(level)], "lr": lr * float(self.spread[level])} for level in range(self.num_levels)
        ]

    def update_learning_rates(self, optimizer: torch.optim.Optimizer, lr: float) -> None:
        """Re-apply ``lr · spread_l`` to the groups of an optimizer built from :meth:`param_groups`."""
        for level, group in enumerate(optimizer.param_groups):
            group["lr"] = lr * float(self.spread[level])
