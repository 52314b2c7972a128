"""Outer level of the multi-directional meta-learning: softmax confidence margin, temperature, PCGrad.

Shared by MetaAD and CGAD (outer level of arXiv 2601.19833). With a normality logit ``z`` (normal vs anomaly), the
tempered two-class softmax confidence of "normal" is ``σ(z/T)``. The outer loss on an episode's in-distribution
(ID, normal) and out-of-distribution (OOD, anomalous) samples is

``L = BCE(σ(z_ID/T), 1) + BCE(σ(z_OOD/T), 0) + α·[m − (mean z_ID/T − mean z_OOD/T)]₊ + λ_T·(log T)²``

(``margin="mean_gap"``, the paper's form, m = 0.5, α = 0.1, λ_T = 1e-3). ``margin="pairwise"`` uses the
authors' later variant (pairwise hinge over ≤2048 ID/OOD pairs, m = 0.1, weight 0.75, plus an anchor
term 0.1·(mean s_ID² + mean (1 − s_OOD)²) with s = 1 − σ(z/T)); ``margin="energy"`` the squared-hinge
energy margin of Liu et al. (2020).

:func:`pcgrad_backward` resolves conflicting gradients of several losses on shared parameters (Yu et al.,
2020): each gradient loses its component along any other gradient it conflicts with (negative dot
product), in a random order, then they are summed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anomalib_cgad.validation import check_choice

MARGINS = ("mean_gap", "pairwise", "energy")


class BoundedTemperature(nn.Module):
    """Learnable softmax temperature ``T = T_min + (T_max − T_min)·σ(ρ)``, initialised at ``init``.

    Args:
        init (float): initial T. Defaults to ``1.0``.
        bounds (tuple[float, float]): ``(T_min, T_max)``. Defaults to ``(0.5, 10.0)``.
        learn (bool): learn T (else fixed at ``init``). Defaults to ``True``.
    """

    def __init__(self, init: float = 1.0, bounds: tuple[float, float] = (0.5, 10.0), learn: bool = True) -> None:
        super().__init__()
        low, high = bounds
        if not low < init < high:
            msg = f"Initial temperature {init} must lie inside the bounds {bounds}."
            raise ValueError(msg)
        fraction = (init - low) / (high - low)
        rho = torch.tensor(float(torch.logit(torch.tensor(fraction))))
        self.rho = nn.Parameter(rho, requires_grad=learn)
        self.register_buffer("bounds", torch.tensor([low, high]))

    def forward(self) -> torch.Tensor:
        """Current temperature (a 0-d tensor)."""
        return self.bounds[0] + (self.bounds[1] - self.bounds[0]) * torch.sigmoid(self.rho)


def confidence_margin_loss(
    z_id: torch.Tensor,
    z_ood: torch.Tensor,
    temperature: torch.Tensor,
    margin: str = "mean_gap",
    m: float = 0.5,
    alpha: float = 0.1,
    lambda_t: float = 1e-3,
    energy_margins: tuple[float, float] = (-2.0, 2.0),
) -> torch.Tensor:
    """Outer loss on normality logits of ID normals and OOD anomalies (see module docstring)."""
    check_choice("margin", margin, MARGINS)
    id_logit, ood_logit = z_id / temperature, z_ood / temperature
    loss = F.binary_cross_entropy_with_logits(id_logit, torch.ones_like(id_logit))
    loss = loss + F.binary_cross_entropy_with_logits(ood_logit, torch.zeros_like(ood_logit))
    if margin == "mean_gap":
        loss = loss + alpha * F.relu(m - (id_logit.mean() - ood_logit.mean()))
    elif margin == "pairwise":
        generator = torch.Generator().manual_seed(0)
        pairs = min(2048, len(id_logit) * len(ood_logit))
        i = torch.randint(len(id_logit), (pairs,), generator=generator).to(id_logit.device)
        j = torch.randint(len(ood_logit), (pairs,), generator=generator).to(id_logit.device)
        loss = loss + 0.75 * F.relu(0.1 - (id_logit[i] - ood_logit[j])).mean()
        s_id, s_ood = 1 - torch.sigmoid(id_logit), 1 - torch.sigmoid(ood_logit)
        loss = loss + 0.1 * ((s_id**2).mean() + ((1 - s_ood) ** 2).mean())
    else:
        # Two logits (z/2, -z/2): energy E = -T·logsumexp(ℓ/T); normals should have low energy.
        def energy(z: torch.Tensor) -> torch.Tensor:
            return -temperature * torch.logsumexp(torch.stack([z / 2, -z / 2]) / temperature, dim=0)

        m_in, m_out = energy_margins
        loss = loss + F.relu(energy(z_id) - m_in).pow(2).mean() + F.relu(m_out - energy(z_ood)).pow(2).mean()
    return loss + lambda_t * torch.log(temperature) ** 2


def pcgrad_backward(losses: Sequence[torch.Tensor], params: Sequence[nn.Parameter], seed: int = 0) -> int:
    """Set ``param.grad`` to the PCGrad combination of the gradients of ``losses``.

    Args:
        losses (Sequence[torch.Tensor]): scalar losses sharing ``params``.
        params (Sequence[nn.Parameter]): shared parameters.
        seed (int): order of the projections. Defaults to ``0``.

    Returns:
        int: how many conflicting pairs were projected.
    """
    params = [p for p in params if p.requires_grad]
    flat_grads = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        flat = [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params, strict=True)]
        flat_grads.append(torch.cat(flat))
    projected = [g.clone() for g in flat_grads]
    rng = random.Random(seed)
    conflicts = 0
    for i, grad in enumerate(projected):
        others = [j for j in range(len(flat_grads)) if j != i]
        rng.shuffle(others)
        for j in others:
            dot = torch.dot(grad, flat_grads[j])
            if dot < 0:
                grad -= dot / (flat_grads[j].norm() ** 2 + 1e-12) * flat_grads[j]
                conflicts += 1
    total = torch.stack(projected).sum(0)
    offset = 0
    for param in params:
        count = param.numel()
        param.grad = total[offset : offset + count].view_as(param).clone()
        offset += count
    return conflicts


def outer_backward(
    clean: torch.Tensor,
    losses: Sequence[torch.Tensor],
    shared: Sequence[nn.Parameter],
    calibration: Sequence[nn.Parameter],
    pcgrad: bool,
    backward: Callable[[torch.Tensor], None],
    seed: int = 0,
) -> None:
    """Gradients of one outer step of MetaAD or CGAD.

    With ``pcgrad`` the ``shared`` parameters get the PCGrad combination of ``[clean, *losses]`` (the clean
    likelihood term and each class's margin loss), and the ``calibration`` parameters (CGAD's boundaries, the
    temperature) get the gradient of the summed margin losses only. Calibration parameters that do not
    require grad (``learn_temperature=False``) are skipped. Without ``pcgrad``, ``backward`` runs on
    ``clean + Σ losses``.

    Args:
        clean (torch.Tensor): scalar clean term.
        losses (Sequence[torch.Tensor]): per-class margin losses.
        shared (Sequence[nn.Parameter]): parameters the losses share (the flow, MetaAD's head).
        calibration (Sequence[nn.Parameter]): boundaries / temperature.
        pcgrad (bool): resolve conflicts with PCGrad.
        backward (Callable[[torch.Tensor], None]): the module's ``manual_backward``.
        seed (int): order of the PCGrad projections. Defaults to ``0``.
    """
    margin = torch.stack(list(losses)).sum()
    if not pcgrad:
        backward(margin + clean)
        return
    pcgrad_backward([clean, *losses], shared, seed=seed)
    trainable = [p for p in calibration if p.requires_grad]
    if trainable:
        for param, grad in zip(trainable, torch.autograd.grad(margin, trainable), strict=True):
            param.grad = grad
