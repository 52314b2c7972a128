"""Reference resolution: which k normal images of a class the model's bank holds, at each stage.

:class:`ReferenceMixin` sets the torch model's reference bank before validating, testing or predicting a
class, from k normal images of *that* class. The images come from, in order:

- ``few_shot_source`` (a folder or list of image files), when given;
- the datamodule's ``reference_images(stage, index)`` (the cross-class datamodule: its batches hold one class
  each and ``class_index(stage, path)`` names it; the bank switches when the class changes);
- otherwise the first ``k_shot`` normal images of the datamodule's training set (plain anomalib usage:
  ``--data MVTecAD --data.category <unseen class>``, whose train split is that class's normal images);
- with no datamodule at all (``anomalib predict --data <folder>``), the bank stored in the checkpoint,
  except for a checkpoint of several training classes: its bank is one training class's, so scoring a new
  product against it is refused unless ``few_shot_source="checkpoint"`` asks for it.

References are collected in ``on_*_start`` and the step hooks, never in ``setup()``: Lightning restores a
checkpoint after ``setup()``, which would silently replace the new class's bank.

Setting the references also computes the class's leave-one-out ``(location, scale)`` for the normal-only
operating point (:mod:`anomalib_cgad.components.operating_point`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from anomalib_cgad.components.operating_point import OperatingPoint, encode, leave_one_out_statistics
from anomalib_cgad.components.reference_bank import load_model_bank, save_model_bank
from anomalib_cgad.data.images import (
    NonFiniteError,
    ReferenceError,
    list_images,
    load_images,
    reference_tensor,
    reread_wide_images,
)

logger = logging.getLogger(__name__)

DEFAULT_K_SHOT = 4  # references per class when neither the model nor a datamodule says
USE_CHECKPOINT_BANK = "checkpoint"  # few_shot_source value: score against the bank stored in the checkpoint

__all__ = ["DEFAULT_K_SHOT", "USE_CHECKPOINT_BANK", "ReferenceError", "ReferenceHost", "ReferenceMixin"]


@runtime_checkable
class ReferenceHost(Protocol):
    """What :class:`ReferenceMixin` needs from the class it is mixed into (an ``AnomalibModule``).

    The anomalib-cgad models set the first four in ``__init__``; ``device``, ``trainer``, ``_trainer``,
    ``hparams`` and ``pre_processor`` come from Lightning and anomalib; the two checkpoint-bank methods from
    :class:`~anomalib_cgad.models.checkpoints.CheckpointMixin`.
    """

    k_shot: int
    few_shot_source: Any  # a folder, a list of files, ``USE_CHECKPOINT_BANK`` or ``None``
    model: torch.nn.Module  # the torch model: ``set_reference(images)`` and a ``bank`` with ``is_set``
    operating_point: OperatingPoint
    pre_processor: torch.nn.Module
    device: torch.device

    def _holds_checkpoint_bank(self) -> bool: ...

    def _check_checkpoint_bank_use(self) -> None: ...


class ReferenceMixin:
    """Sets the reference bank of each class from the sources in the module docstring (host: :class:`ReferenceHost`).

    The host calls :meth:`_init_reference_state` in ``__init__`` and :meth:`_forget_bank` at the start of
    every validation, test and prediction; each step calls :meth:`_ensure_bank` with its class's index.
    """

    def _init_reference_state(self) -> None:
        # The (stage, class index) whose references the bank holds; None: set it at the next batch.
        self._bank_key: tuple[str, int] | None = None

    def _forget_bank(self) -> None:
        """Make the next batch set the references of its class (a new stage may hold other classes)."""
        self._bank_key = None

    def reference_image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the pre-processor's ``Resize`` (256² without one): the size references are loaded at.

        (Not ``_input_size``: ``AnomalibModule.__init__`` sets an attribute of that name to ``None``.)
        """
        for transform in getattr(self.pre_processor.transform, "transforms", []):
            size = getattr(transform, "size", None)
            if size is not None:
                return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])
        return (256, 256)

    def _reference_images(self, stage: str, dataloader_idx: int) -> torch.Tensor | None:
        if self.few_shot_source == USE_CHECKPOINT_BANK:
            return None
        if self.few_shot_source:
            paths = list_images(self.few_shot_source)
            if len(paths) < self.k_shot:
                msg = f"few_shot_source '{self.few_shot_source}' has {len(paths)} images; k_shot={self.k_shot}."
                raise ReferenceError(msg)
            return load_images(paths[: self.k_shot], self.reference_image_size())
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return None
        if hasattr(datamodule, "reference_images"):
            return datamodule.reference_images(stage, dataloader_idx)
        train_data = getattr(datamodule, "train_data", None)
        if train_data is None:
            return None
        normal = [i for i, label in enumerate(train_data.samples.label_index.tolist()) if int(label) == 0]
        if len(normal) < self.k_shot:
            msg = f"The training set has {len(normal)} normal images; k_shot={self.k_shot} references requested."
            raise ReferenceError(msg)
        paths = [str(train_data.samples.image_path.iloc[i]) for i in normal[: self.k_shot]]
        return reread_wide_images(torch.stack([train_data[i].image for i in normal[: self.k_shot]]), paths)

    def set_references(self, images) -> None:
        """Normalise un-normalised reference images and store them as the bank.

        Args:
            images: ``(k, 3, H, W)`` float tensor/array in [0, 1] or uint8 (scaled by 1/255), a list of
                ``(3, H, W)`` images, a folder or a list of image files (see :func:`reference_tensor`).

        Raises:
            ReferenceError: no images or a wrong shape.
            ImageInputError: float values outside [0, 1] (e.g. 0..255 images not divided by 255).
            NonFiniteError: NaN or inf pixel values.
        """
        images = reference_tensor(images, self.reference_image_size())
        bad = (~torch.isfinite(images)).flatten(1).any(1).nonzero().flatten().tolist()
        if bad:
            msg = f"Reference images {bad} (of {len(images)}) contain NaN or inf pixel values."
            raise NonFiniteError(msg)
        images = images.to(self.device)
        transform = self.pre_processor.transform
        with torch.no_grad():
            # Each reference crosses the frozen backbone once, for the bank and for the leave-one-out pass.
            features = encode(self.model, images, transform)
            self.model.set_reference(transform(images), features)
            was_training = self.model.training
            self.model.eval()
            try:
                stats = leave_one_out_statistics(self.model, images, transform, features)
            finally:
                self.model.train(was_training)
        self.operating_point.reference_stats = stats.to(self.device)

    def save_bank(self, path: str | Path, overwrite: bool = False) -> Path:
        """Save the bank the model holds (tensors, metadata, operating point) as the plugin's ``.npz`` bank file.

        The same file ``anomalib-cgad bank`` writes and :class:`~anomalib_cgad.deploy.BankInferencer` reads.

        Raises:
            BankError: the model holds no bank yet.
            FileExistsError: ``path`` exists and ``overwrite`` is ``False``.
            ValueError: ``path`` does not end with ``.npz``.
        """
        return save_model_bank(self, path, overwrite=overwrite)

    def load_bank(self, path: str | Path) -> None:
        """Make a ``.npz`` bank file (from :meth:`save_bank`, ``anomalib-cgad bank`` or the deployment) the bank.

        Raises:
            BankError: not a bank file, or one built for other weights, backbone, layers or image size.
        """
        load_model_bank(self, path)

    def _ensure_bank(self, stage: str, dataloader_idx: int) -> None:
        key = (stage, dataloader_idx)
        if self._bank_key == key:
            return
        images = self._reference_images(stage, dataloader_idx)
        if images is not None:
            self.set_references(images)
        elif not self.model.bank.is_set:
            msg = (
                "No reference images: give the model k normal images of the class via few_shot_source, a "
                "datamodule with a training split, or a checkpoint that holds a bank."
            )
            raise ReferenceError(msg)
        elif self.few_shot_source != USE_CHECKPOINT_BANK and self._holds_checkpoint_bank():
            self._check_checkpoint_bank_use()
        self._bank_key = key

    def _check_k_shot_agrees(self) -> None:
        """Use the datamodule's k_shot when the model was given none; refuse two different explicit values.

        A datamodule that draws its own references (``CrossClass``) would otherwise silently win over
        ``--model.k_shot``. The adopted value is written into ``hparams`` so the checkpoint carries it.
        """
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_k = getattr(datamodule, "k_shot", None)
        if self.few_shot_source or data_k is None or not hasattr(datamodule, "reference_images"):
            return
        if data_k == self.k_shot:
            return
        if getattr(self, "_k_shot_given", True):
            msg = (
                f"The model's k_shot={self.k_shot} and the datamodule's k_shot={data_k} disagree: set both to "
                f"the same value (--model.k_shot {data_k} --data.k_shot {data_k}) or leave --model.k_shot unset."
            )
            raise ValueError(msg)
        self.k_shot = data_k
        if "k_shot" in self.hparams:
            self.hparams["k_shot"] = data_k
