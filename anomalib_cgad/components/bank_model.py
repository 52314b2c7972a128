"""The contract of every torch model scored against a bank of k reference images.

A model implements three feature-level steps; the image-level ``compute_bank`` and ``forward_with_bank`` (the
two graphs exported for OpenVINO) are derived from them here, once for all models:

- :meth:`BankModel.features`: the frozen representation of normalised images (the backbone's levels, or a
  model's fixed projection of them), the only part that depends on the image alone;
- :meth:`BankModel.bank_from_features`: bank tensors of the references' features;
- :meth:`BankModel.score_features`: scores and anomaly maps of query features against a bank.

Why the split: the operating point's calibration scores every held-out normal image against dozens of
reference draws, and every reference against the others (leave-one-out). With images as the unit, each image
went through the frozen backbone once per draw; with features as the unit it goes through once per calibration
(:mod:`~anomalib_cgad.components.operating_point`). The numbers are the same: the backbone is frozen and in eval
mode, so an image's features do not depend on the batch it is computed in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from anomalib.data import InferenceBatch
from torch import nn


class BankModel(nn.Module):
    """Base of the torch models that score images against k references (see the module docstring).

    Subclasses implement :meth:`features` and :meth:`score_features` (and :meth:`bank_from_features` when the
    bank holds more than the references' patches), and hold
    their reference patches in ``self.bank`` (a :class:`~anomalib_cgad.components.reference_bank.ReferenceBank`);
    a model whose bank has more than those levels (CGAD's score scale) overrides :meth:`bank_tensors`,
    :meth:`set_bank_tensors` and :meth:`is_bank_state`, so savers, loaders and exporters never special-case it.
    """

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen representation of normalised images ``(B, 3, H, W)``: one tensor ``(B, C, h, w)`` per level."""
        raise NotImplementedError

    def bank_from_features(self, features: Sequence[torch.Tensor], size: Sequence[int]) -> list[torch.Tensor]:
        """Bank tensors of the references whose :meth:`features` these are (``size``: the images' ``(H, W)``).

        By default the bank is the references' patches, one ``(k·h·w, C)`` tensor per level.
        """
        del size
        return self.bank.build(features)

    def score_features(
        self, features: Sequence[torch.Tensor], bank: Sequence[torch.Tensor], size: Sequence[int]
    ) -> InferenceBatch:
        """``pred_score (B,)`` and ``anomaly_map (B, 1, H, W)`` of query features against bank tensors."""
        raise NotImplementedError

    # ------------------------------------------------------------- the stored bank (``self.bank``, a ReferenceBank)
    def bank_tensors(self) -> list[torch.Tensor]:
        """The stored bank, in the order of :meth:`bank_from_features`."""
        return self.bank.tensors()

    def set_bank_tensors(self, tensors: Sequence[torch.Tensor], num_refs: int | None = None) -> None:
        """Store bank tensors (from :meth:`compute_bank` or a saved bank) as the current class's bank."""
        self.bank.set_tensors(list(tensors), num_refs=num_refs)

    def is_bank_state(self, name: str) -> bool:
        """Whether ``state_dict`` entry ``name`` belongs to the bank (a bank is not part of the trained weights)."""
        return name.startswith("bank.")

    @torch.no_grad()
    def set_reference(self, images: torch.Tensor, features: Sequence[torch.Tensor] | None = None) -> None:
        """Make normalised ``images`` ``(k, 3, H, W)`` the references (``features``: their :meth:`features`, when
        the caller already has them)."""
        features = self.features(images) if features is None else features
        self.set_bank_tensors(self.bank_from_features(features, images.shape[-2:]), num_refs=images.shape[0])

    # ------------------------------------------------------------- derived image-level steps
    @torch.no_grad()
    def compute_bank(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Bank tensors of normalised reference images ``(k, 3, H, W)``."""
        return self.bank_from_features(self.features(images), images.shape[-2:])

    def forward_with_bank(self, images: torch.Tensor, bank: Sequence[torch.Tensor]) -> InferenceBatch:
        """Score normalised ``images`` against an explicit bank (export-friendly: the bank is an input)."""
        return self.score_features(self.features(images), bank, images.shape[-2:])
