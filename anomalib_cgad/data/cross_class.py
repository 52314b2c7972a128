"""Cross-class protocols as one datamodule: train on source classes, test on unseen target classes.

:class:`CrossClass` composes anomalib's own per-category datasets (``MVTecADDataset``, ``VisaDataset``,
``MPDDDataset``, ``BTechDataset``, and :class:`~anomalib_cgad.data.elpv.ELPVDataset`; any folder in
MVTecAD layout works as ``MVTecAD`` with its own ``root``):

- **train**: the normal training images of every source class, plus ``few_anomalies`` labelled anomalies
  per source class taken from that class's test split (for the meta-learning models; 0 by default);
- **validation**: the source classes' test splits minus those anomalies (thresholds are learned on source
  classes only);
- **test**: the target classes' test splits minus their k references;
- evaluation batches never mix classes, and :meth:`class_index` names the class of an image, so models
  switch to that class's reference bank (anomalib's callbacks expect a single dataloader);
- **references**: ``k_shot`` normal training images per class, drawn with ``reference_seed``
  (:meth:`reference_images`; never in any test set).

Source and target classes never overlap (for the same dataset and root). Metrics per class and their mean
come from :class:`~anomalib_cgad.metrics.PerClassEvaluator`.

Example:
    >>> from anomalib_cgad.data import CrossClass
    >>> datamodule = CrossClass(source_dataset="ELPV", source_categories=["mono"], target_categories=["poly"])
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from anomalib.data import AnomalibDataModule
from anomalib.data.datasets.base import AnomalibDataset
from anomalib.data.utils import TestSplitMode, ValSplitMode
from anomalib.data.utils.split import concatenate_datasets
from torch.utils.data import DataLoader, Sampler

from anomalib_cgad.deploy.inferencer import bad_images_mode, check_unreadable, unreadable_images
from anomalib_cgad.validation import check_count

logger = logging.getLogger(__name__)

DOWNLOADABLE = {
    "MVTecAD": "https://www.mvtec.com/company/research/datasets/mvtec-ad (extract to <root>/<class>/...)",
    "Visa": "https://github.com/amazon-science/spot-diff (anomalib's Visa datamodule prepares <root>/visa_pytorch)",
    "MPDD": "https://github.com/stepanje/MPDD",
    "BTech": "https://avires.dimi.uniud.it/papers/btad/btad.zip",
}


# Lightning warns that it cannot force drop_last=False into a custom batch sampler when predicting;
# ClassBatches never drops anything (every index is in exactly one batch).
warnings.filterwarnings("ignore", message=r"You are using a custom batch sampler `ClassBatches` for prediction")


def dataset_class(name: str) -> type[AnomalibDataset]:
    """anomalib (or ELPV) dataset class for a dataset name."""
    from anomalib.data.datasets import BTechDataset, MPDDDataset, MVTecADDataset, VisaDataset

    from anomalib_cgad.data.elpv import ELPVDataset

    classes = {
        "MVTecAD": MVTecADDataset,
        "Visa": VisaDataset,
        "MPDD": MPDDDataset,
        "BTech": BTechDataset,
        "ELPV": ELPVDataset,
    }
    if name not in classes:
        msg = f"Unknown dataset '{name}'; available: {sorted(classes)}."
        raise ValueError(msg)
    return classes[name]


def default_root(name: str) -> str | None:
    """Where anomalib puts a dataset by default (``None`` for ELPV, which ships in its package)."""
    return {"MVTecAD": "./datasets/MVTecAD", "Visa": "./datasets/visa/visa_pytorch", "MPDD": "./datasets/MPDD",
            "BTech": "./datasets/BTech"}.get(name)  # fmt: skip


def available_categories(name: str, root: str | None) -> list[str]:
    """Class folders present under ``root`` (ELPV: its two cell types)."""
    if name == "ELPV":
        from anomalib_cgad.data.elpv import CATEGORIES

        return list(CATEGORIES)
    folder = Path(root) if root else None
    if folder is None or not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _official(dataset: str, categories: list[str]) -> bool:
    """Whether every class is one of the public dataset's own (so anomalib's download can provide it)."""
    from anomalib.data.datasets.image import mvtecad, visa

    return set(categories) <= set({"MVTecAD": mvtecad.CATEGORIES, "Visa": visa.CATEGORIES}[dataset])


def _readable(data: AnomalibDataset, name: str, bad_images: str) -> AnomalibDataset:
    """Find the image files that cannot be read; stop naming them, or (``bad_images="skip"``) drop them.

    Every file is decoded once here, at set-up (one extra decode per file), so a truncated file is named
    before training starts rather than ending a test that runs after hours of training with an unnamed
    ``OSError``. 16-bit files are read by the one input policy (see
    :func:`anomalib_cgad.models.base.reread_wide_images`), like 8-bit ones.
    """
    bad = unreadable_images(list(data.samples.image_path))
    if not bad:
        return data
    if len(bad) == len(data):
        msg = f"{name}: none of its {len(data)} image files can be read, e.g. {list(bad.items())[:3]}."
        raise ValueError(msg)
    check_unreadable(bad, name, bad_images)
    return data.subsample([row for row, path in enumerate(data.samples.image_path) if str(path) not in bad])


class ClassBatches(Sampler[list[int]]):
    """Fixed batches of dataset indices, each of one class (a sampler object: Lightning's predict loop wraps it).

    Args:
        batches (list[list[int]]): the batches, in order.
    """

    def __init__(self, batches: list[list[int]]) -> None:
        super().__init__()
        self.batches = batches

    def __iter__(self):
        """Yield the batches in order."""
        return iter(self.batches)

    def __len__(self) -> int:
        """Number of batches."""
        return len(self.batches)


class CrossClass(AnomalibDataModule):
    """Source classes for training, unseen target classes for testing, k-shot references for both.

    Args:
        source_dataset (str): dataset of the training classes. Defaults to ``"MVTecAD"``.
        source_categories (Sequence[str]): training classes.
        target_categories (Sequence[str]): unseen test classes.
        source_root (str | None): dataset folder (``None``: anomalib's default / ELPV's package).
        target_dataset (str | None): dataset of the test classes; ``None`` = ``source_dataset``.
        target_root (str | None): folder of the target dataset; ``None`` = ``source_root`` if same dataset.
        k_shot (int): normal reference images per class. Defaults to ``4``.
        reference_seed (int): which references are drawn. Defaults to ``0``.
        few_anomalies (int): labelled anomalies per source class added to training. Defaults to ``0``.
        subtle (bool | str): ELPV only: use the ⅓/⅔ images (see :class:`ELPVDataset`). Defaults to ``False``.
        train_batch_size (int): Defaults to ``16``.
        eval_batch_size (int): Defaults to ``16``.
        num_workers (int): Defaults to ``0``.
        seed (int | None): Defaults to ``None``.
        bad_images (str | None): an image file that cannot be read (corrupt, truncated): ``"stop"`` with an
            error naming it, or ``"skip"`` it with a warning naming it. ``None``: the
            ``ANOMALIB_CGAD_BAD_IMAGES`` environment variable, else ``"stop"``.
    """

    def __init__(
        self,
        source_dataset: str = "MVTecAD",
        source_categories: Sequence[str] = ("bottle",),
        target_categories: Sequence[str] = ("carpet",),
        source_root: str | None = None,
        target_dataset: str | None = None,
        target_root: str | None = None,
        k_shot: int = 4,
        reference_seed: int = 0,
        few_anomalies: int = 0,
        subtle: bool | str = False,
        train_batch_size: int = 16,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        seed: int | None = None,
        bad_images: str | None = None,
    ) -> None:
        splits = {"val_split_mode": ValSplitMode.FROM_DIR, "test_split_mode": TestSplitMode.FROM_DIR}
        super().__init__(train_batch_size, eval_batch_size, num_workers, **splits, seed=seed)
        self.source_dataset = source_dataset
        self.target_dataset = target_dataset or source_dataset
        dataset_class(self.source_dataset)
        dataset_class(self.target_dataset)
        self.source_root = source_root if source_root is not None else default_root(source_dataset)
        if target_root is None:
            target_root = (
                self.source_root if self.target_dataset == source_dataset else default_root(self.target_dataset)
            )
        self.target_root = target_root
        self.source_categories = [str(c) for c in source_categories]
        self.target_categories = [str(c) for c in target_categories]
        if not self.source_categories or not self.target_categories:
            msg = "CrossClass needs at least one source and one target category."
            raise ValueError(msg)
        same_data = self.source_dataset == self.target_dataset and self.source_root == self.target_root
        overlap = sorted(set(self.source_categories) & set(self.target_categories)) if same_data else []
        if overlap:
            msg = f"Classes {overlap} are both source and target: a target class must be unseen in training."
            raise ValueError(msg)
        check_count("k_shot", k_shot)
        if few_anomalies < 0:
            msg = f"few_anomalies must be >= 0, got {few_anomalies}."
            raise ValueError(msg)
        self.k_shot = k_shot
        self.bad_images = bad_images_mode(bad_images)
        self.reference_seed = reference_seed
        self.few_anomalies = few_anomalies
        self.subtle = subtle
        self.val_categories = list(self.source_categories)
        self.test_categories = list(self.target_categories)
        self.category = f"{'+'.join(self.source_categories)}_to_{'+'.join(self.target_categories)}"
        self._path_category: dict[str, str] = {}
        self._references: dict[tuple[str, int], list[int]] = {}

    @property
    def name(self) -> str:
        """Results folder name: ``CrossClass_<source>_to_<target>`` datasets."""
        return f"CrossClass_{self.source_dataset}_to_{self.target_dataset}"

    # ----------------------------------------------------------------- data on disk
    def _check_present(self, dataset: str, root: str | None, categories: list[str]) -> None:
        if dataset == "ELPV":
            if root is None:
                from anomalib_cgad.data.elpv import elpv_root

                elpv_root()
            return
        if root is None or not Path(root).is_dir():
            where = DOWNLOADABLE.get(dataset, "")
            msg = f"{dataset} root '{root}' does not exist. Put the dataset there ({where}) or pass its folder as root."
            raise FileNotFoundError(msg)
        present = available_categories(dataset, root)
        missing = [c for c in categories if c not in present]
        if missing:
            msg = f"{dataset} classes {missing} not found under '{root}'; available: {present or 'none'}."
            raise FileNotFoundError(msg)

    def prepare_data(self) -> None:
        """Check every class is on disk; with anomalib's own download for missing MVTecAD/Visa classes."""
        for dataset, root, categories in (
            (self.source_dataset, self.source_root, self.source_categories),
            (self.target_dataset, self.target_root, self.target_categories),
        ):
            try:
                self._check_present(dataset, root, categories)
            except FileNotFoundError as missing:
                if dataset not in {"MVTecAD", "Visa"} or root is None or not _official(dataset, categories):
                    raise  # never download a public dataset into a custom folder because of a typo
                self._download_with_anomalib(dataset, root, categories, missing)

    @staticmethod
    def _download_with_anomalib(dataset: str, root: str, categories: list[str], missing: Exception) -> None:
        import anomalib.data as anomalib_data

        module = getattr(anomalib_data, dataset)
        for category in categories:
            try:
                module(root=root if dataset == "MVTecAD" else str(Path(root).parent), category=category).prepare_data()
            except Exception as exc:
                msg = f"{missing} anomalib's download of {dataset}/{category} failed too ({type(exc).__name__})."
                raise FileNotFoundError(msg) from exc

    def _load(self, dataset: str, root: str | None, category: str, split: str) -> AnomalibDataset:
        cls = dataset_class(dataset)
        kwargs = {"subtle": self.subtle} if dataset == "ELPV" else {}
        try:
            data = cls(root=root, category=category, split=split, **kwargs)
        except RuntimeError as exc:  # anomalib's "Found 0 images in <folder>"
            msg = f"{dataset} class '{category}' has no {split} images under '{root}' ({exc})."
            raise ValueError(msg) from exc
        if len(data) == 0:
            msg = f"{dataset} class '{category}' has no {split} images under '{root}'."
            raise ValueError(msg)
        return _readable(data, f"{dataset} class '{category}' ({split})", self.bad_images)

    # ----------------------------------------------------------------- splits
    def _draw_references(self, data: AnomalibDataset, category: str, stage: str) -> list[int]:
        labels = data.samples.label_index.to_numpy()
        normal = np.flatnonzero(labels == 0)
        if len(normal) < self.k_shot:
            msg = (
                f"k_shot={self.k_shot} references requested for class '{category}', but it has only "
                f"{len(normal)} normal training images."
            )
            raise ValueError(msg)
        rng = np.random.default_rng([self.reference_seed, sum(map(ord, category)), len(stage)])
        return sorted(normal[rng.permutation(len(normal))[: self.k_shot]].tolist())

    def _setup(self, _stage: str | None = None) -> None:
        self._check_present(self.source_dataset, self.source_root, self.source_categories)
        self._check_present(self.target_dataset, self.target_root, self.target_categories)
        train_parts, val_sets, ref_sets_val = [], [], []
        rng = np.random.default_rng(self.reference_seed)
        for category in self.source_categories:
            train = self._load(self.source_dataset, self.source_root, category, "train")
            test = self._load(self.source_dataset, self.source_root, category, "test")
            normal_rows = np.flatnonzero(train.samples.label_index.to_numpy() == 0)
            train = train.subsample(normal_rows.tolist())
            if self.few_anomalies:
                anomalous = np.flatnonzero(test.samples.label_index.to_numpy() == 1)
                if len(anomalous) < self.few_anomalies:
                    msg = (
                        f"few_anomalies={self.few_anomalies} requested for class '{category}', which has only "
                        f"{len(anomalous)} anomalous test images."
                    )
                    raise ValueError(msg)
                chosen = sorted(rng.permutation(anomalous)[: self.few_anomalies].tolist())
                train = concatenate_datasets([train, test.subsample(chosen)])
                test = test.subsample(sorted(set(range(len(test))) - set(chosen)))
            for path in train.samples.image_path:
                self._path_category[str(path)] = category
            train_parts.append(train)
            val_sets.append(test)
            ref_sets_val.append(train)
        self.train_data = concatenate_datasets(train_parts) if len(train_parts) > 1 else train_parts[0]
        self.train_data.samples["category"] = [self._path_category[str(p)] for p in self.train_data.samples.image_path]
        self._val_sets = val_sets
        self._ref_sets = {"validate": ref_sets_val}
        test_sets, ref_sets_test = [], []
        for index, category in enumerate(self.target_categories):
            train = self._load(self.target_dataset, self.target_root, category, "train")
            test = self._load(self.target_dataset, self.target_root, category, "test")
            refs = self._draw_references(train, category, "test")
            self._references[("test", index)] = refs
            ref_paths = {str(p) for p in train.samples.image_path.iloc[refs]}
            keep = [i for i, p in enumerate(test.samples.image_path) if str(p) not in ref_paths]
            test_sets.append(test.subsample(keep) if len(keep) < len(test) else test)
            ref_sets_test.append(train)
        self._test_sets = test_sets
        self._ref_sets["test"] = ref_sets_test
        for index, (category, train) in enumerate(zip(self.source_categories, ref_sets_val, strict=True)):
            self._references[("validate", index)] = self._draw_references(train, category, "validate")
        self._eval_class = {
            stage: {str(p): i for i, data in enumerate(sets) for p in data.samples.image_path}
            for stage, sets in (("validate", val_sets), ("test", test_sets))
        }
        self.val_data = concatenate_datasets(val_sets) if len(val_sets) > 1 else val_sets[0]
        self.test_data = concatenate_datasets(test_sets) if len(test_sets) > 1 else test_sets[0]

    def setup(self, stage: str | None = None) -> None:
        """Build every class's datasets once, then attach the model's resize to all of them."""
        if not getattr(self, "_val_sets", None):
            self._setup(stage)
        self._update_augmentations()
        transform = getattr(getattr(getattr(self, "trainer", None), "model", None), "pre_processor", None)
        model_transform = getattr(transform, "transform", None)
        datasets = [*self._ref_sets["validate"], *self._ref_sets["test"]]
        for data in datasets:
            if model_transform is not None:
                self._update_subset_augmentations(data, None, model_transform)

    # ----------------------------------------------------------------- loaders
    def _loader(self, data: AnomalibDataset, stage: str) -> DataLoader:
        classes = [self._eval_class[stage][str(p)] for p in data.samples.image_path]
        batches = []
        for index in range(len(self.val_categories if stage == "validate" else self.test_categories)):
            rows = [i for i, c in enumerate(classes) if c == index]
            batches.extend(rows[i : i + self.eval_batch_size] for i in range(0, len(rows), self.eval_batch_size))
        sampler = ClassBatches(batches)
        return DataLoader(data, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=data.collate_fn)

    def val_dataloader(self) -> DataLoader:
        """Source-class test images; every batch holds one class (anomalib's callbacks take one dataloader)."""
        return self._loader(self.val_data, "validate")

    def test_dataloader(self) -> DataLoader:
        """Target-class test images minus their references; every batch holds one class."""
        return self._loader(self.test_data, "test")

    def predict_dataloader(self) -> DataLoader:
        """Same as the test dataloader."""
        return self.test_dataloader()

    def class_index(self, stage: str, path: str) -> int:
        """Index (into ``val_categories`` / ``test_categories``) of the class of an evaluation image."""
        stage = "test" if stage == "predict" else stage
        return self._eval_class[stage][str(path)]

    # ----------------------------------------------------------------- references
    def category_of(self, path: str) -> str:
        """Source class of a training image path."""
        return self._path_category.get(str(path), self.source_categories[0])

    def _reference_rows(self, stage: str, index: int) -> tuple[AnomalibDataset, list[int]]:
        """The normal training set of class ``index`` the references are drawn from, and the k rows drawn."""
        stage = "test" if stage == "predict" else stage
        return self._ref_sets[stage][index], self._references[(stage, index)]

    def reference_paths(self, stage: str, index: int) -> list[str]:
        """Paths of the k references of class ``index`` for ``stage`` (``validate`` | ``test`` | ``predict``)."""
        data, rows = self._reference_rows(stage, index)
        return [str(data.samples.image_path.iloc[i]) for i in rows]

    def reference_images(self, stage: str, index: int) -> torch.Tensor:
        """The k references of class ``index``: ``(k, 3, H, W)`` in [0, 1], resized like the batches."""
        from anomalib_cgad.models.base import reread_wide_images

        data, rows = self._reference_rows(stage, index)
        images = torch.stack([data[i].image for i in rows])
        return reread_wide_images(images, [str(data.samples.image_path.iloc[i]) for i in rows])

    def reference_dataset(self, stage: str, index: int) -> AnomalibDataset:
        """The k references of class ``index`` as an anomalib dataset, e.g. to fit a model on them alone.

        The same images, in the same order, as :meth:`reference_paths` / :meth:`reference_images`, with the
        transform :meth:`setup` attached to the class's training images.
        """
        data, rows = self._reference_rows(stage, index)
        return data.subsample(rows)

    def normal_pool(self) -> dict[str, list[str]]:
        """Normal training image paths per source class."""
        pool: dict[str, list[str]] = {}
        labels = self.train_data.samples.label_index.tolist()
        for path, label in zip(self.train_data.samples.image_path, labels, strict=True):
            if int(label) == 0:
                pool.setdefault(self.category_of(path), []).append(str(path))
        return pool
