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
per position instead of once per row, and in eval mode keeps it until the weights change. With ``D = 128`` and
``d = C/2 = 20`` that share is 86% of the first layer's multiply-adds, which made the flow the largest
test-time cost after the backbone (``benchmarks/deploy_speed.py``). The values are those of the plain
subnet (tests/test_flow.py compares them).

In eval mode :meth:`ConditionalFlow.forward` runs each block as a :class:`FoldedBlock` (the same function
with its constants folded into fewer, larger operations; tests/test_flow.py compares the values).

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


class PositionalSubnet(nn.Sequential):
    """CFlow's coupling subnet ``Linear(d + D, 2(d + D)) → ReLU → Linear(2(d + D), out)`` on ``[x₁, code]`` rows.

    Plain rows (any order, e.g. ResAD's shuffled training chunks) take the ordinary path. While :attr:`grid`
    holds the ``(H·W, D)`` codes of one grid, the input rows are taken to be ``B`` whole grids in (b, h, w)
    order, without code columns (:meth:`ConditionalFlow.forward` passes an empty condition), and
    ``W_c·code + b`` is computed once per position (cached in eval mode, keyed by the weights' version).

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
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def position_bias(self, grid: torch.Tensor) -> torch.Tensor:
        """``(H·W, 2(d + D))`` share of the first layer that depends only on the position."""
        first = self[0]
        key = (tuple(grid.shape), grid.device, grid.dtype, first.weight._version, first.bias._version)
        cacheable = _cacheable(self)
        if cacheable and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        bias = torch.addmm(first.bias, grid, first.weight[:, self.split :].T)
        self._cache = (key, bias) if cacheable else None
        return bias

    def forward(self, rows: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Affine coefficients ``(N, dims_out)`` of rows ``[x₁, code]`` ``(N, d + D)`` (grid: ``x₁``, ``(N, d)``)."""
        if self.grid is None:
            return super().forward(rows)
        first, activation, last = self
        if rows.shape[1] != self.split:
            msg = f"On a grid the subnet takes the {self.split} passive channels only, got {rows.shape[1]} columns."
            raise ValueError(msg)
        bias = self.position_bias(self.grid)
        hidden = (rows @ first.weight[:, : self.split].T).unflatten(0, (-1, bias.shape[0])) + bias
        return last(activation(hidden.flatten(0, 1)))


class FoldedBlock(NamedTuple):
    """One ``AllInOneBlock``'s weights rearranged for inference (:meth:`ConditionalFlow.forward` in eval mode).

    The block computes ``y = W·(s ⊙ [x₁, x₂'] + o)`` after its coupling ``x₂' = x₂·exp(c·tanh(a_s)) + a_t``
    with ``a = 0.1·subnet(x₁)``. Folded: the global scale ``s`` and offset ``o`` into the rotation ``W``
    (``W·diag(s)`` split into its passive and active columns, bias ``W·o``), ``Σ log s`` into one constant,
    and ``tanh`` written as ``tanh(t) = 2σ(2t) − 1`` (torch's CPU ``tanh`` took 21 µs where ``sigmoid`` took 4
    on a 400 × 20 block), the 0.1 and the 2 going into the subnet's last layer, split into its ``a_s`` and
    ``a_t`` rows. A block is then four matrix products and a few element-wise operations instead of about 25
    operations (the flow was dispatch-bound on small inputs).
    """

    passive: int  # channels of x₁
    first: torch.Tensor  # (d, hidden): the subnet's first layer on x₁ (the code's share comes from the subnet)
    to_scale: torch.Tensor  # (hidden, d₂): 0.2 · the last layer's a_s rows, so that c·tanh(a_s) = c·(2σ(·) − 1)
    to_scale_bias: torch.Tensor
    to_shift: torch.Tensor  # (hidden, d₂): 0.1 · the last layer's a_t rows
    to_shift_bias: torch.Tensor
    rotate_passive: torch.Tensor  # (d, C): rows of (W·diag(s))ᵀ for x₁
    rotate_active: torch.Tensor  # (d₂, C): rows for x₂'
    offset: torch.Tensor  # (C,): W·o
    log_scale: torch.Tensor  # (): Σ log s


def fold_block(block: AllInOneBlock) -> FoldedBlock:
    """The :class:`FoldedBlock` of one of :func:`coupling_flow`'s blocks."""
    passive = block.splits[0]
    active = block.splits[1]
    first, _, last = block.subnet
    scale = block.global_scale_activation(block.global_scale).reshape(-1)
    rotation = block.w_perm.reshape(block.w_perm.shape[0], -1)
    scaled = (rotation * scale).T  # (C_in, C_out)
    return FoldedBlock(
        passive=passive,
        first=first.weight[:, :passive].T,
        to_scale=0.2 * last.weight[:active].T,
        to_scale_bias=0.2 * last.bias[:active],
        to_shift=0.1 * last.weight[active:].T,
        to_shift_bias=0.1 * last.bias[active:],
        rotate_passive=scaled[:passive],
        rotate_active=scaled[passive:],
        offset=rotation @ block.global_offset.reshape(-1),
        log_scale=torch.log(scale).sum(),
    )


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
        self._folded: dict[int, tuple[tuple, list[FoldedBlock]]] = {}
        self._grids: dict[tuple, torch.Tensor] = {}

    def folded(self, level: int) -> list[FoldedBlock]:
        """The level's blocks as :class:`FoldedBlock` (kept in eval mode until a weight changes)."""
        blocks = self.flows[level].module_list
        modules = [module for block in blocks for module in (block, block.subnet[0], block.subnet[2])]
        tensors = [tensor for module in modules for tensor in module._parameters.values()]  # w_perm included
        key = tuple((id(tensor), tensor.device, tensor.dtype, tensor._version) for tensor in tensors)
        cached = self._folded.get(level)
        if cached is not None and cached[0] == key:
            return cached[1]
        folded = [fold_block(block) for block in blocks]
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

    def forward(self, level: int, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``logp̄`` and ``mean_c(z)`` maps ``(B, H, W)`` of level ``level``.

        The rows are ``B`` whole grids, so the subnets take their per-position path (:class:`PositionalSubnet`):
        the blocks get an empty condition and each subnet adds the cached share of the grid's codes.
        """
        batch, _, height, width = feature.shape
        rows = flatten_patches(feature)
        grid = self.grid_code(height, width, feature)
        if not self.training:
            logp, zmean = self._folded_rows(level, rows, grid)
            return logp.reshape(batch, height, width), zmean.reshape(batch, height, width)
        subnets = [block.subnet for block in self.flows[level].module_list]
        for subnet in subnets:
            subnet.grid = grid
        try:
            logp, zmean = _per_row(*self.flows[level](rows, [rows.new_empty(rows.shape[0], 0)]))
        finally:
            for subnet in subnets:
                subnet.grid = None
        return logp.reshape(batch, height, width), zmean.reshape(batch, height, width)

    def _folded_rows(self, level: int, rows: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode pass of ``B`` whole grids through the level's :class:`FoldedBlock`s (values of the blocks)."""
        log_jac_det = rows.new_zeros(())
        for block, folded in zip(self.flows[level].module_list, self.folded(level), strict=True):
            passive, active = rows[:, : folded.passive], rows[:, folded.passive :]
            position = block.subnet.position_bias(grid)
            hidden = (passive @ folded.first).unflatten(0, (-1, position.shape[0])) + position
            hidden = block.subnet[1](hidden.flatten(0, 1))
            log_scale = torch.sigmoid(torch.addmm(folded.to_scale_bias, hidden, folded.to_scale))
            log_scale = (2 * block.clamp) * log_scale - block.clamp  # = c·tanh(a_s)
            active = torch.addcmul(torch.addmm(folded.to_shift_bias, hidden, folded.to_shift), active, log_scale.exp())
            log_jac_det = log_jac_det + log_scale.sum(dim=1) + folded.log_scale
            rows = torch.addmm(torch.addmm(folded.offset, passive, folded.rotate_passive), active, folded.rotate_active)
        return _per_row(rows, log_jac_det)


def _per_row(z: torch.Tensor, log_jac_det: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``logp̄`` (per-dimension log-likelihood) and ``mean_c(z)`` of each row of the flow's output ``z``."""
    channels = z.shape[1]
    return get_logp(channels, z, log_jac_det) / channels, z.mean(dim=1)


def chunks(num_rows: int, chunk_size: int, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Shuffled row indices in chunks of at most ``chunk_size``; the remainder forms the last chunk.

    (ResAD's released code floors the division and drops the remainder, which left its coarsest flow level
    untrained for WideResNet50; see resad.md §15.2.)
    """
    order = torch.randperm(num_rows, generator=generator)
    yield from order.split(chunk_size)
