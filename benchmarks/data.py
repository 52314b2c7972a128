"""Benchmark data: the :class:`~anomalib_cgad.data.CrossClass` of a pass, generated classes, a peer's per-class data.

Every ``(k, seed)`` pass gets a fresh datamodule (only the references change); the evaluation sets are cut to
at most N normal + N anomalous images per class with a fixed draw, so all passes see the same test images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def subsample_eval(datamodule, stage: str, limit: int | None, seed: int = 0) -> None:
    """Keep at most ``limit`` normal and ``limit`` anomalous images per class of a stage's evaluation set.

    The draw uses its own fixed ``seed`` (not the reference seed), so every ``(k, seed)`` pass of a model sees
    the same test images. ``datamodule.setup()`` must have run.
    """
    if not limit:
        return
    attribute = "val_data" if stage == "validate" else "test_data"
    data = getattr(datamodule, attribute)
    samples = data.samples
    classes = np.array([datamodule.class_index(stage, str(p)) for p in samples.image_path])
    labels = samples.label_index.to_numpy()
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for index in np.unique(classes):
        for label in (0, 1):
            rows = np.flatnonzero((classes == index) & (labels == label))
            keep.extend(rng.permutation(rows)[:limit].tolist())
    setattr(datamodule, attribute, data.subsample(sorted(keep)))


def make_datamodule(config: dict, direction: dict, k: int, seed: int, stage: str, root: Path | None = None):
    """A set-up :class:`CrossClass` for a direction, k and reference seed (``stage``: validate | test).

    Validation uses clear defects only (``subtle=False``); the test set includes ELPV's subtle defects when the
    direction asks for them (``subtle: true``), so clear and subtle AUROC come from one pass.
    """
    from anomalib_cgad.data import CrossClass

    options = {
        key: direction[key]
        for key in ("source_dataset", "source_categories", "target_categories", "target_dataset", "few_anomalies")
        if key in direction
    }
    for key in ("source_root", "target_root"):
        if direction.get(key) is not None:
            options[key] = str(direction[key])
    if direction.get("generate") and root is not None:
        options["source_root"] = str(root)
    subtle = bool(direction.get("subtle", False)) and stage == "test"
    datamodule = CrossClass(
        **options,
        k_shot=k,
        reference_seed=seed,
        subtle=subtle,
        train_batch_size=int(config.get("train_batch_size", 16)),
        eval_batch_size=int(config.get("eval_batch_size", 32)),
        num_workers=int(config.get("num_workers", 0)),
    )
    datamodule.setup()
    val_limit = config["max_val_per_class"] if "max_val_per_class" in config else config.get("max_eval_per_class")
    subsample_eval(datamodule, "validate", val_limit)
    subsample_eval(datamodule, "test", config.get("max_eval_per_class"))
    return datamodule


def generate_data(config: dict, direction: dict, folder: Path) -> Path | None:
    """Write the generated (synthetic MVTecAD-format) classes of a direction, if it asks for them."""
    spec = direction.get("generate")
    if not spec:
        return None
    from anomalib_cgad.data import make_synthetic_mvtec

    categories = [*direction["source_categories"], *direction["target_categories"]]
    return make_synthetic_mvtec(folder / "data", categories=categories, **spec)


def reference_fit_datamodule(cross, index: int, config: dict):
    """Datamodule for a peer on target class ``index`` of ``cross``: train = its k references, test = its test set.

    Validation uses anomalib's default for single-class datamodules (``ValSplitMode.SAME_AS_TEST``): the peer's
    F1 threshold is learned on the target test images themselves (documented as optimistic in the README).
    """
    from anomalib.data import AnomalibDataModule
    from anomalib.data.utils import TestSplitMode, ValSplitMode

    class ReferenceFit(AnomalibDataModule):
        def __init__(self) -> None:
            super().__init__(
                train_batch_size=cross.k_shot,
                eval_batch_size=int(config.get("eval_batch_size", 32)),
                num_workers=int(config.get("num_workers", 0)),
                val_split_mode=ValSplitMode.SAME_AS_TEST,
                test_split_mode=TestSplitMode.FROM_DIR,
            )
            self.category = cross.test_categories[index]

        @property
        def name(self) -> str:
            return f"references_{self.category}"

        def _setup(self, _stage: str | None = None) -> None:
            self.train_data = cross.reference_dataset("test", index)
            paths = cross.test_data.samples.image_path
            rows = [i for i, p in enumerate(paths) if cross.class_index("test", str(p)) == index]
            self.test_data = cross.test_data.subsample(rows)

    return ReferenceFit()
