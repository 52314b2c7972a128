"""ResAD's residual losses (constraintor OCC and flow losses, ``paper``/``official`` presets); CGAD reuses them.

Notation: ``x'`` constrained feature rows ``(N, C)``, ``r`` the (detached) residual rows, ``y`` per-row
anomaly coverage in ``[0, 1]`` (a row counts as abnormal when ``y ≥ 0.5``), ``logp`` the per-dimension
log-likelihood ``logp̄`` of the flow and ``zmean = mean_c(z)``.

1. Constraintor (OCC) losses:

   - :func:`occ_paper` (Eq. 2): ``(1−y)·A(x') + y·‖x' − r‖₂`` with the pseudo-Huber ``A(x') = √(‖x'‖₂+1) − 1``;
   - :func:`occ_log_barrier` (released code, ResAD++): normals contracted onto a thin shell
     ``A ∈ [0.99·r_max, r_max]`` by two-sided exponentially weighted softplus barriers, abnormal rows kept
     near ``r`` (MSE + cosine) and pushed outside ``r_max + 0.1``.

2. Flow losses:

   - :func:`flow_loss_paper`: NLL of normals + λ·BG-SPP hinge (Eq. 4-6);
   - :func:`flow_loss_official`: ψ-wrapped NLL (ψ(u) = softplus(−u)), the abnormal ``N(𝟙, I)`` density
     for abnormal rows, a focal loss on ``σ(zmean − ½)`` and a softplus BG-SPP.

Empty subsets contribute 0 (the released code returns NaN there, the mean of an empty set).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _mean(values: torch.Tensor) -> torch.Tensor:
    return values.mean() if values.numel() else values.new_zeros(())


def pseudo_huber(rows: torch.Tensor) -> torch.Tensor:
    """``A(x') = √(‖x'‖₂ + 1) − 1`` per row."""
    return torch.sqrt(rows.norm(dim=1) + 1) - 1


def occ_paper(constrained: torch.Tensor, residual: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """Paper Eq. 2 (abnormal-invariant OCC loss) on rows."""
    abnormal = coverage >= 0.5
    normal_term = pseudo_huber(constrained[~abnormal])
    invariant_term = (constrained[abnormal] - residual[abnormal]).norm(dim=1)
    return (normal_term.sum() + invariant_term.sum()) / max(len(constrained), 1)


def _barrier(gap: torch.Tensor) -> torch.Tensor:
    return F.softplus(gap) * torch.exp(gap).detach()


def occ_log_barrier(
    constrained: torch.Tensor,
    residual: torch.Tensor,
    coverage: torch.Tensor,
    radius: float = 0.4,
) -> torch.Tensor:
    """Released code's log-barrier bidirectional OCC loss on rows."""
    abnormal = coverage >= 0.5
    distance = pseudo_huber(constrained)
    r_max = radius
    if abnormal.any():
        r_max = min(0.9 * float(distance[abnormal].min().detach()), radius)
    r_min = 0.99 * r_max
    normal = distance[~abnormal]
    loss = _mean(_barrier(normal[normal > r_max] - r_max)) + _mean(_barrier(r_min - normal[normal < r_min]))
    if abnormal.any():
        x, r = constrained[abnormal], residual[abnormal]
        outer = distance[abnormal]
        bound = r_max + 0.1
        loss = loss + F.mse_loss(x, r) + _mean(1 - F.cosine_similarity(x, r, dim=1))
        loss = loss + _mean(_barrier(bound - outer[outer < bound]))
    return loss


class BoundaryEMA:
    """EMA of the 5th percentile of normal ``logp̄`` (the BG-SPP boundary ``b_n``, as in the released code)."""

    def __init__(self, beta: float = 0.05, momentum: float = 0.9) -> None:
        self.beta = beta
        self.momentum = momentum
        self.value: float | None = None

    def update(self, normal_logp: torch.Tensor) -> float:
        """Fold the current chunk's percentile into the average and return it."""
        if normal_logp.numel():
            ordered = normal_logp.detach().sort().values
            current = float(ordered[int(self.beta * (len(ordered) - 1))])
            self.value = current if self.value is None else self.momentum * self.value + (1 - self.momentum) * current
        return 0.0 if self.value is None else self.value


def flow_loss_paper(logp: torch.Tensor, coverage: torch.Tensor, boundary: float, tau=0.1, weight=1.0) -> torch.Tensor:
    """NLL of normal rows + ``weight``·BG-SPP hinge (paper Eq. 4-6)."""
    abnormal = coverage >= 0.5
    normal = logp[~abnormal]
    loss = _mean(-normal)
    spp = _mean((boundary - normal).clamp(min=0)) + _mean((logp[abnormal] - boundary + tau).clamp(min=0))
    return loss + weight * spp


def focal(prob_abnormal: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss on probabilities (γ = 2)."""
    p_true = torch.where(target, prob_abnormal, 1 - prob_abnormal) + 1e-5
    return _mean(-((1 - p_true) ** gamma) * torch.log(p_true))


def flow_loss_official(
    logp: torch.Tensor,
    zmean: torch.Tensor,
    coverage: torch.Tensor,
    boundary: float,
    tau: float = 0.1,
    weight: float = 1.0,
) -> torch.Tensor:
    """ψ-NLL + abnormal ``N(𝟙, I)`` density + focal + softplus BG-SPP (released code)."""
    abnormal = coverage >= 0.5
    loss = _mean(F.softplus(-logp[~abnormal]))
    if abnormal.any():
        logp_abnormal = logp + zmean - 0.5
        loss = loss + _mean(F.softplus(-logp_abnormal[abnormal]))
        loss = loss + focal(torch.sigmoid(zmean - 0.5), abnormal)
        normal = logp[~abnormal]
        spp_normal = _mean(F.softplus(boundary - normal[normal <= boundary]))
        outer = logp[abnormal]
        spp_abnormal = _mean(F.softplus(outer[outer >= boundary - tau] - (boundary - tau)))
        loss = loss + weight * (spp_normal + spp_abnormal)
    return loss
