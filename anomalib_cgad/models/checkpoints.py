"""Checkpoints of the anomalib-cgad models: a tag on save, and clear errors for checkpoints they cannot use.

:class:`CheckpointMixin` writes, next to anomalib's component configs, an ``anomalib_cgad`` tag (plugin
version, checkpoint format, model class, bank metadata, training classes, false-alarm rate) and, on load,
refuses with a message naming the problem a checkpoint of another model, of another checkpoint format or
with weights of another configuration. Checkpoints are read with ``weights_only=True``.

It also remembers the bank stored in the loaded checkpoint and its training classes, so that reference
resolution (:class:`~anomalib_cgad.models.references.ReferenceMixin`) can refuse to score a new product
against a multi-class checkpoint's bank (one training class's references).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from anomalib_cgad.components.operating_point import OperatingPoint
from anomalib_cgad.components.training_pool import TrainingPool
from anomalib_cgad.models.options import (
    constructor_parameters,
    flat_argument_names,
    option_groups,
    plain_hyperparameters,
    regroup_arguments,
)
from anomalib_cgad.models.references import USE_CHECKPOINT_BANK, ReferenceError
from anomalib_cgad.safe_load import load_weights_only

logger = logging.getLogger(__name__)

CHECKPOINT_KEY = "anomalib_cgad"
CHECKPOINT_FORMAT = 1
LIGHTNING_INSTANTIATOR_KEYS = ("_instantiator", "_class_path")
"""Hyper-parameters LightningCLI saves to rebuild a model (Lightning reads them itself)."""

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_KEY", "CheckpointHost", "CheckpointMismatchError", "CheckpointMixin"]


class CheckpointMismatchError(ValueError):
    """A checkpoint holds another model, another checkpoint format, or weights of another configuration."""


def _plugin_version() -> str:
    from anomalib_cgad import __version__

    return __version__


@runtime_checkable
class CheckpointHost(Protocol):
    """What :class:`CheckpointMixin` needs from the class it is mixed into (an ``AnomalibModule``).

    ``model`` is the torch model (a ``bank`` with ``num_refs``; ``bank_metadata()`` when it has one);
    ``state_dict``, ``on_save_checkpoint`` and ``on_load_checkpoint`` come from Lightning, which the mixin
    must precede in the MRO (its hooks call ``super()``).
    """

    model: torch.nn.Module
    operating_point: OperatingPoint
    training_pool: TrainingPool | None
    false_alarm_rate: float
    few_shot_source: Any

    def reference_image_size(self) -> tuple[int, int]: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...


class CheckpointMixin:
    """Tags checkpoints on save and checks them on load (host: :class:`CheckpointHost`; see the module docstring).

    The host calls :meth:`_init_checkpoint_state` in ``__init__``.
    """

    def _init_checkpoint_state(self) -> None:
        # The training classes and the bank of the checkpoint this model was loaded from (see _ensure_bank).
        self._checkpoint_classes: list[str] = []
        self._checkpoint_bank: dict[str, torch.Tensor] = {}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add anomalib's component configs, then a tag: plugin version, checkpoint format, model class, bank.

        The options objects among the hyper-parameters are saved as plain mappings, so the checkpoint loads with
        ``weights_only=True`` (:meth:`load_from_checkpoint` builds them again).
        """
        super().on_save_checkpoint(checkpoint)
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = plain_hyperparameters(checkpoint["hyper_parameters"])
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
        hparams = checkpoint.get("hyper_parameters") or {}
        kwargs = {**cls._grouped_hyperparameters(hparams), **kwargs}
        source: Path | io.BytesIO = path
        taken = {*constructor_parameters(cls), *LIGHTNING_INSTANTIATOR_KEYS}
        unused = [key for key in hparams if key not in taken]
        if unused:
            # 0.1's flat names (regrouped above) or another model's arguments. The constructors forward
            # **kwargs, so Lightning would hand them every saved hyper-parameter instead of only the ones
            # they take: give Lightning the checkpoint without them.
            checkpoint["hyper_parameters"] = {key: value for key, value in hparams.items() if key in taken}
            source = io.BytesIO()
            torch.save(checkpoint, source)
            source.seek(0)
        try:
            return super().load_from_checkpoint(source, *args, **kwargs)
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

    @classmethod
    def _grouped_hyperparameters(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """The options objects of a checkpoint's hyper-parameters (saved as mappings, or under 0.1's flat names)."""
        groups = option_groups(cls)
        if not groups:
            return {}
        known = {*constructor_parameters(cls), *flat_argument_names(cls)}
        usable = {key: value for key, value in hparams.items() if key in known}
        grouped = regroup_arguments(cls, usable, source="the checkpoint's hyper-parameters")
        return {key: value for key, value in grouped.items() if key in groups}

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
