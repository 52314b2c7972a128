"""Per-level conditional normalizing flow on patch features (ResAD's distribution estimator).

Built from anomalib's CFlow parts (``SequenceINN`` of FrEIA-style ``AllInOneBlock`` coupling layers with
CFlow's subnet layout, ``positional_encoding_2d``, ``get_logp``), so it exports to ONNX/OpenVINO like
anomalib's CFlow.

Steps of :meth:`ConditionalFlow.forward` for one level:

1. flatten ``(B, C, H, W)`` to ``(B·H·W, C)`` rows, each with the 2-D sin/cos code of its position;
2. push the rows through the level's flow → latent ``z`` and ``log|det J|``;
3. ``logp̄ = (−C/2·log 2π − ½‖z‖² + log|det J|) / C`` per position (the per-dimension log-likelihood,
   which does not underflow like the raw ``exp(logp)`` of ResAD's Eq. 7);
4. reshape to ``(B, H, W)``.

The coupling subnets are CFlow's ``Linear(d + D, 2(d + D)) → ReLU → Linear`` (same parameters, same
initialisation, same checkpoint keys), but when the rows form whole ``H × W`` grids, the condition's share of
the first layer, ``W_c·code + b``, depends only on the position: :class:`PositionalSubnet` computes it once
per position instead of once per row (in eval mode kept with the folded blocks until a weight changes). With
``D = 128`` and ``d = C/2 = 20`` that share is 86% of the first layer's multiply-adds, which made the flow the
largest test-time cost after the backbone (``benchmarks/deploy_speed.py``). The values are those of the plain
subnet (tests/integration/test_flow.py compares them).

In eval mode :meth:`ConditionalFlow.forward` runs each level as a :class:`FoldedLevel` (the same function
with its constants folded into fewer, larger operations; tests/integration/test_flow.py compares the values).

It also returns ``mean_c(z)``: with ResAD's abnormal density ``N(𝟙, I)`` the two-class softmax of normal
vs abnormal likelihood is exactly ``σ(mean_c(z) − ½)`` (the log-density difference is linear in ``z``).

Example:
    >>> import torch
    >>> flow = ConditionalFlow(channels=[8], coupling_blocks=2, condition_dim=16)
    >>> logp, zmean = flow(0, torch.rand(2, 8, 4, 4))
    >>> logp.shape, zmean.shape
    (torch.Size([2, 4, 4]), torch.Size([2, 4, 4]))
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import NamedTuple

import torch
from anomalib.models.components.flow import AllInOneBlock
from anomalib.models.image.cflow.utils import get_logp, positional_encoding_2d
from FrEIA.framework import SequenceINN
from torch import nn

from anomalib_cgad.components.reference_bank import flatten_patches
from anomalib_cgad.components.tracing import is_tracing


def _cacheable(module: nn.Module) -> bool:
    """Whether values derived from ``module``'s weights may be kept between calls (eval, no grad, no tracing)."""
    return not module.training and not torch.is_grad_enabled() and not is_tracing()


def _add_position(passive: torch.Tensor, first: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """``x₁·W₁ + position share`` for rows that are whole grids (one fused product for a single grid)."""
    if not is_tracing() and passive.shape[0] == position.shape[0]:
        return torch.addmm(position, passive, first)
    return ((passive @ first).unflatten(0, (-1, position.shape[0])) + position).flatten(0, 1)


class PositionalSubnet(nn.Sequential):
    """CFlow's coupling subnet ``Linear(d + D, 2(d + D)) → ReLU → Linear(2(d + D), out)`` on ``[x₁, code]`` rows.

    Plain rows (any order, e.g. ResAD's shuffled training chunks) take the ordinary path. While :attr:`grid`
    holds the ``(H·W, D)`` codes of one grid, the input rows are taken to be ``B`` whole grids in (b, h, w)
    order, without code columns (:meth:`ConditionalFlow.forward` passes an empty condition), and
    ``W_c·code + b`` is computed once per position (in eval mode the flow keeps it with its
    :class:`FoldedLevel`).

    Args:
        dims_in (int): ``d + D``, the block's passive half plus the condition.
        dims_out (int): affine coefficients of the active half.
        condition_dim (int): ``D``.
    """

    def __init__(self, dims_in: int, dims_out: int, condition_dim: int) -> None:
        super().__init__(nn.Linear(dims_in, 2 * dims_in), nn.ReLU(), nn.Linear(2 * dims_in, dims_out))
        self.condition_dim = condition_dim
        self.split = dims_in - condition_dim  # passive channels d; columns from here on are the code
        self.grid: torch.Tensor | None = None

    def position_bias(self, grid: torch.Tensor) -> torch.Tensor:
        """``(H·W, 2(d + D))`` share of the first layer that depends only on the position."""
        first = self[0]
        return torch.addmm(first.bias, grid, first.weight[:, self.split :].T)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Affine coefficients ``(N, dims_out)`` of rows ``[x₁, code]`` ``(N, d + D)`` (grid: ``x₁``, ``(N, d)``)."""
        if self.grid is None:
            return super().forward(rows)
        first, activation, last = self
        if rows.shape[1] != self.split:
            msg = f"On a grid the subnet takes the {self.split} passive channels only, got {rows.shape[1]} columns."
            raise ValueError(msg)
        hidden = _add_position(rows, first.weight[:, : self.split].T, self.position_bias(self.grid))
        return last(activation(hidden))


class FoldedBlock(NamedTuple):
    """One ``AllInOneBlock``'s weights rearranged for inference (part of a :class:`FoldedLevel`).

    The block computes ``y = W·(s ⊙ [x₁, x₂'] + o)`` after its coupling ``x₂' = x₂·exp(c·tanh(a_s)) + a_t``
    with ``a = 0.1·subnet(x₁)``. Folded:

    - the global scale ``s`` and offset ``o`` into the rotation ``W`` (``W·diag(s)`` split into its passive and
      active rows, bias ``W·o``);
    - ``tanh(t) = 2σ(2t) − 1`` (torch's CPU ``tanh`` took 21 µs where ``sigmoid`` took 4 on a 400 × 20 block), so
      ``c·tanh(a_s) = 2c·σ(2a_s) − c``: the 0.1 and the 2 go into the subnet's last layer, whose ``a_s`` and
      ``a_t`` rows stay one matrix product; the ``e^{−c}`` of ``exp(2c·σ − c)`` goes into the *previous* block's
      rotation (its active output columns), so the coupling is ``x₂' = x₂·exp(2c·σ) + a_t`` on pre-scaled ``x₂``;
    - ``log|det J|`` to ``2c·Σσ`` plus one constant per level (:class:`FoldedLevel`).

    A block is then four matrix products and six element-wise operations instead of about 25 operations (the
    flow was dispatch-bound on small inputs). With one grid (batch 1) the position share is the first product's
    bias.
    """

    passive: int  # channels of x₁
    first: torch.Tensor  # (d, hidden): the subnet's first layer on x₁
    position: torch.Tensor  # (H·W, hidden): the first layer's share of the grid's positional codes, plus its bias
    coefficients: torch.Tensor  # (hidden, 2·d₂): [0.2 · the last layer's a_s rows | 0.1 · its a_t rows]ᵀ
    coefficients_bias: torch.Tensor  # (2·d₂,)
    rotate_passive: torch.Tensor  # (d, C): rows of (W·diag(s))ᵀ for x₁, next block's active columns · e^{−c}
    rotate_active: torch.Tensor  # (d₂, C): the same for x₂'
    offset: torch.Tensor  # (C,): W·o, scaled like the columns


class FoldedLevel(NamedTuple):
    """A level's flow on one grid size as :class:`FoldedBlock` s (:meth:`ConditionalFlow.forward` in eval mode)."""

    blocks: list[FoldedBlock]
    input_scale: float  # e^{−c} for the first block's active channels (later blocks get it from the rotation)
    twice_clamp: float  # 2c, the same in every block
    log_det_offset: torch.Tensor  # (): Σ over blocks of Σ log s − c·d₂


def fold_level(blocks: Sequence[AllInOneBlock], grid: torch.Tensor) -> FoldedLevel:
    """The :class:`FoldedLevel` of one level's blocks (from :func:`coupling_flow`) on a grid with codes ``grid``."""
    clamps = {float(block.clamp) for block in blocks}
    if len(clamps) != 1:
        msg = f"The folded flow needs one affine clamp for all blocks of a level, got {sorted(clamps)}."
        raise ValueError(msg)
    clamp = clamps.pop()
    folded, log_det_offset = [], 0.0
    for index, block in enumerate(blocks):
        passive, active = block.splits
        first, _, last = block.subnet
        scale = block.global_scale_activation(block.global_scale).reshape(-1)
        rotation = block.w_perm.reshape(block.w_perm.shape[0], -1)
        scaled = (rotation * scale).T  # (C_in, C_out)
        offset = rotation @ block.global_offset.reshape(-1)
        if index + 1 < len(blocks):  # the next block's x₂ arrives multiplied by e^{−c}
            column_scale = torch.ones_like(offset)
            column_scale[blocks[index + 1].splits[0] :] = math.exp(-clamp)
            scaled, offset = scaled * column_scale, offset * column_scale
        folded.append(
            FoldedBlock(
                passive=passive,
                first=first.weight[:, :passive].T.contiguous(),
                position=block.subnet.position_bias(grid),
                coefficients=torch.cat([0.2 * last.weight[:active], 0.1 * last.weight[active:]]).T.contiguous(),
                coefficients_bias=torch.cat([0.2 * last.bias[:active], 0.1 * last.bias[active:]]),
                rotate_passive=scaled[:passive].contiguous(),
                rotate_active=scaled[passive:].contiguous(),
                offset=offset,
            )
        )
        log_det_offset = log_det_offset + torch.log(scale).sum() - clamp * active
    return FoldedLevel(folded, math.exp(-clamp), 2 * clamp, log_det_offset)


def coupling_flow(channels: int, coupling_blocks: int, condition_dim: int, clamp_alpha: float, permute_soft: bool):
    """One level's ``SequenceINN`` of conditional ``AllInOneBlock`` layers (the layout of CFlow's ``cflow_head``)."""
    coder = SequenceINN(channels)
    for _ in range(coupling_blocks):
        coder.append(
            AllInOneBlock,
            cond=0,
            cond_shape=(condition_dim,),
            subnet_constructor=partial(PositionalSubnet, condition_dim=condition_dim),
            affine_clamping=clamp_alpha,
            global_affine_type="SOFTPLUS",
            permute_soft=permute_soft,
        )
    return coder


@dataclass(frozen=True)
class FlowOptions:
    """Size of the per-level conditional flow (one typed object for the torch models).

    Args:
        coupling_blocks (int): ``AllInOneBlock`` layers per level (paper: 8, official code: 10). Defaults to ``8``.
        condition_dim (int | None): length of the positional code (multiple of 4). Defaults to ``None``: the
            model's own (ResAD 128, CGAD 16), so ``FlowOptions(coupling_blocks=4)`` changes the blocks only.

    Example:
        >>> FlowOptions(coupling_blocks=4).resolved(16)
        FlowOptions(coupling_blocks=4, condition_dim=16)
    """

    coupling_blocks: int = 8
    condition_dim: int | None = None

    def resolved(self, condition_dim: int) -> FlowOptions:
        """These options with the model's default ``condition_dim`` where none is given."""
        return self if self.condition_dim is not None else replace(self, condition_dim=condition_dim)


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
            coupling_flow(c, coupling_blocks, condition_dim, clamp_alpha, permute_soft) for c in self.channels
        )
        # the modules whose weights a FoldedLevel is made of (blocks incl. w_perm, subnet layers), walked per call
        self._weighted = [
            [module for block in flow.module_list for module in (block, block.subnet[0], block.subnet[2])]
            for flow in self.flows
        ]
        self._folded: dict[int, tuple[tuple, FoldedLevel]] = {}
        self._grids: dict[tuple, torch.Tensor] = {}

    def folded(self, level: int, grid: torch.Tensor) -> FoldedLevel:
        """The level's blocks as a :class:`FoldedLevel` on ``grid`` (kept in eval mode until a weight changes)."""
        tensors = [tensor for module in self._weighted[level] for tensor in module._parameters.values()]
        # identities and versions of every weight; one tensor's device and dtype stand for the module's (.to())
        key = (tuple(map(id, tensors)), tuple([tensor._version for tensor in tensors]), tensors[0].device)
        key = (*key, tensors[0].dtype, tuple(grid.shape), grid.dtype)
        cached = self._folded.get(level)
        if cached is not None and cached[0] == key:
            return cached[1]
        folded = fold_level(self.flows[level].module_list, grid)
        if _cacheable(self):
            self._folded[level] = (key, folded)  # built without grad: holds no autograd graph
        return folded

    def grid_code(self, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """``(H·W, condition_dim)`` codes of one grid (kept in eval mode: they depend on the size only)."""
        key = (height, width, like.dtype, like.device)
        if key in self._grids:
            return self._grids[key]
        grid = self.position_code(1, height, width, like)
        if _cacheable(self):
            self._grids[key] = grid
        return grid

    def position_code(self, batch: int, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """``(B·H·W, condition_dim)`` positional code rows in the order of :func:`flatten_patches`."""
        code = positional_encoding_2d(self.condition_dim, height, width).to(like)
        return flatten_patches(code.unsqueeze(0).expand(batch, -1, -1, -1))

    def rows(self, level: int, rows: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row ``logp̄`` and ``mean_c(z)`` for flattened rows ``(N, C)`` with their codes ``(N, D)``."""
        return _per_row(*self.flows[level](rows, [condition]))

    def forward(
        self, level: int, feature: torch.Tensor, latent_mean: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``logp̄`` and ``mean_c(z)`` maps ``(B, H, W)`` of level ``level``.

        ``latent_mean`` ``(C,)``: the base distribution's mean, ``N(latent_mean, I)`` instead of ``N(0, I)`` (a
        class's own latent centre, CGAD's ``latent_centre`` adaptation); ``mean_c(z)`` is of the shifted ``z``.
        """
        batch, _, height, width = feature.shape
        z, log_jac_det = self.latents(level, feature)
        if latent_mean is not None:
            z = z - latent_mean
        logp, zmean = _per_row(z, log_jac_det)
        return logp.reshape(batch, height, width), zmean.reshape(batch, height, width)

    def latents(self, level: int, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The flow's output rows ``z`` ``(B·H·W, C)`` (:func:`flatten_patches` order) and their ``log|det J|``.

        The rows are ``B`` whole grids, so the subnets take their per-position path (:class:`PositionalSubnet`):
        the blocks get an empty condition and each subnet adds the cached share of the grid's codes.
        """
        rows = flatten_patches(feature)
        grid = self.grid_code(feature.shape[2], feature.shape[3], feature)
        if not self.training:
            return self._folded_latents(level, rows, grid)
        subnets = [block.subnet for block in self.flows[level].module_list]
        for subnet in subnets:
            subnet.grid = grid
        try:
            return self.flows[level](rows, [rows.new_empty(rows.shape[0], 0)])
        finally:
            for subnet in subnets:
                subnet.grid = None

    def _folded_latents(self, level: int, rows: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode ``(z, log|det J|)`` of ``B`` whole grids through the level's :class:`FoldedLevel`."""
        folded = self.folded(level, grid)
        scale_sum = rows.new_zeros(())
        for index, weights in enumerate(folded.blocks):
            passive, active = rows[:, : weights.passive], rows[:, weights.passive :]
            if index == 0:
                active = active * folded.input_scale
            hidden = torch.relu(_add_position(passive, weights.first, weights.position))
            coefficients = torch.addmm(weights.coefficients_bias, hidden, weights.coefficients)
            split = active.shape[1]
            gate = torch.sigmoid(coefficients[:, :split])  # c·tanh(a_s) = 2c·gate − c
            scale_sum = scale_sum + gate
            active = torch.addcmul(coefficients[:, split:], active, torch.exp(gate * folded.twice_clamp))
            rows = torch.addmm(
                torch.addmm(weights.offset, passive, weights.rotate_passive), active, weights.rotate_active
            )
        return rows, scale_sum.sum(dim=1) * folded.twice_clamp + folded.log_det_offset


def _per_row(z: torch.Tensor, log_jac_det: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``logp̄`` (per-dimension log-likelihood) and ``mean_c(z)`` of each row of the flow's output ``z``."""
    channels = z.shape[1]
    return get_logp(channels, z, log_jac_det) / channels, z.mean(dim=1)


def chunks(num_rows: int, chunk_size: int, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Shuffled row indices in chunks of at most ``chunk_size``; the remainder forms the last chunk.

    (ResAD's released code floors the division and drops the remainder, which left its coarsest flow level
    untrained for WideResNet50, whose coarsest level has fewer positions than one chunk.)
    """
    order = torch.randperm(num_rows, generator=generator)
    yield from order.split(chunk_size)
