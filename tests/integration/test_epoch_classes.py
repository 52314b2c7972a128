"""``epoch_classes``: the episodes of an epoch stop growing with the number of training classes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from lightning.pytorch import Callback, seed_everything

from anomalib_cgad import CGAD, MetaAD
from anomalib_cgad.data import CrossClass, make_synthetic_mvtec
from anomalib_cgad.models.episodic import EpisodeOptions
from anomalib_cgad.models.options import regroup_arguments

SIX = ("stripes", "dots", "checker", "washer", "stripes_1", "dots_7")  # variants: more classes than families


@pytest.fixture(scope="module")
def six_classes(tmp_path_factory) -> Path:
    """Six source classes and a target, 4 training images each (a batch of 4 = one class's images), 64 px."""
    root = tmp_path_factory.mktemp("six")
    return make_synthetic_mvtec(root, categories=(*SIX, "waves"), n_train=4, n_test_good=1, n_test_bad=1, image_size=64)


class Steps(Callback):
    """Training batches Lightning iterated, and the episodes the model ran (a skipped step returns nothing)."""

    def __init__(self) -> None:
        self.batches, self.episodes = 0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        self.episodes += bool(outputs)


def _fit(model_cls, root: Path, tmp_path: Path, epochs: int = 1, **options):
    seed_everything(0, workers=True)
    options = regroup_arguments(model_cls, {"training": {"synthetic_per_class": 2}, **options})
    model = model_cls(pre_processor=model_cls.configure_pre_processor((64, 64)), visualizer=False, **options)
    datamodule = CrossClass(
        source_dataset="MVTecAD", source_root=str(root), source_categories=list(SIX), target_categories=["waves"],
        k_shot=1, train_batch_size=4, eval_batch_size=4,
    )  # fmt: skip
    steps = Steps()
    engine = Engine(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        default_root_dir=tmp_path, callbacks=[steps],
    )  # fmt: skip
    engine.fit(model=model, datamodule=datamodule)
    return model, steps


@pytest.mark.parametrize("model_cls", [CGAD, MetaAD])
def test_six_classes_with_epoch_classes_two_run_a_third_of_the_batches_as_episodes(
    model_cls, six_classes: Path, tmp_path: Path
) -> None:
    model, steps = _fit(model_cls, six_classes, tmp_path, epochs=2, episodes={"epoch_classes": 2})
    assert steps.batches == 2 * 6  # 24 images / 4 per batch, every epoch: all batches are still read
    assert steps.episodes == 2 * 2  # ceil(6 batches * 2 / 6 classes) per epoch
    assert model.outer_steps == steps.episodes  # each episode ran its outer level (3 outer classes of 6)
    assert model.operating_point.calibrated  # validation (which calibrates it) still ran after the short epochs
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_epoch_classes_at_or_above_the_class_count_changes_nothing(six_classes: Path, tmp_path: Path) -> None:
    """The default (4) leaves runs on up to 4 classes as they were: same episodes, same weights."""
    options = {"flow": {"coupling_blocks": 2}}
    unbounded, steps_unbounded = _fit(CGAD, six_classes, tmp_path / "none", episodes={"epoch_classes": None}, **options)
    at_count, steps_at_count = _fit(CGAD, six_classes, tmp_path / "six", episodes={"epoch_classes": 6}, **options)
    assert steps_unbounded.episodes == steps_at_count.episodes == 6
    first, second = unbounded.state_dict(), at_count.state_dict()
    assert [key for key in first if not torch.equal(first[key], second[key])] == []


@pytest.mark.parametrize("value", [0, -1, 2.5, "4", True])
def test_bad_epoch_classes_is_named(value) -> None:
    with pytest.raises(ValueError, match="epoch_classes must be"):
        EpisodeOptions(epoch_classes=value)
