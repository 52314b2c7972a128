"""The one place where the models get their reference images, at training and at test time.

:class:`ReferenceMixin` is mixed into ``ResAD``, ``MetaAD`` and ``CGAD`` (each still lists
``AnomalibModule`` as a direct base, so ``get_model`` finds it). It:

1. at the start of fitting, encodes the training set once into a :class:`TrainingPool` (training
   references, episode queries, real and synthetic anomalies);
2. before validating/testing/predicting a class, sets the torch model's reference bank from k normal
   images of *that* class. The images come from, in order:

   - ``few_shot_source`` (a folder or list of image files), when given;
   - the datamodule's ``reference_images(stage, index)`` (the cross-class datamodule: its batches hold one
     class each and ``class_index(stage, path)`` names it; the bank switches when the class changes);
   - otherwise the first ``k_shot`` normal images of the datamodule's training set (plain anomalib usage:
     ``--data MVTecAD --data.category <unseen class>``, whose train split is that class's normal images);
   - with no datamodule at all (``anomalib predict --data <folder>``), the bank stored in the checkpoint,
     except for a checkpoint of several training classes: its bank is one training class's, so scoring a
     new product against it is refused unless ``few_shot_source="checkpoint"`` asks for it.

Images read by anomalib's datasets pass through the plugin's input policy (:func:`reread_wide_images`),
so 16-bit files score like their 8-bit copies everywhere; see ``README.md``, "Bad input".

References are collected in ``on_*_start`` and the step hooks, never in ``setup()``: Lightning restores a
checkpoint after ``setup()``, which would silently replace the new class's bank.

3. labels every class at its **normal-only operating point** (:mod:`anomalib_cgad.components.operating_point`):
   setting the references also computes the class's leave-one-out ``(location, scale)``; the model's ``tau``
   per requested false-alarm rate is calibrated at the start of every validation while fitting, by episodes
   on the training classes (:meth:`ReferenceMixin.calibrate_operating_point`); scores leave the model as
   ``(raw − location) / scale − tau(false_alarm_rate)`` and the post-processor's threshold is fixed at 0.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from anomalib import LearningType
from anomalib.metrics import Evaluator
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import Compose, Normalize, Resize

from anomalib_cgad.components.operating_point import (
    DEFAULT_FALSE_ALARM_RATE,
    OperatingPoint,
    OperatingPointPostProcessor,
    apply_operating_point,
    check_false_alarm_rate,
    collect_normals,
    leave_one_out_statistics,
    normalised_normal_scores,
)
from anomalib_cgad.components.training_pool import TrainingPool
from anomalib_cgad.console import quiet_frozen_backbone_warning
from anomalib_cgad.deploy.inferencer import (
    WIDE_MODES,
    ImageInputError,
    bad_images_mode,
    check_unreadable,
    image_array,
    read_image,
    unreadable_images,
)
from anomalib_cgad.distributed import prepare_ddp
from anomalib_cgad.safe_load import load_weights_only

logger = logging.getLogger(__name__)

LIGHTNING_DEFAULT_EPOCHS = 1000  # what Lightning trains when neither max_epochs nor max_steps is given
DEFAULT_K_SHOT = 4  # references per class when neither the model nor a datamodule says

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def configure_cgad_pre_processor(image_size: tuple[int, int] | None = None) -> PreProcessor:
    """Resize (``antialias=False``, identical in Lightning and in the exported graph) + ImageNet normalisation."""
    image_size = image_size or (256, 256)
    return PreProcessor(
        transform=Compose(
            [
                Resize(image_size, antialias=False),
                Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
            ]
        ),
    )


def default_evaluator() -> Evaluator:
    """anomalib's default test metrics, kept per class and averaged by :class:`PerClassEvaluator`."""
    from anomalib_cgad.metrics import PerClassEvaluator

    return PerClassEvaluator.default()


CHECKPOINT_KEY = "anomalib_cgad"
USE_CHECKPOINT_BANK = "checkpoint"  # few_shot_source value: score against the bank stored in the checkpoint
CHECKPOINT_FORMAT = 1


class ReferenceError(ValueError):
    """The k-shot references of a class cannot be obtained."""


class CheckpointMismatchError(ValueError):
    """A checkpoint holds another model, another checkpoint format, or weights of another configuration."""


class NonFiniteError(ValueError):
    """Images or features hold NaN or inf values, which would give NaN scores."""


def _plugin_version() -> str:
    from anomalib_cgad import __version__

    return __version__


def list_images(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """Image files of a folder (sorted) or an explicit list; raises if missing or empty."""
    if isinstance(source, str | Path):
        folder = Path(source)
        if not folder.exists():
            msg = f"Reference source '{folder}' does not exist."
            raise ReferenceError(msg)
        paths = (
            sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else [folder]
        )
        if not paths:
            msg = f"Reference folder '{folder}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})."
            raise ReferenceError(msg)
        return paths
    paths = [Path(p) for p in source]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        msg = f"Reference images not found: {missing}"
        raise ReferenceError(msg)
    return paths


def load_images(paths: Sequence[str | Path], size: tuple[int, int]) -> torch.Tensor:
    """Load images as RGB float ``(N, 3, H, W)`` in [0, 1], resized to ``size``, with the one input policy.

    Pixels come from :func:`anomalib_cgad.deploy.inferencer.read_image` (grayscale, RGBA, palette, 16-bit
    and any size accepted, converted as in every other entry point); the resize is torch's bilinear one
    without antialiasing, the same as the models' pre-processor ``Resize``.

    Raises:
        ReferenceError: a file cannot be read (named), or holds pixels of unknown scale.
    """
    images = []
    for path in paths:
        try:
            array = read_image(path, None)
        except ImageInputError as exc:
            cause = exc.__cause__
            msg = f"Could not read reference image '{path}': {cause}" if cause is not None else str(exc)
            raise ReferenceError(msg) from exc
        resized = F.interpolate(torch.from_numpy(array)[None], size=tuple(size), mode="bilinear", align_corners=False)
        images.append(resized[0])
    return torch.stack(images)


def is_wide_image(path: str | Path) -> bool:
    """Whether ``path`` is a 16/32-bit integer image (read from its header only; ``False`` if unreadable)."""
    try:
        with Image.open(path) as image:
            return image.mode in WIDE_MODES
    except (UnidentifiedImageError, OSError, TypeError, ValueError):
        return False


def reread_wide_images(images: torch.Tensor, paths: Sequence[str] | None, transform=None) -> torch.Tensor:
    """Replace the images anomalib's dataset reader clipped (16-bit files) by the one input policy's pixels.

    anomalib's reader is ``Image.open(path).convert("RGB")``: identical to :func:`load_images` for 8-bit
    files, but it clips 16-bit ones to white. Those rows are read again at the batch's size and, when
    ``transform`` is given (the batch is already pre-processed), passed through it, so a 16-bit copy of a
    picture gets the score of its 8-bit original in training, validation, test and ``anomalib predict``.
    Only headers are read for the other files.
    """
    rows = [i for i, path in enumerate(paths or []) if is_wide_image(path)]
    if not rows:
        return images
    fixed = load_images([paths[i] for i in rows], tuple(images.shape[-2:])).to(images.device, images.dtype)
    if transform is not None:
        fixed = transform(fixed)
    images = images.clone()
    images[rows] = fixed
    return images


def reference_tensor(images, size: tuple[int, int], k_shot: int | None = None) -> torch.Tensor:
    """Reference images given to the Python API, as float ``(k, 3, H, W)`` in [0, 1] (the one input policy).

    Accepts a ``(k, 3, H, W)`` tensor or array (uint8/uint16 are scaled; floats must lie in [0, 1]), a
    list of ``(3, H, W)`` tensors/arrays (each resized to ``size``), a folder or a list of image files.

    Raises:
        ReferenceError: no images, a wrong shape, or a list mixing files and tensors.
        ImageInputError: floats outside [0, 1] or an unsupported dtype.
    """
    if isinstance(images, str | Path):
        return load_images(list_images(images), size)
    if isinstance(images, list | tuple):
        if not images:
            msg = "No reference images given (an empty list): pass k normal images of the class."
            raise ReferenceError(msg)
        if all(isinstance(item, str | Path) for item in images):
            return load_images(list_images(list(images)), size)
        if any(isinstance(item, str | Path) for item in images):
            msg = "Reference images must be all file paths or all tensors/arrays, not a mix."
            raise ReferenceError(msg)
        items = [reference_tensor(item, size) for item in images]
        return torch.cat([F.interpolate(item, size=tuple(size), mode="bilinear", align_corners=False)
                          if tuple(item.shape[-2:]) != tuple(size) else item for item in items])  # fmt: skip
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        msg = f"Reference images must be a tensor, an array, a folder or a list of files; got {type(images).__name__}."
        raise ReferenceError(msg)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3:
        msg = f"Reference images must have shape (k, 3, H, W); got {tuple(images.shape)}."
        raise ReferenceError(msg)
    if images.shape[0] == 0 or images.numel() == 0:
        msg = f"No reference images given (shape {tuple(images.shape)}): pass k normal images of the class."
        raise ReferenceError(msg)
    if images.dtype == torch.bfloat16:
        images = images.float()
    return torch.from_numpy(image_array(images.detach().cpu().numpy(), "Reference images"))


def _check_finite(values: torch.Tensor, paths: Sequence[str] | None, problem: str) -> None:
    """Raise :class:`NonFiniteError` naming the images (paths or batch indices) whose ``values`` are not finite."""
    bad = (~torch.isfinite(values)).reshape(len(values), -1).any(1).nonzero().flatten().tolist()
    if bad:
        names = [str(paths[i]) for i in bad] if paths else [f"batch index {i}" for i in bad]
        msg = f"{len(bad)} image(s) {problem}: {names[:5]}."
        raise NonFiniteError(msg)


class ReferenceMixin:
    """Reference handling and the anomalib contract shared by the anomalib-cgad models (see module docstring).

    The contract members live here once: ``learning_type`` is ``ONE_CLASS`` (so ``Engine.train`` fits the
    models on the source classes), ``trainer_arguments`` leaves ``max_epochs`` to the user (without one, the
    model trains for its ``demo_epochs`` instead of Lightning's 1000, see :meth:`on_fit_start`), the
    post-processor is anomalib's ``PostProcessor`` and the pre-processor resizes without antialiasing.

    The host class must set ``self.k_shot``, ``self.few_shot_source`` and ``self.model`` (a torch model
    with ``set_reference(images)`` and ``backbone``), and call :meth:`_init_references` in ``__init__``.
    """

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize with ``antialias=False`` (Lightning == exported graph) and ImageNet normalisation."""
        return configure_cgad_pre_processor(image_size)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No ``max_epochs``: users choose the training length. Sanity validation is skipped.

        ``use_distributed_sampler=False``: under DDP every process runs all batches (see
        :mod:`anomalib_cgad.distributed`); with one device it changes nothing.
        """
        return {"num_sanity_val_steps": 0, "use_distributed_sampler": False}

    def on_fit_start(self) -> None:
        """Without ``max_epochs`` and ``max_steps``, train for the model's ``demo_epochs``, not for 1000 epochs.

        Lightning replaces a missing ``max_epochs`` by 1000 before any hook runs (and a model's
        ``trainer_arguments`` would override a value the user did give), so 1000 epochs with no step limit is
        read as "not set": ``anomalib train --model CGAD --data ...`` with no trainer flag then trains CGAD for
        4 epochs (ResAD 6, MetaAD 4), with a warning naming the flag to change it.
        """
        quiet_frozen_backbone_warning()  # the frozen backbone is in eval mode by design (anomalib_cgad.console)
        trainer = self.trainer
        if trainer.fit_loop.max_epochs == LIGHTNING_DEFAULT_EPOCHS and trainer.max_steps == -1:
            epochs = int(getattr(self, "demo_epochs", 1))
            logger.warning(
                "max_epochs was not set (Lightning would train %d epochs): training %s for its default %d epochs. "
                "Pass --trainer.max_epochs N (or Engine(max_epochs=N)) to choose.",
                LIGHTNING_DEFAULT_EPOCHS,
                type(self).__name__,
                epochs,
            )
            trainer.fit_loop.max_epochs = epochs

    @property
    def learning_type(self) -> LearningType:
        """``ONE_CLASS``, so that ``Engine.train`` (meta-)trains the model on the source classes."""
        return LearningType.ONE_CLASS

    def configure_post_processor(self) -> PostProcessor:
        """anomalib's post-processor with its threshold fixed at 0: the normal-only operating point of each class."""
        return OperatingPointPostProcessor()

    def _init_references(self, false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE) -> None:
        self._bank_key: tuple[str, int] | None = None
        self.training_pool: TrainingPool | None = None
        # The training classes and the bank of the checkpoint this model was loaded from (see _ensure_bank).
        self._checkpoint_classes: list[str] = []
        self._checkpoint_bank: dict[str, torch.Tensor] = {}
        self.false_alarm_rate = check_false_alarm_rate(false_alarm_rate)
        self.operating_point = OperatingPoint()

    # ----------------------------------------------------------------- operating point
    def calibrate_operating_point(self, datamodule=None, k: int | None = None, seed: int = 0) -> None:
        """Calibrate ``tau`` per requested false-alarm rate on the training classes' normal images.

        Episodes: each training class in turn plays the new product (k of its normal training images are the
        references, the others are scored and normalised by the references' leave-one-out statistics);
        the pooled normalised scores give ``tau(rate)``, their ``1 − rate`` quantile. Runs automatically at
        the start of every validation while fitting; call it yourself to recalibrate a loaded model (e.g. a
        checkpoint from before the operating point) or for another ``k``.

        Args:
            datamodule: a set-up datamodule with ``train_data`` (default: the trainer's).
            k (int | None): references per episode. Defaults to ``k_shot``.
            seed (int): seed of the reference draws. Defaults to ``0``.
        """
        datamodule = datamodule if datamodule is not None else self.trainer.datamodule
        k = int(k or self.k_shot)
        resolver = self._category_resolver(datamodule)
        normals = collect_normals(datamodule.train_data, resolver)
        device = self.device
        normals = {name: images.to(device) for name, images in normals.items()}
        was_training = self.model.training
        self.model.eval()
        try:
            pooled = normalised_normal_scores(self.model, normals, k, self.pre_processor.transform, seed=seed)
        finally:
            self.model.train(was_training)
        self.operating_point.set_calibration(pooled, k)
        logger.info(
            "Operating point of %s calibrated on %d training classes (%d normalised normal scores, k=%d): "
            "tau(%.3g) = %.3f.", type(self).__name__, len(normals), len(pooled), k, self.false_alarm_rate,
            self.operating_point.tau(self.false_alarm_rate),
        )  # fmt: skip

    def forward(self, batch: torch.Tensor, *args, **kwargs):
        """anomalib's forward (pre-processor → model → post-processor) with the operating point before the post.

        Used by anomalib's exporters (``model.xml`` freezes the current class's operating point with its bank)
        and by direct calls on image tensors.
        """
        del args, kwargs
        batch = self.pre_processor(batch) if self.pre_processor else batch
        batch = apply_operating_point(self.model(batch), self.operating_point.vector(self.false_alarm_rate))
        return self.post_processor(batch) if self.post_processor else batch

    def image_threshold(self, false_alarm_rate: float | None = None) -> float:
        """The current class's threshold on the raw image score at a requested false-alarm rate."""
        return self.operating_point.threshold(self.false_alarm_rate if false_alarm_rate is None else false_alarm_rate)

    # ----------------------------------------------------------------- training side
    def _category_resolver(self, datamodule=None):
        datamodule = datamodule if datamodule is not None else getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "category_of"):
            return datamodule.category_of
        samples = getattr(getattr(datamodule, "train_data", None), "samples", None)
        if samples is not None and "category" in samples:
            mapping = dict(zip(samples.image_path.astype(str), samples.category.astype(str), strict=True))
            return lambda path: mapping.get(str(path), "train")
        name = str(getattr(datamodule, "category", None) or "train")
        return lambda path: name

    def build_training_pool(self, synthetic_per_class: int, seed: int) -> TrainingPool:
        """Encode the datamodule's training set once (called from ``on_train_start``)."""
        datamodule = self.trainer.datamodule
        loader = datamodule.train_dataloader()
        device = self.device

        def batches():
            for batch in loader:
                batch = batch.to(device) if hasattr(batch, "to") else batch
                batch.image = reread_wide_images(batch.image, batch.image_path)  # 16-bit files: the input policy
                yield batch

        pool = TrainingPool(synthetic_per_class=synthetic_per_class, seed=seed)
        self.training_pool = pool.build(
            batches(), self.model.backbone, self.pre_processor.transform, self._category_resolver()
        )
        return self.training_pool

    # ----------------------------------------------------------------- evaluation side
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
        with torch.no_grad():
            self.model.set_reference(self.pre_processor.transform(images))
            was_training = self.model.training
            self.model.eval()
            try:
                stats = leave_one_out_statistics(self.model, images, self.pre_processor.transform)
            finally:
                self.model.train(was_training)
        self.operating_point.reference_stats = stats.to(self.device)

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

    def _holds_checkpoint_bank(self) -> bool:
        """Whether the bank is still the one loaded from the checkpoint (not set for a class since)."""
        if not self._checkpoint_bank:
            return False
        own = self.state_dict()
        return all(
            key in own and own[key].shape == value.shape and torch.equal(own[key].cpu(), value.cpu())
            for key, value in self._checkpoint_bank.items()
        )

    def _check_checkpoint_bank_use(self) -> None:
        """Refuse to score with a multi-class checkpoint's bank, which holds the references of a training class.

        A model trained on several classes ends training with the bank of whichever class it validated last;
        scoring a new product against it gives scores that look plausible and mean nothing. With one
        training class the bank is that class's, so it is used, with a warning naming the class.
        """
        classes = self._checkpoint_classes
        if len(classes) > 1:
            msg = (
                f"No references for the images to score: the checkpoint's bank holds a training class's "
                f"references (trained on {classes}). Pass few_shot_source=<folder of k normal images of this "
                f"class> (--model.few_shot_source), or few_shot_source='{USE_CHECKPOINT_BANK}' to score against "
                "the checkpoint's bank anyway."
            )
            raise ReferenceError(msg)
        logger.warning(
            "Scoring against the bank stored in the checkpoint (references of training class %s); pass "
            "few_shot_source to score a new class against its own references.",
            classes[0] if classes else "unknown",
        )

    def setup(self, stage: str) -> None:
        """Before anomalib's readers run, name (or skip) the unreadable image files; check the k-shots agree;
        prepare the model for a multi-process DDP strategy (:func:`anomalib_cgad.distributed.prepare_ddp`).

        anomalib's datasets read each file when its batch is due, and a truncated one ends the run with
        ``OSError: image file is truncated`` and no file name (in ``anomalib train``, after training, when
        the test set is read). Here, before any batch is read, every file of the stage's datasets is decoded
        once: ``anomalib predict``'s folder, and the splits of an anomalib datamodule (``CrossClass`` checks
        its own at set-up). With ``ANOMALIB_CGAD_BAD_IMAGES`` unset or ``stop`` the run stops with an error
        naming them, with ``skip`` they are left out with a warning naming them. (The dataloaders given to
        ``trainer.predict`` are only reachable through Lightning's ``predict_loop._data_source`` here; if that
        changes, the scan is skipped and the files are read as before.)
        """
        super().setup(stage)
        prepare_ddp(self)  # a multi-process DDP strategy can wrap the model (see anomalib_cgad.distributed)
        if self._trainer is not None:
            self._scan_image_files(stage)
        self._check_k_shot_agrees()

    def _scan_image_files(self, stage: str) -> None:
        mode = bad_images_mode()
        if stage == "predict":
            source = getattr(getattr(self.trainer.predict_loop, "_data_source", None), "instance", None)
            for loader in source if isinstance(source, list | tuple) else [source]:
                dataset = getattr(loader, "dataset", None)
                files = getattr(dataset, "image_filenames", None)
                if isinstance(files, list) and files:
                    bad = unreadable_images(files)
                    check_unreadable(bad, "the images to predict", mode)
                    dataset.image_filenames = [f for f in files if str(f) not in bad]
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or hasattr(datamodule, "bad_images"):
            return
        splits = {"fit": ("train_data", "val_data"), "validate": ("val_data",), "test": ("test_data",),
                  "predict": ("predict_data", "test_data")}.get(stage, ())  # fmt: skip
        for split in splits:
            data = getattr(datamodule, split, None)
            samples = getattr(data, "samples", None)
            if samples is None or "image_path" not in samples or getattr(data, "_cgad_scanned", False):
                continue
            bad = unreadable_images(list(samples.image_path))
            check_unreadable(bad, f"{datamodule.name} {split}", mode)
            if bad:
                data.samples = samples[~samples.image_path.astype(str).isin(bad)].reset_index(drop=True)
            data._cgad_scanned = True  # each dataset is decoded once per process, not at every stage

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

    def on_validation_start(self) -> None:
        """Forget the bank key; (re)calibrate the operating point on the training classes first when needed.

        Needed: while fitting (the weights changed), or when the model has no calibration for its ``k_shot``
        (a training-free model validated by ``Engine.fit``, or ``k_shot`` changed since the last one).
        """
        self._bank_key = None
        trainer = self.trainer
        datamodule = getattr(trainer, "datamodule", None)
        if trainer.sanity_checking or getattr(datamodule, "train_data", None) is None:
            return
        stale = not self.operating_point.calibrated or int(self.operating_point.calibrated_k) != int(self.k_shot)
        if trainer.state.fn == "fit" or stale:
            self.calibrate_operating_point(datamodule)

    def on_test_start(self) -> None:
        """Forget the bank key so the first test batch sets the references of its class."""
        self._bank_key = None

    def on_predict_start(self) -> None:
        """Forget the bank key so the first predict batch sets the references; version the output images."""
        self._bank_key = None
        self._version_predict_images()

    def on_predict_end(self) -> None:
        """Give the visualizer back the folder it had before predicting."""
        visualizer = getattr(self, "visualizer", None)
        if hasattr(self, "_visualizer_dir") and visualizer is not None:
            visualizer.output_dir = self._visualizer_dir
            del self._visualizer_dir

    def _version_predict_images(self) -> None:
        """Send ``anomalib predict``'s images to a new ``<results>/.../predict/v<N>`` folder.

        anomalib's visualizer writes predictions into ``<default_root_dir>/images`` (for ``anomalib predict``:
        the ``latest`` training version), replacing a test run's or an earlier prediction's images of the same
        names. Each predict run gets its own version folder instead, numbered like the demo's results; a
        folder the user gave the visualizer (``output_dir``) is left alone.
        """
        from anomalib_cgad.versioning import next_version_folder

        visualizer = getattr(self, "visualizer", None)
        if visualizer is None or self._trainer is None or not hasattr(visualizer, "output_dir"):
            return
        root = Path(self.trainer.default_root_dir)
        if visualizer.output_dir is not None and Path(visualizer.output_dir) != root / "images":
            return
        self._visualizer_dir = visualizer.output_dir
        visualizer.output_dir = next_version_folder(root / "predict")
        logger.info("Prediction images go to %s", visualizer.output_dir)

    def _evaluate(self, batch, stage: str, dataloader_idx: int):
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "class_index") and batch.image_path:
            dataloader_idx = datamodule.class_index(stage, batch.image_path[0])
        self._ensure_bank(stage, dataloader_idx)
        # anomalib's readers clipped 16-bit files to white before the pre-processor ran: re-read them.
        batch.image = reread_wide_images(batch.image, batch.image_path, self.pre_processor.transform)
        _check_finite(batch.image, batch.image_path, "contain NaN or inf pixel values")
        output = apply_operating_point(self.model(batch.image), self.operating_point.vector(self.false_alarm_rate))
        _check_finite(
            output.pred_score,
            batch.image_path,
            "got NaN or inf scores (their features or the model's weights hold NaN/inf values)",
        )
        return batch.update(**output._asdict())

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add anomalib's component configs, then a tag: plugin version, checkpoint format, model class, bank."""
        super().on_save_checkpoint(checkpoint)
        metadata = self.model.bank_metadata() if hasattr(self.model, "bank_metadata") else {}
        checkpoint[CHECKPOINT_KEY] = {
            "version": _plugin_version(),
            "format": CHECKPOINT_FORMAT,
            "model": type(self).__name__,
            "bank": {**metadata, "image_size": list(self.reference_image_size()), "k": int(self.model.bank.num_refs)},
            "classes": sorted(self.training_pool.classes) if self.training_pool else list(self._checkpoint_classes),
            "false_alarm_rate": self.false_alarm_rate,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, with a message naming the problem, a checkpoint this model cannot use.

        Called by Lightning for ``load_from_checkpoint`` and for ``anomalib test/predict --ckpt_path``.

        Raises:
            CheckpointMismatchError: a checkpoint of another model class or of another checkpoint format, or
                (untagged or tagged) weights whose names or shapes do not match this model's configuration.
        """
        tag = self._check_checkpoint_tag(checkpoint)
        state = checkpoint.get("state_dict", {})
        self._add_missing_operating_point(state)
        self._check_state_dict(state, tagged=tag is not None)
        self._checkpoint_classes = [str(c) for c in (tag or {}).get("classes", [])]
        self._checkpoint_bank = {key: value for key, value in state.items() if ".bank." in key}
        super().on_load_checkpoint(checkpoint)

    @classmethod
    def _check_checkpoint_tag(cls, checkpoint: dict[str, Any]) -> dict | None:
        """The checkpoint's anomalib-cgad tag (``None`` when untagged); raises if it names another model/format."""
        tag = checkpoint.get(CHECKPOINT_KEY)
        if not isinstance(tag, dict):
            return None
        name = cls.__name__
        if tag.get("model") != name:
            msg = (
                f"The checkpoint holds a {tag.get('model')} model, not {name}: load it with "
                f"{tag.get('model')}.load_from_checkpoint or '--model {tag.get('model')}'."
            )
            raise CheckpointMismatchError(msg)
        if tag.get("format") != CHECKPOINT_FORMAT:
            msg = (
                f"The checkpoint was written by anomalib-cgad {tag.get('version')} in checkpoint format "
                f"{tag.get('format')}; anomalib-cgad {_plugin_version()} reads format {CHECKPOINT_FORMAT}. "
                f"Use anomalib-cgad=={tag.get('version')} or retrain."
            )
            raise CheckpointMismatchError(msg)
        return tag

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, *args, **kwargs):
        """Lightning's ``load_from_checkpoint``, with a clear error for checkpoints of other models.

        The tag is checked before the model is built from the checkpoint's hyper-parameters (another model's
        hyper-parameters may not even build this one). An untagged checkpoint (another anomalib model, or one
        saved before the tag existed) is loaded when its weights match; otherwise the error names it.

        Raises:
            FileNotFoundError: no such file.
            CheckpointMismatchError: not a readable checkpoint, or see :meth:`on_load_checkpoint`.
        """
        if not isinstance(checkpoint_path, str | Path) or "://" in str(checkpoint_path):
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)  # file objects, remote URLs
        path = Path(checkpoint_path)
        checkpoint = load_weights_only(
            path,
            CheckpointMismatchError,
            missing="Checkpoint '{path}' does not exist.",
            unreadable="'{path}' cannot be read as a checkpoint with weights_only=True: {kind}: {exc}",
        )
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            msg = f"'{path}' is not a Lightning checkpoint (no 'state_dict')."
            raise CheckpointMismatchError(msg)
        tagged = cls._check_checkpoint_tag(checkpoint) is not None
        try:
            return super().load_from_checkpoint(path, *args, **kwargs)
        except CheckpointMismatchError:
            raise
        except (TypeError, ValueError, RuntimeError, KeyError) as exc:
            if tagged:
                raise
            msg = (
                f"'{path}' is not an anomalib-cgad {cls.__name__} checkpoint (it has no '{CHECKPOINT_KEY}' tag) "
                f"and building {cls.__name__} from it failed: {type(exc).__name__}: {exc}"
            )
            raise CheckpointMismatchError(msg) from exc

    def _add_missing_operating_point(self, state: dict[str, torch.Tensor]) -> None:
        """A checkpoint from before the normal-only operating point loads with a warning that says how to add one.

        Its missing buffers get the "not calibrated" values (labels then use ``tau = 0``, the threshold at the
        references' mean leave-one-out score) and its learned post-processor thresholds are replaced by 0,
        the threshold of the scores this version outputs.
        """
        missing = [key for key in self.operating_point.state_dict() if f"operating_point.{key}" not in state]
        if not missing:
            return
        for key, value in self.operating_point.state_dict().items():
            state.setdefault(f"operating_point.{key}", value.clone())
        for key in ("post_processor._image_threshold", "post_processor._pixel_threshold"):
            if key in state:
                state[key] = torch.zeros_like(state[key])
        logger.warning(
            "This %s checkpoint was saved before the normal-only operating point existed: it has no calibrated "
            "threshold, so labels use the references' mean leave-one-out score. Recalibrate it on its training "
            "classes with model.calibrate_operating_point(datamodule) (or retrain), then save it again.",
            type(self).__name__,
        )

    def _check_state_dict(self, state: dict[str, torch.Tensor], tagged: bool) -> None:
        """Compare weight names and shapes (reference-bank buffers resize, so their shapes are not compared)."""
        own = self.state_dict()
        missing = [key for key in own if key not in state]
        unexpected = [key for key in state if key not in own]
        shapes = [
            f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}"
            for key, value in own.items()
            if key in state and ".bank." not in key and tuple(state[key].shape) != tuple(value.shape)
        ]
        if not (missing or unexpected or shapes):
            return
        what = (
            f"a {type(self).__name__} checkpoint of another configuration (compare its hyper_parameters)"
            if tagged
            else f"not an anomalib-cgad {type(self).__name__} checkpoint (it has no '{CHECKPOINT_KEY}' tag)"
        )
        details = [
            f"{len(items)} {label}, e.g. {items[:3]}"
            for label, items in (("missing weights", missing), ("unexpected weights", unexpected),
                                 ("shape mismatches", shapes))
            if items
        ]  # fmt: skip
        msg = f"The checkpoint is {what}: " + "; ".join(details) + "."
        raise CheckpointMismatchError(msg)

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        """Score a validation batch against the references of its class."""
        del batch_idx
        return self._evaluate(batch, "validate", dataloader_idx)

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        """Score a test batch against the references of its (unseen) class."""
        del batch_idx
        return self._evaluate(batch, "test", dataloader_idx)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        """Score a predict batch against the references."""
        del batch_idx
        return self._evaluate(batch, "predict", dataloader_idx)
