"""The anomalib contract shared by the anomalib-cgad models, and the re-exports of its parts.

:class:`FewShotModuleMixin` is mixed into ``ResAD``, ``MetaAD`` and ``CGAD`` (each still lists
``AnomalibModule`` as a direct base, so ``get_model`` finds it). It is built from one small mixin per
concern, each in its own module with its host contract declared as a ``typing.Protocol``:

- :class:`~anomalib_cgad.models.references.ReferenceMixin` (``models/references.py``): the k references of
  each class, from ``few_shot_source``, the datamodule or the checkpoint's bank;
- :class:`~anomalib_cgad.models.calibration.OperatingPointMixin` (``models/calibration.py``): the normal-only
  operating point, its calibration on the training classes, its threshold and the ``forward`` that applies it;
- :class:`~anomalib_cgad.models.checkpoints.CheckpointMixin` (``models/checkpoints.py``): the checkpoint tag
  and the checks on load;
- the images they read go through the one input policy (:mod:`anomalib_cgad.data.images`, the torch side
  of :mod:`anomalib_cgad.deploy.inferencer`), so 16-bit files score like their 8-bit copies everywhere; see
  ``README.md``, "Bad input".

This module keeps what anomalib asks of a model: ``learning_type``, ``trainer_arguments``, the pre-processor,
the evaluator (``configure_evaluator``) and the validation/test/predict steps. Around them it

1. at the start of fitting, encodes the training set once into a :class:`TrainingPool` (training
   references, episode queries, real and synthetic anomalies);
2. before each batch, has :class:`ReferenceMixin` set the bank of the batch's class;
3. labels every class at its **normal-only operating point** (:mod:`anomalib_cgad.components.operating_point`):
   setting the references also computes the class's leave-one-out ``(location, scale)``; the model's ``tau``
   per requested false-alarm rate is calibrated at the start of every validation while fitting, by episodes
   on the training classes (:meth:`OperatingPointMixin.calibrate_operating_point`); scores leave the model as
   ``(raw − location) / scale − tau(false_alarm_rate)`` and the post-processor's threshold is fixed at 0.

Every name that used to live here (``ReferenceMixin``, ``load_images``, ``CHECKPOINT_KEY``, ...) is still
importable from this module.

Each model's constructor declares what is its own (its options groups, ResAD's ``preset``) and forwards the
rest through ``**kwargs`` to :meth:`FewShotModuleMixin.__init__`, the one declaration of the arguments every
model shares: the backbone (``backbone``, ``layers``, ``backbone_weights``), the references (``k_shot``,
``few_shot_source``), the operating point (``false_alarm_rate``), ``seed`` and anomalib's four components.
jsonargparse follows that forwarding, so ``--model.backbone`` and ``--help`` work as for the model's own
arguments; :func:`~anomalib_cgad.models.options.constructor_parameters` gives the merged list.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomalib import LearningType
from anomalib.metrics import Evaluator
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from torch import nn
from torchvision.transforms.v2 import Compose, Normalize, Resize

from anomalib_cgad.components.backbone import OFFLINE_BACKBONE, PRETRAINED
from anomalib_cgad.components.operating_point import DEFAULT_FALSE_ALARM_RATE
from anomalib_cgad.components.training_pool import TrainingPool
from anomalib_cgad.console import quiet_frozen_backbone_warning
from anomalib_cgad.data.images import (
    IMAGE_SUFFIXES,
    NonFiniteError,
    check_finite,
    is_wide_image,
    list_images,
    load_images,
    reference_tensor,
    reread_wide_images,
)
from anomalib_cgad.deploy.inferencer import bad_images_mode, check_unreadable, unreadable_images
from anomalib_cgad.distributed import prepare_ddp
from anomalib_cgad.models.calibration import OperatingPointMixin
from anomalib_cgad.models.checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_KEY,
    CheckpointHost,
    CheckpointMismatchError,
    CheckpointMixin,
)
from anomalib_cgad.models.references import (
    DEFAULT_K_SHOT,
    USE_CHECKPOINT_BANK,
    ReferenceError,
    ReferenceHost,
    ReferenceMixin,
)
from anomalib_cgad.validation import check_count

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_KEY",
    "DEFAULT_K_SHOT",
    "IMAGE_SUFFIXES",
    "LIGHTNING_DEFAULT_EPOCHS",
    "USE_CHECKPOINT_BANK",
    "CheckpointHost",
    "CheckpointMismatchError",
    "CheckpointMixin",
    "FewShotModuleMixin",
    "NonFiniteError",
    "ReferenceError",
    "ReferenceHost",
    "ReferenceMixin",
    "configure_cgad_pre_processor",
    "default_evaluator",
    "is_wide_image",
    "list_images",
    "load_images",
    "reference_tensor",
    "reread_wide_images",
]

LIGHTNING_DEFAULT_EPOCHS = 1000  # what Lightning trains when neither max_epochs nor max_steps is given


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


class FewShotModuleMixin(ReferenceMixin, OperatingPointMixin, CheckpointMixin):
    """The anomalib contract of the anomalib-cgad models, with references and checkpoints mixed in.

    The contract members live here once: ``learning_type`` is ``ONE_CLASS`` (so ``Engine.train`` fits the
    models on the source classes), ``trainer_arguments`` leaves ``max_epochs`` to the user (without one, the
    model trains for its ``demo_epochs`` instead of Lightning's 1000, see :meth:`on_fit_start`), the
    post-processor is anomalib's ``PostProcessor`` with its threshold at the operating point, the
    pre-processor resizes without antialiasing and the default evaluator keeps anomalib's metrics per class.

    Init order: the model's ``__init__`` calls this class's (``super().__init__(**kwargs)``), which checks
    ``k_shot``, calls ``AnomalibModule.__init__`` (it resolves the components through the ``configure_*``
    hooks below) and sets the reference and operating-point state; the model then builds ``model`` (a torch
    model with ``set_reference(images)``, ``backbone`` and ``bank``). The class must come before
    ``AnomalibModule`` in the bases so that its hooks override anomalib's and call them through ``super()``.
    """

    def __init__(
        self,
        backbone: str = OFFLINE_BACKBONE,
        layers: Sequence[int] | None = None,
        backbone_weights: str | None = PRETRAINED,
        k_shot: int | None = None,
        few_shot_source: str | None = None,
        false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
        seed: int = 0,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: nn.Module | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        """The arguments every anomalib-cgad model takes; the models forward them here with ``**kwargs``.

        Args:
            backbone (str): timm backbone. Defaults to ``"tf_efficientnet_lite0"`` (its ImageNet weights ship
                offline).
            layers (Sequence[int] | None): backbone stages (CNN) or blocks (ViT). Defaults to ``None``: the
                backbone's default (CNN stages ``(2, 3)``, strides 8 and 16; a ViT's middle and last blocks).
            backbone_weights (str | None): ``"pretrained"``, a checkpoint path or ``None`` (random weights).
                Defaults to ``"pretrained"``.
            k_shot (int | None): references of a test class; ``None``: as many as the datamodule draws
                (``CrossClass.k_shot``), 4 without one. A different explicit value is an error.
            few_shot_source (str | None): folder of reference images of the class to test. Defaults to ``None``.
            false_alarm_rate (float): requested share of a new class's normal images labelled anomalous; sets its
                normal-only threshold from its k references (no anomalous image of it needed). Defaults to ``0.05``.
            seed (int): seed of the model's draws: references, episodes, synthetic anomalies (ResAD: also its
                codebook's initialisation). Defaults to ``0``. Weight initialisation follows the global
                generators: the flow's fixed random rotations (SciPy's ``special_ortho_group`` in anomalib's
                ``AllInOneBlock``) come from NumPy's, so ``torch.manual_seed`` alone does not repeat a run; use
                ``lightning.seed_everything`` (``anomalib train --seed_everything N``).
            pre_processor (nn.Module | bool): anomalib's pre-processor; ``True``: :meth:`configure_pre_processor`.
            post_processor (nn.Module | bool): anomalib's post-processor; ``True``: the normal-only operating point.
            evaluator (nn.Module | bool): anomalib's evaluator; ``True``: its default metrics, kept per class.
            visualizer (Visualizer | bool): anomalib's visualizer. Defaults to ``True``.
        """
        check_count("k_shot", DEFAULT_K_SHOT if k_shot is None else k_shot)
        super().__init__(pre_processor, post_processor, evaluator, visualizer)  # AnomalibModule's own four
        self.backbone_args = {"backbone": backbone, "layers": layers, "backbone_weights": backbone_weights}
        """The torch model's backbone arguments (the model builds its torch model from them)."""
        self.seed = seed
        self._k_shot_given = k_shot is not None  # an explicit k_shot must agree with the datamodule's
        self.k_shot = DEFAULT_K_SHOT if k_shot is None else k_shot
        self.few_shot_source = few_shot_source
        self._init_reference_state()
        self._init_checkpoint_state()
        self.training_pool: TrainingPool | None = None
        self._init_operating_point(false_alarm_rate)

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

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """anomalib's hook for ``evaluator=True``: its default test metrics, kept per class and averaged.

        ``AnomalibModule.__init__`` calls it only for ``evaluator=True``; an evaluator the user passes is kept
        and ``evaluator=False`` disables evaluation, as for every anomalib model.
        """
        return default_evaluator()

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

    def on_validation_start(self) -> None:
        """Forget the bank key; (re)calibrate the operating point on the training classes first when needed.

        Needed: while fitting (the weights changed), or when the model has no calibration for its ``k_shot``
        (a training-free model validated by ``Engine.fit``, or ``k_shot`` changed since the last one).
        """
        self._forget_bank()
        trainer = self.trainer
        datamodule = getattr(trainer, "datamodule", None)
        if trainer.sanity_checking or getattr(datamodule, "train_data", None) is None:
            return
        stale = not self.operating_point.calibrated or int(self.operating_point.calibrated_k) != int(self.k_shot)
        if trainer.state.fn == "fit" or stale:
            self.calibrate_operating_point(datamodule)

    def on_test_start(self) -> None:
        """Forget the bank key so the first test batch sets the references of its class."""
        self._forget_bank()

    def on_predict_start(self) -> None:
        """Forget the bank key so the first predict batch sets the references; version the output images."""
        self._forget_bank()
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
        check_finite(batch.image, batch.image_path, "contain NaN or inf pixel values")
        output = self.at_operating_point(self.model(batch.image))
        check_finite(
            output.pred_score,
            batch.image_path,
            "got NaN or inf scores (their features or the model's weights hold NaN/inf values)",
        )
        return batch.update(**output._asdict())

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
