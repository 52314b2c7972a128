"""k-shot reference bank and nearest-neighbour residual features (one place for all three models).

For each feature level ``l`` the bank holds every patch feature of the k normal reference images of one
class, flattened to ``(k·H_l·W_l, C_l)``. A query patch ``x`` is matched to its nearest reference patch
``x*`` (``matching``: L2 as in the ResAD paper, or cosine as in its released code) and replaced by the
residual ``r = x − x*`` (``residual="diff"``) or ``(x − x*)²`` (``"sq_diff"``).

Steps of :func:`residual_features`:

1. flatten the query map to ``(B·H·W, C)``;
2. distances to all bank rows as ``‖x‖² − 2x·yᵀ + ‖y‖²`` (or ``−x̂·ŷᵀ``): a single matmul, no
   ``torch.cdist`` and no data-dependent branch, so the graph exports to ONNX/OpenVINO with the bank as an
   input of dynamic row count;
3. gather the nearest rows, form the residual, reshape back to ``(B, C, H, W)``.

The bank is a set of ``DynamicBufferMixin`` buffers, so a checkpoint restores a bank of any size.

Example:
    >>> import torch
    >>> from anomalib_cgad.components.reference_bank import ReferenceBank, residual_features
    >>> bank = ReferenceBank(num_levels=1)
    >>> refs = [torch.rand(2, 8, 4, 4)]
    >>> bank.set(refs)
    >>> bank.tensors()[0].shape
    torch.Size([32, 8])
    >>> residual_features(refs, bank.tensors())[0].abs().max() < 1e-3
    tensor(True)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from anomalib.models.components.base import DynamicBufferMixin
from torch import nn

from anomalib_cgad.components.tracing import is_tracing
from anomalib_cgad.coreset import check_coreset_fraction, coreset_indices
from anomalib_cgad.deploy.inferencer import BANK_FORMAT, Bank
from anomalib_cgad.errors import BankError
from anomalib_cgad.validation import check_choice

if TYPE_CHECKING:
    from anomalib.models.components import AnomalibModule

MATCHING = ("l2", "cosine")
RESIDUAL = ("diff", "sq_diff")


# The plugin has one bank error; this name stays for code (and tests) written against the torch bank.
BankMismatchError = BankError


def flatten_patches(feature: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B·H·W, C)`` in (b, h, w) order."""
    return feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1])


BLOCK = 64  # reference patches per block of the two-stage search in best_index


def _first_max(score: torch.Tensor) -> torch.Tensor:
    """``argmax`` written as ``ReduceMax`` → ``Equal`` → ``Where`` → ``ReduceMin`` (for export graphs).

    No Python number is made from the row count: ``float(count)`` would freeze the bank's dynamic row count
    into the graph, and a bank of other k (or a coreset) would then be rejected by the exported model.
    """
    best = score.amax(dim=-1, keepdim=True)
    position = torch.arange(score.shape[-1], device=score.device, dtype=score.dtype)
    return torch.where(score == best, position, float("inf")).amin(dim=-1).long()


def best_index(score: torch.Tensor, aligned: bool = False) -> torch.Tensor:
    """Index of the largest ``score`` along the last axis (the first one on ties), ``argmax``'s result.

    With at least ``8 · BLOCK`` candidates, in two stages: the maximum of each block of ``BLOCK`` candidates
    (``amax`` is vectorised), the first block holding the overall maximum, then the first maximum inside that
    block. Only the block maxima pass over the whole ``N × M`` score matrix.

    - Eager torch: the stages use ``argmax`` on the small tensors. torch's CPU ``argmax`` is not vectorised:
      over 400 queries × 1,600 reference patches it took 0.56 ms against 0.03 ms for ``amax``; the two stages
      take 0.16 ms (1,024 × 4,096: 3.6 → 0.9 ms).
    - Exporting to ONNX: the stages use :func:`_first_max` (``argmax`` becomes OpenVINO's ``TopK``, which took
      19 of the 47 ms of a 256 px CGAD forward on one CPU thread). Only with ``aligned=True``; otherwise one
      :func:`_first_max` over all candidates (a padding computed from a product of dynamic sizes, as in
      CGAD's bank encoder, broke ``torch.export``'s shape solver).

    ``aligned=True`` promises a candidate count that is a multiple of ``BLOCK`` (:func:`nearest_reference` pads
    the bank, not the ``N × M`` scores, while exporting: an OpenVINO ``Pad`` of the scores copied the whole
    matrix, 2.1 of 26 ms at 256 px). tests/unit/test_reference_bank.py checks that every form gives ``argmax``'s
    index, ties included.
    """
    if torch.onnx.is_in_onnx_export():  # unaligned: e.g. CGAD's leave-one-out search in the bank encoder
        return _blocked(score, _first_max) if aligned else _first_max(score)
    if is_tracing() or score.shape[-1] < 8 * BLOCK:  # tracing first: no guard on a dynamic size
        return score.argmax(dim=-1)
    if score.shape[-1] % BLOCK:  # -inf candidates complete the last block and are never the maximum
        score = F.pad(score, (0, -score.shape[-1] % BLOCK), value=float("-inf"))
    return _blocked(score, lambda values: values.argmax(dim=-1))


def _blocked(score: torch.Tensor, first_max: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """:func:`best_index`'s two stages on a candidate count that is a multiple of ``BLOCK``."""
    blocks = score.unflatten(-1, (-1, BLOCK))
    block = first_max(blocks.amax(dim=-1)).unsqueeze(-1)
    inside = first_max(torch.gather(blocks, -2, block.unsqueeze(-1).expand(*block.shape, BLOCK)).squeeze(-2))
    return block.squeeze(-1) * BLOCK + inside


def nearest_reference(queries: torch.Tensor, bank: torch.Tensor, matching: str = "l2") -> torch.Tensor:
    """Return, for each query row, the nearest bank row.

    Works for one bank shared by all queries (``(N, C)`` vs ``(M, C)``) and for one bank per sample
    (``(B, N, C)`` vs ``(B, M, C)``): a batched matmul, an ``argmin``/``argmax`` and a ``gather``.

    Args:
        queries (torch.Tensor): ``(..., N, C)`` query patches.
        bank (torch.Tensor): ``(..., M, C)`` reference patches.
        matching (str): ``"l2"`` or ``"cosine"``.

    Returns:
        torch.Tensor: ``(..., N, C)`` nearest reference rows (un-normalised, as stored).

    Example:
        >>> bank = torch.tensor([[10.0, 0.0], [0.0, 1.0]])
        >>> nearest_reference(torch.tensor([[1.0, 0.1]]), bank, "cosine")
        tensor([[10.,  0.]])
    """
    aligned = torch.onnx.is_in_onnx_export()
    if aligned:  # copies of row 0 fill the last block: they tie with row 0 and the first index wins
        padding = (BLOCK - bank.shape[-2] % BLOCK) % BLOCK
        bank = torch.cat([bank, bank[..., :1, :].expand(*bank.shape[:-2], padding, bank.shape[-1])], dim=-2)
    if matching == "cosine":
        similarity = F.normalize(queries, dim=-1) @ F.normalize(bank, dim=-1).transpose(-1, -2)
        index = best_index(similarity, aligned)
    else:
        distance = (
            (queries**2).sum(-1, keepdim=True) - 2 * queries @ bank.transpose(-1, -2) + (bank**2).sum(-1).unsqueeze(-2)
        )
        index = best_index(-distance, aligned)
    return torch.gather(bank, -2, index.unsqueeze(-1).expand(*index.shape, bank.shape[-1]))


def _level_residuals(feature: torch.Tensor, refs: torch.Tensor, matching: str, residual: str) -> torch.Tensor:
    """Residual map ``(B, C, H, W)`` of one level against one bank ``(M, C)`` or one per sample ``(B, M, C)``."""
    batch, channels, height, width = feature.shape
    patches = feature.permute(0, 2, 3, 1)
    queries = patches.reshape(-1, channels) if refs.ndim == 2 else patches.reshape(batch, height * width, channels)
    diff = queries - nearest_reference(queries, refs.to(queries.dtype), matching)
    diff = diff * diff if residual == "sq_diff" else diff
    return diff.reshape(batch, height, width, channels).permute(0, 3, 1, 2)


def residual_features(
    features: Sequence[torch.Tensor],
    bank: Sequence[torch.Tensor],
    matching: str = "l2",
    residual: str = "diff",
) -> list[torch.Tensor]:
    """Residuals of every query patch against its nearest reference patch, per level.

    Args:
        features (Sequence[torch.Tensor]): per level ``(B, C_l, H_l, W_l)``.
        bank (Sequence[torch.Tensor]): per level either ``(M_l, C_l)``, the reference patches of the class that
            every sample is matched against, or ``(B, M_l, C_l)``, each sample's *own* reference patches
            (training, where every query has references of its class).
        matching (str): ``"l2"`` or ``"cosine"``. Defaults to ``"l2"``.
        residual (str): ``"diff"`` (signed) or ``"sq_diff"`` (element-wise square). Defaults to ``"diff"``.

    Returns:
        list[torch.Tensor]: per level ``(B, C_l, H_l, W_l)`` residual maps.

    Example:
        >>> feats = [torch.rand(2, 8, 4, 4)]
        >>> own = [flatten_patches(feats[0]).reshape(2, 16, 8)]  # each sample is its own reference
        >>> residual_features(feats, own)[0].abs().max() < 1e-3
        tensor(True)
    """
    return [_level_residuals(feature, refs, matching, residual) for feature, refs in zip(features, bank, strict=True)]


@dataclass(frozen=True)
class BankOptions:
    """How a model's bank compares a query patch with the references (one typed object for the torch models).

    Args:
        matching (str): nearest-reference metric, ``"l2"`` (the ResAD paper) or ``"cosine"`` (its released
            code). Defaults to ``"cosine"``.
        residual (str): ``"diff"`` (signed) or ``"sq_diff"`` (element-wise square). Defaults to ``"sq_diff"``.
        coreset (float): share of each level's reference patches the bank keeps (greedy k-center coreset); the
            nearest-reference search costs that share of the exact one. Defaults to ``1.0`` (exact).

    Example:
        >>> BankOptions(matching="l2").residual
        'sq_diff'
    """

    matching: str = "cosine"
    residual: str = "sq_diff"
    coreset: float = 1.0

    def __post_init__(self) -> None:
        check_choice("matching", self.matching, MATCHING)
        check_choice("residual", self.residual, RESIDUAL)
        check_coreset_fraction(self.coreset)


class ReferenceBank(DynamicBufferMixin, nn.Module):
    """Per-level reference patches of one class, stored as resizable buffers.

    Args:
        num_levels (int): number of feature levels.
        matching (str): ``"l2"`` or ``"cosine"``. Defaults to ``"l2"``.
        residual (str): ``"diff"`` or ``"sq_diff"``. Defaults to ``"diff"``.
        coreset (float): share of the reference patches :meth:`build` keeps per level, a greedy k-center
            coreset (:func:`~anomalib_cgad.coreset.coreset_indices`); ``1`` keeps all (exact search).
            Defaults to ``1.0``.

    Attributes:
        bank_<l> (torch.Tensor): ``(M_l, C_l)`` reference patches of level ``l``, ``M_l = k·H_l·W_l`` without a
            coreset (empty until set).
    """

    def __init__(self, num_levels: int, matching: str = "l2", residual: str = "diff", coreset: float = 1.0) -> None:
        super().__init__()
        BankOptions(matching, residual, coreset)  # the one check of these three settings
        self.num_levels = num_levels
        self.matching = matching
        self.residual = residual
        self.coreset = float(coreset)
        for level in range(num_levels):
            self.register_buffer(f"bank_{level}", torch.empty(0))
        self.register_buffer("num_refs", torch.tensor(0))

    def tensors(self) -> list[torch.Tensor]:
        """The current bank, one ``(M_l, C_l)`` tensor per level."""
        return [getattr(self, f"bank_{level}") for level in range(self.num_levels)]

    @property
    def is_set(self) -> bool:
        """Whether references have been stored."""
        return all(t.numel() > 0 for t in self.tensors())

    def build(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Flatten per-level reference feature maps ``(k, C, H, W)`` into bank rows ``(k·H·W, C)``.

        With ``coreset < 1`` only the coreset rows of each level are kept. Not while exporting: the exported
        bank encoder returns every row and :class:`~anomalib_cgad.deploy.inferencer.BankInferencer` selects the
        same coreset with the same function (the greedy loop is data-dependent, not a graph).
        """
        levels = [flatten_patches(feature) for feature in features]
        if self.coreset >= 1.0 or is_tracing():
            return levels
        cosine = self.matching == "cosine"
        kept = [coreset_indices(rows.detach().float().cpu().numpy(), self.coreset, cosine) for rows in levels]
        return [rows[torch.from_numpy(index).to(rows.device)] for rows, index in zip(levels, kept, strict=True)]

    def set(self, features: Sequence[torch.Tensor]) -> None:
        """Store the references given as per-level feature maps ``(k, C_l, H_l, W_l)``."""
        self.set_tensors(self.build(features), num_refs=features[0].shape[0])

    def set_tensors(self, bank: Sequence[torch.Tensor], num_refs: int | None = None) -> None:
        """Store an already flattened bank (one ``(M_l, C_l)`` tensor per level)."""
        if len(bank) != self.num_levels:
            msg = f"A bank needs {self.num_levels} levels, got {len(bank)}."
            raise BankError(msg)
        for level, tensor in enumerate(bank):
            if not torch.isfinite(tensor).all():
                msg = f"Reference features of level {level} contain NaN or inf values."
                raise BankError(msg)
            setattr(self, f"bank_{level}", tensor.detach().clone())
        if num_refs is not None:
            self.num_refs = torch.tensor(int(num_refs))

    def residuals(self, features: Sequence[torch.Tensor], bank: Sequence[torch.Tensor] | None = None) -> list:
        """Residual maps of ``features`` against ``bank`` (default: the stored one)."""
        bank = self.tensors() if bank is None else bank
        return residual_features(features, bank, self.matching, self.residual)


# ----------------------------------------------------------------------------------------------- bank files
# A model's bank leaves and enters torch as a ``Bank`` (arrays + metadata + operating point), the ``.npz``
# file that the torch-free deployment reads and writes (``deploy/inferencer.py``). These functions are the
# only bridge between that file and the buffers above, for every model.


def model_fingerprint(module: AnomalibModule) -> str:
    """Hash of the torch model's weights, bank excluded: a bank is only valid for the weights that built it.

    (CGAD's bank holds the references' score under the trained flow, so it is checkpoint-specific.)
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.model.state_dict().items()):
        if module.model.is_bank_state(name):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def module_image_size(module: AnomalibModule) -> list[int]:
    """The input size ``module``'s references are read at (anomalib's default 256 × 256 without a pre-processor)."""
    if hasattr(module, "reference_image_size"):
        return [int(v) for v in module.reference_image_size()]
    return [256, 256]


def bank_metadata(module: AnomalibModule) -> dict:
    """What a bank of ``module`` records and must match (model, weights fingerprint, backbone, image size)."""
    return {
        "format": BANK_FORMAT,
        "model": type(module.model).__name__,
        "fingerprint": model_fingerprint(module),
        "image_size": module_image_size(module),
        **{key: value for key, value in module.model.bank_metadata().items()},
    }


def model_bank(module: AnomalibModule) -> Bank:
    """The bank ``module`` currently holds, as a :class:`Bank` (arrays + metadata).

    Raises:
        BankError: the model holds no bank yet.
    """
    tensors = [tensor.detach().cpu().float() for tensor in module.model.bank_tensors()]
    if not tensors or any(tensor.numel() == 0 for tensor in tensors):
        msg = "The model holds no reference bank: call set_references(images) or validate/test it on a class first."
        raise BankError(msg)
    num_refs = int(getattr(module.model.bank, "num_refs", torch.tensor(0)))
    stats = module.operating_point.reference_stats.detach().cpu().float().numpy()
    return Bank([t.numpy() for t in tensors], {**bank_metadata(module), "num_refs": num_refs}, stats)


def save_model_bank(module: AnomalibModule, path: str | Path, overwrite: bool = False) -> Path:
    """Save the bank ``module`` holds as ``.npz``, the file :class:`BankInferencer` and :func:`load_model_bank` read.

    Example:
        >>> model.set_references(reference_images)  # doctest: +SKIP
        >>> save_model_bank(model, "banks/bottle.npz")  # doctest: +SKIP
    """
    return model_bank(module).save(path, overwrite=overwrite)


def set_model_bank(module: AnomalibModule, bank: Bank | Sequence[np.ndarray | torch.Tensor]) -> None:
    """Make ``bank`` (a :class:`Bank` or tensors in :meth:`bank_tensors` order) the torch model's bank.

    Raises:
        BankError: wrong number of tensors, wrong channels, or (for a :class:`Bank`) built for other weights.
    """
    if isinstance(bank, Bank):
        bank.check(bank_metadata(module))
        tensors = bank.tensors
    else:  # bare tensors carry no operating point: recompute it with set_references(images) or use a Bank
        tensors = list(bank)
    torch_model = module.model
    current = torch_model.bank_tensors()
    if len(tensors) != len(current):
        msg = f"The bank has {len(tensors)} tensors; {type(module).__name__} takes {len(current)}."
        raise BankError(msg)
    device = next(module.parameters()).device
    tensors = [torch.as_tensor(np.asarray(t) if not isinstance(t, torch.Tensor) else t).float() for t in tensors]
    num_levels = torch_model.bank.num_levels
    levels = tensors[:num_levels]
    for level, (tensor, reference) in enumerate(zip(levels, current, strict=False)):
        if tensor.ndim != 2 or (reference.ndim == 2 and tensor.shape[1] != reference.shape[1]):
            msg = f"bank level {level} has shape {tuple(tensor.shape)}; expected (rows, {reference.shape[-1]})."
            raise BankError(msg)
    num_refs = bank.metadata.get("num_refs") if isinstance(bank, Bank) else None
    torch_model.set_bank_tensors([t.to(device) for t in tensors], num_refs=num_refs)
    if isinstance(bank, Bank):
        module.operating_point.reference_stats = torch.as_tensor(bank.reference_stats).float().reshape(2).to(device)


def load_model_bank(module: AnomalibModule, path: str | Path) -> Bank:
    """Load a ``.npz`` bank (written by :func:`save_model_bank` or :meth:`BankInferencer.compute_bank`) into torch.

    Returns:
        Bank: the loaded bank.
    """
    bank = Bank.load(path)
    set_model_bank(module, bank)
    return bank
