"""ELPV solar-cell electroluminescence images as an anomalib dataset and datamodule (optional extra).

The PyPI package ``elpv-dataset`` (Deitsch et al., CC BY-NC-SA 4.0; install with
``pip install "anomalib-cgad[elpv]"``) ships 2,624 grayscale 300×300 images of monocrystalline (``mono``)
and polycrystalline (``poly``) cells with a defect probability from expert votes (0, ⅓, ⅔, 1).

Conventions of this module:

- the cell type is the *class* (``category = "mono" | "poly"``), so train-on-mono, test-on-poly is a
  cross-class protocol;
- probability 0 = normal, 1 = anomalous; the ambiguous ⅓ and ⅔ images are left out, or form a "subtle"
  anomalous test subset (``subtle=True`` adds them, ``subtle="only"`` keeps only them as anomalies);
- normal images of each type are split once, with a fixed seed (0), into halves: ``train`` (the pool that
  training images and k-shot references come from) and ``test``; all anomalies are in ``test``;
- images are loaded as 3-channel RGB (gray replicated); there are no masks (image-level metrics only).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
from anomalib.data import AnomalibDataModule
from anomalib.data.datasets.base import AnomalibDataset
from anomalib.data.utils import Split, TestSplitMode, ValSplitMode
from torchvision.transforms.v2 import Transform

CATEGORIES = ("mono", "poly")
TRAIN_FRACTION = 0.5
SPLIT_SEED = 0


class ELPVNotInstalledError(ImportError):
    """The optional ``elpv-dataset`` package is missing."""


def elpv_root() -> Path:
    """Folder of the installed ``elpv-dataset`` data (``labels.csv`` + ``images/``)."""
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or spec.origin is None:
        msg = (
            'The ELPV data comes with the optional extra: pip install "anomalib-cgad[elpv]" '
            "(or pip install elpv-dataset)."
        )
        raise ELPVNotInstalledError(msg)
    return Path(spec.origin).parent / "data"


def read_labels(root: str | Path | None = None) -> pd.DataFrame:
    """``labels.csv`` as a frame with columns ``image_path``, ``probability``, ``type``."""
    root = Path(root) if root is not None else elpv_root()
    labels = root / "labels.csv"
    if not labels.is_file():
        msg = f"ELPV labels file '{labels}' not found; root must hold labels.csv and images/."
        raise FileNotFoundError(msg)
    frame = pd.read_csv(labels, sep=r"\s+", header=None, names=["path", "probability", "type"])
    frame["image_path"] = [str(root / p) for p in frame.path]
    return frame


def make_elpv_samples(
    root: str | Path | None,
    category: str,
    split: str | Split | None,
    subtle: bool | str = False,
) -> pd.DataFrame:
    """Samples frame (anomalib columns) of one cell type and split."""
    if category not in CATEGORIES:
        msg = f"Unknown ELPV category '{category}'; available: {list(CATEGORIES)}."
        raise ValueError(msg)
    frame = read_labels(root)
    frame = frame[frame.type == category].reset_index(drop=True)
    normal = frame[frame.probability == 0.0]
    order = np.random.default_rng(SPLIT_SEED).permutation(len(normal))
    cut = round(TRAIN_FRACTION * len(normal))
    train_normal = normal.iloc[np.sort(order[:cut])]
    test_normal = normal.iloc[np.sort(order[cut:])]
    clear = frame[frame.probability == 1.0]
    ambiguous = frame[(frame.probability > 0.0) & (frame.probability < 1.0)]
    if subtle == "only":
        anomalous = ambiguous
    elif subtle:
        anomalous = pd.concat([clear, ambiguous])
    else:
        anomalous = clear
    parts = []
    split = Split(split).value if split else None
    if split in {None, "train"}:
        parts.append(train_normal.assign(split="train", label="normal", label_index=0))
    if split in {None, "test"}:
        parts.append(test_normal.assign(split="test", label="normal", label_index=0))
        parts.append(anomalous.assign(split="test", label="abnormal", label_index=1))
    samples = pd.concat(parts, ignore_index=True)[["image_path", "label", "label_index", "split", "probability"]]
    samples["mask_path"] = ""
    samples.attrs["task"] = "classification"
    return samples


class ELPVDataset(AnomalibDataset):
    """One ELPV cell type as an anomalib dataset.

    Args:
        root (str | Path | None): data folder; ``None`` = the installed package's data. Defaults to ``None``.
        category (str): ``"mono"`` or ``"poly"``. Defaults to ``"mono"``.
        augmentations (Transform | None): anomalib augmentations. Defaults to ``None``.
        split (str | Split | None): ``"train"``, ``"test"`` or ``None`` (both). Defaults to ``None``.
        subtle (bool | str): add (``True``) or use only (``"only"``) the ⅓/⅔ images as anomalies.
            Defaults to ``False``.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        category: str = "mono",
        augmentations: Transform | None = None,
        split: str | Split | None = None,
        subtle: bool | str = False,
    ) -> None:
        super().__init__(augmentations=augmentations)
        self.split = split
        self.samples = make_elpv_samples(root, category, split, subtle)
        self.category = category


class ELPV(AnomalibDataModule):
    """ELPV datamodule for one cell type (normals of ``train`` for training, ``test`` for testing).

    Args:
        root (str | None): data folder; ``None`` = the installed package. Defaults to ``None``.
        category (str): ``"mono"`` or ``"poly"``. Defaults to ``"mono"``.
        subtle (bool | str): see :class:`ELPVDataset`. Defaults to ``False``.
        train_batch_size (int): Defaults to ``32``.
        eval_batch_size (int): Defaults to ``32``.
        num_workers (int): Defaults to ``0``.
        seed (int | None): Defaults to ``None``.
    """

    def __init__(
        self,
        root: str | None = None,
        category: str = "mono",
        subtle: bool | str = False,
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        seed: int | None = None,
    ) -> None:
        splits = {"test_split_mode": TestSplitMode.FROM_DIR, "val_split_mode": ValSplitMode.SAME_AS_TEST}
        super().__init__(train_batch_size, eval_batch_size, num_workers, **splits, seed=seed)
        self.root = root
        self.category = category
        self.subtle = subtle

    def prepare_data(self) -> None:
        """Check the optional package is there (it carries the data; nothing to download)."""
        if self.root is None:
            elpv_root()

    def _setup(self, _stage: str | None = None) -> None:
        self.train_data = ELPVDataset(self.root, self.category, split="train", subtle=self.subtle)
        self.test_data = ELPVDataset(self.root, self.category, split="test", subtle=self.subtle)
