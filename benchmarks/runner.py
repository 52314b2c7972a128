"""Cross-class benchmark runner: our models, the patch-kNN baseline and anomalib's own models on one protocol.

For every direction (source classes → unseen target classes) of a protocol:

1. **our models** (CGAD, ResAD, MetaAD) are trained *once* on the source classes through anomalib's ``Engine``;
   then, for each ``(k, seed)``, only the references change: a new :class:`~anomalib_cgad.data.CrossClass` with
   that ``k_shot`` / ``reference_seed`` is validated on the source classes (the post-processor learns the
   *transferred* threshold with k references there) and tested on the target classes;
2. **PatchKNN** (:mod:`benchmarks.patch_knn`) is training-free and goes through the same validate + test;
3. **peers** (anomalib's Patchcore, Padim, WinClip, AnomalyDINO; :mod:`benchmarks.peers`) are fitted on the k
   references of each target class and tested on the same test images; their threshold comes from anomalib's
   default validation split for a per-class datamodule (``same_as_test``), see the README;
4. per-image raw scores, labels and (when masks exist) anomaly maps are collected by :class:`ScoreCollector`
   and turned into metrics in one place (:func:`class_metrics`), so every model is measured identically.

Results are appended after each run to ``results.csv`` (an interrupted run keeps what it finished) and the
report (``summary.md``, plots, ``speed.md``) is written at the end (:mod:`benchmarks.report`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from lightning.pytorch import Callback, seed_everything

from anomalib_cgad.versioning import next_version_folder

logger = logging.getLogger(__name__)

PRESETS = Path(__file__).parent / "presets"
OURS = ("CGAD", "ResAD", "MetaAD")
BASELINES = ("PatchKNN",)
PEERS = ("Patchcore", "Padim", "WinClip", "AnomalyDINO")
ALL_MODELS = (*OURS, *BASELINES, *PEERS)
METRICS = (
    "image_AUROC",
    "image_AUROC_clear",
    "image_AUROC_subtle",
    "pixel_AUROC",
    "AUPRO",
    "F1_transferred",
    "F1_oracle",
    "F1_normal_only",
    "false_alarm_rate",
    "miss_rate",
    "false_alarm_rate_at_0.01",
    "false_alarm_rate_at_0.05",
    "false_alarm_rate_at_0.1",
    "F1_normal_only_at_0.01",
    "F1_normal_only_at_0.1",
)
REQUESTED_RATES = (0.01, 0.05, 0.1)  # requested false-alarm rates every pass is also evaluated at
COLUMNS = (
    "direction",
    "model",
    "k_shot",
    "seed",
    "class",
    "status",
    "n_test",
    "n_anomalous",
    *METRICS,
    "threshold_from",
    "requested_false_alarm_rate",
    "bank_refs",
    "references",
)
OVERLAYS_PER_CLASS = 3


# --------------------------------------------------------------------------- configuration
def load_config(preset: str | None = None, protocol: str | Path | None = None, quick: bool = False) -> dict:
    """Read a preset (by name, from ``benchmarks/presets``) or a protocol YAML, with its ``quick`` overrides.

    Args:
        preset (str | None): preset name, e.g. ``"elpv"``.
        protocol (str | Path | None): path of a protocol YAML (same schema as the presets).
        quick (bool): apply the file's ``quick:`` section on top. Defaults to ``False``.

    Returns:
        dict: the resolved configuration (``quick`` section removed).

    Raises:
        FileNotFoundError: unknown preset or missing file.
        ValueError: neither or both of ``preset`` / ``protocol``, or an invalid configuration.
    """
    if (preset is None) == (protocol is None):
        msg = "Give exactly one of --preset NAME or --protocol FILE.yaml."
        raise ValueError(msg)
    if preset is not None:
        path = PRESETS / f"{preset}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in PRESETS.glob("*.yaml"))
            msg = f"Unknown preset '{preset}'; available: {names}."
            raise FileNotFoundError(msg)
    else:
        path = Path(protocol)
        if not path.is_file():
            msg = f"Protocol file '{path}' does not exist."
            raise FileNotFoundError(msg)
    config = yaml.safe_load(path.read_text()) or {}
    quick_section = config.pop("quick", {}) or {}
    if quick:
        config.update(quick_section)
    config.setdefault("name", path.stem)
    validate_config(config)
    return config


def validate_config(config: dict) -> None:
    """Check the keys the runner needs; raise ``ValueError`` naming the problem."""
    for key in ("directions", "models", "k_shot", "seeds"):
        if not config.get(key):
            msg = f"Benchmark configuration needs a non-empty '{key}'."
            raise ValueError(msg)
    variants = config.get("variants") or {}
    for name, variant in variants.items():
        base = (variant or {}).get("model")
        if base not in (*OURS, *BASELINES):
            msg = f"Variant '{name}' needs 'model:' one of {[*OURS, *BASELINES]}, got {base!r}."
            raise ValueError(msg)
        if not isinstance(variant.get("args", {}), dict):
            msg = f"Variant '{name}': 'args' must be a mapping of constructor arguments."
            raise ValueError(msg)
        epochs = variant.get("epochs")
        if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
            msg = f"Variant '{name}': 'epochs' must be a positive integer, got {epochs!r}."
            raise ValueError(msg)
        size = variant.get("image_size")
        if size is not None and (not isinstance(size, int) or size < 32):
            msg = f"Variant '{name}': 'image_size' must be an integer >= 32, got {size!r}."
            raise ValueError(msg)
    unknown = [m for m in config["models"] if m not in ALL_MODELS and m not in variants]
    if unknown:
        msg = f"Unknown models {unknown}; choose from {list(ALL_MODELS)} or the protocol's variants {list(variants)}."
        raise ValueError(msg)
    if any(int(k) < 1 for k in config["k_shot"]):
        msg = f"k_shot values must be >= 1, got {config['k_shot']}."
        raise ValueError(msg)
    for direction in config["directions"]:
        for key in ("name", "source_dataset", "source_categories", "target_categories"):
            if key not in direction:
                msg = f"Direction {direction.get('name', direction)} misses '{key}'."
                raise ValueError(msg)


# --------------------------------------------------------------------------- data
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


# --------------------------------------------------------------------------- collection
class ScoreCollector(Callback):
    """Collect raw per-image scores, labels, paths and (with masks) anomaly maps during ``trainer.test``.

    It is a trainer callback, so Lightning runs it before the model's post-processor: scores are the model's
    raw ones (no clamping) and the transferred label is ``raw score > post_processor.image_threshold``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        """Forget what was collected."""
        self.scores: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.paths: list[str] = []
        self.maps: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []
        self.examples: dict[str, torch.Tensor] = {}
        self.threshold = float("nan")
        self.normal_only: dict[float, float] | None = None  # requested rate -> threshold on the collected scores
        self.seconds = 0.0
        self.bank_refs: int | None = None
        self._start = 0.0

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        """Start the clock and read the transferred (source-validation) threshold."""
        del trainer
        self.threshold = float(pl_module.post_processor.image_threshold)
        if hasattr(pl_module, "operating_point") and pl_module.operating_point.calibrated:
            self.normal_only = normal_only_offsets(pl_module)
        self._start = time.perf_counter()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """Store the batch's raw scores (and maps where ground-truth masks exist)."""
        del trainer, pl_module, outputs, batch_idx, dataloader_idx
        self.scores.append(batch.pred_score.detach().float().reshape(-1).cpu())
        self.labels.append(batch.gt_label.detach().int().reshape(-1).cpu())
        self.paths.extend(str(p) for p in batch.image_path)
        maps = batch.anomaly_map
        masks = batch.gt_mask
        if maps is not None and masks is not None and masks.numel():
            self.maps.append(maps.detach().float().reshape(len(batch.image_path), *maps.shape[-2:]).cpu().half())
            self.masks.append(masks.detach().reshape(len(batch.image_path), *masks.shape[-2:]).cpu().bool())
        if maps is not None:
            for path, label, amap in zip(batch.image_path, batch.gt_label, maps, strict=False):
                key = f"{int(label)}::{path}"
                if sum(k.startswith(f"{int(label)}::") for k in self.examples) < OVERLAYS_PER_CLASS:
                    self.examples[key] = amap.detach().float().reshape(*amap.shape[-2:]).cpu()

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        """Stop the clock and note how many references the model's bank holds."""
        del trainer
        self.seconds = time.perf_counter() - self._start
        bank = getattr(getattr(pl_module, "model", None), "bank", None)
        if bank is not None and hasattr(bank, "num_refs"):
            self.bank_refs = int(bank.num_refs)


class MemoryMonitor:
    """Peak resident memory (CPU, sampled by a thread) and peak CUDA memory during a block."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> MemoryMonitor:
        import psutil

        process = psutil.Process()
        self.peak_rss = process.memory_info().rss
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

        def sample() -> None:
            while not self._stop.wait(self.interval):
                self.peak_rss = max(self.peak_rss, process.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def peak_cuda(self) -> int | None:
        """Peak CUDA memory allocated by torch in bytes (``None`` without a GPU)."""
        return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def normal_only_offsets(module, rates: tuple[float, ...] = REQUESTED_RATES) -> dict[float, float]:
    """Thresholds, per requested rate, on the scores our models output (already ``(raw − loc) / scale − tau``).

    The models subtract ``tau`` at their own ``false_alarm_rate``; another rate's threshold is the difference.
    """
    rates = tuple(sorted({*rates, float(module.false_alarm_rate)}))
    point = module.operating_point
    return {rate: point.tau(rate) - point.tau(module.false_alarm_rate) for rate in rates}


def normal_only_metrics(
    scores: torch.Tensor, labels: torch.Tensor, thresholds: dict[float, float] | None, rate: float
) -> dict[str, float]:
    """F1, false-alarm rate (normals labelled anomalous) and miss rate at the normal-only thresholds.

    ``thresholds`` maps each requested rate to the threshold on ``scores`` (``None``: all NaN); ``rate`` is the
    run's requested rate, reported in ``F1_normal_only`` / ``false_alarm_rate`` / ``miss_rate``.
    """
    names = ("F1_normal_only", "false_alarm_rate", "miss_rate",
             *(f"false_alarm_rate_at_{r:g}" for r in REQUESTED_RATES),
             *(f"F1_normal_only_at_{r:g}" for r in REQUESTED_RATES if r != 0.05))  # fmt: skip
    out = dict.fromkeys(names, float("nan"))
    if not thresholds or len(labels) == 0:
        return out
    normal, anomalous = labels == 0, labels == 1

    def at(threshold: float) -> tuple[float, float, float]:
        predicted = scores > threshold
        far = float(predicted[normal].float().mean()) if normal.any() else float("nan")
        miss = float((~predicted[anomalous]).float().mean()) if anomalous.any() else float("nan")
        return _f1(predicted, labels), far, miss

    out["F1_normal_only"], out["false_alarm_rate"], out["miss_rate"] = at(thresholds[rate])
    for requested in REQUESTED_RATES:
        if requested in thresholds:
            f1, far, _ = at(thresholds[requested])
            out[f"false_alarm_rate_at_{requested:g}"] = far
            if f"F1_normal_only_at_{requested:g}" in out:
                out[f"F1_normal_only_at_{requested:g}"] = f1
    return out


# --------------------------------------------------------------------------- metrics
def unit_scale(values: torch.Tensor) -> torch.Tensor:
    """Min-max scale to [0, 1] (rank-preserving).

    torchmetrics applies a sigmoid to scores outside [0, 1], which saturates raw anomaly scores (e.g. 20–90)
    to 1.0 and would turn every AUROC into 0.5; scaling first keeps the ranking intact.
    """
    values = values.float()
    low, high = values.min(), values.max()
    return (values - low) / (high - low) if high > low else torch.zeros_like(values)


def _auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    from torchmetrics.functional.classification import binary_auroc

    if len(labels) == 0 or labels.min() == labels.max():
        return float("nan")
    return float(binary_auroc(unit_scale(scores), labels.int()))


def _f1_max(scores: torch.Tensor, labels: torch.Tensor) -> float:
    from torchmetrics.functional.classification import binary_precision_recall_curve

    if len(labels) == 0 or labels.max() == 0:
        return float("nan")
    precision, recall, _ = binary_precision_recall_curve(unit_scale(scores), labels.int())
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    return float(f1.max())


def _f1(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    from torchmetrics.functional.classification import binary_f1_score

    if len(labels) == 0:
        return float("nan")
    return float(binary_f1_score(predicted.int(), labels.int()))


def class_metrics(
    scores: torch.Tensor,
    labels: torch.Tensor,
    threshold: float,
    probability: np.ndarray | None = None,
    maps: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
    normal_only: dict[float, float] | None = None,
    rate: float = 0.05,
) -> dict[str, float]:
    """All benchmark metrics of one class from raw per-image scores.

    Args:
        scores (torch.Tensor): raw image scores ``(N,)``.
        labels (torch.Tensor): 0 normal / 1 anomalous ``(N,)``.
        threshold (float): the model's raw image threshold (learned on source validation).
        probability (np.ndarray | None): ELPV defect probability per image; splits anomalies into clear (1.0)
            and subtle (⅓, ⅔). Defaults to ``None`` (no split).
        maps (torch.Tensor | None): anomaly maps ``(N, H, W)`` when masks exist. Defaults to ``None``.
        masks (torch.Tensor | None): ground-truth masks ``(N, H, W)``. Defaults to ``None``.
        normal_only (dict[float, float] | None): the normal-only threshold on ``scores`` per requested
            false-alarm rate (see :func:`normal_only_metrics`). Defaults to ``None`` (those columns NaN).
        rate (float): the run's requested false-alarm rate. Defaults to ``0.05``.

    Returns:
        dict[str, float]: the :data:`METRICS` (NaN where not applicable).

    Example:
        >>> out = class_metrics(torch.tensor([0.1, 0.2, 0.9, 0.8]), torch.tensor([0, 0, 1, 1]), threshold=0.5)
        >>> out["image_AUROC"], out["F1_transferred"], out["F1_oracle"]
        (1.0, 1.0, 1.0)
    """
    out = dict.fromkeys(METRICS, float("nan"))
    out["image_AUROC"] = _auroc(scores, labels)
    out["F1_transferred"] = _f1(scores > threshold, labels) if math.isfinite(threshold) else float("nan")
    out["F1_oracle"] = _f1_max(scores, labels)
    out.update(normal_only_metrics(scores, labels, normal_only, rate))
    if probability is not None:
        probability = np.asarray(probability, dtype=float)
        normal = probability == 0.0
        for name, anomalous in (("clear", probability == 1.0), ("subtle", (probability > 0) & (probability < 1))):
            rows = torch.from_numpy(np.flatnonzero(normal | anomalous))
            if anomalous.any():
                out[f"image_AUROC_{name}"] = _auroc(scores[rows], labels[rows])
    if maps is not None and masks is not None and masks.any():
        from anomalib.metrics.aupro import _AUPRO

        flat_maps, flat_masks = maps.float().flatten(), masks.flatten().int()
        out["pixel_AUROC"] = _auroc(flat_maps, flat_masks)
        aupro = _AUPRO()
        aupro.update(unit_scale(maps), masks.int())
        out["AUPRO"] = float(aupro.compute())
    return out


# --------------------------------------------------------------------------- results
@dataclass
class RunRecorder:
    """Appends result rows to ``results.csv`` after each pass and keeps timing for ``speed.csv``."""

    folder: Path
    rows: list[dict] = field(default_factory=list)
    speed: list[dict] = field(default_factory=list)

    def add(self, rows: list[dict]) -> None:
        """Append rows and rewrite the CSV (cheap; keeps partial results on interruption)."""
        import pandas as pd

        self.rows.extend(rows)
        frame = pd.DataFrame(self.rows).reindex(columns=list(COLUMNS))
        frame.to_csv(self.folder / "results.csv", index=False)

    def add_speed(self, row: dict) -> None:
        """Record the training time, test throughput and peak memory of a model on a direction."""
        import pandas as pd

        self.speed.append(row)
        pd.DataFrame(self.speed).to_csv(self.folder / "speed.csv", index=False)


def _probability_lookup(datamodule) -> dict[str, float] | None:
    samples = datamodule.test_data.samples
    if "probability" not in samples:
        return None
    return dict(zip(samples.image_path.astype(str), samples.probability.astype(float), strict=True))


def rows_from_collector(
    collector: ScoreCollector,
    datamodule,
    base: dict,
    class_filter: int | None = None,
) -> tuple[list[dict], dict[str, dict[str, torch.Tensor]]]:
    """Per-class result rows (plus a ``mean`` row with several classes) from a finished test pass."""
    scores = torch.cat(collector.scores) if collector.scores else torch.empty(0)
    labels = torch.cat(collector.labels) if collector.labels else torch.empty(0, dtype=torch.int)
    maps = torch.cat(collector.maps) if collector.maps else None
    masks = torch.cat(collector.masks) if collector.masks else None
    probability = _probability_lookup(datamodule)
    classes = np.array([datamodule.class_index("test", p) for p in collector.paths])
    names = list(datamodule.test_categories)
    rows, examples = [], {}
    indices = [class_filter] if class_filter is not None else sorted(set(classes.tolist()))
    for index in indices:
        select = torch.from_numpy(np.flatnonzero(classes == index))
        prob = None if probability is None else np.array([probability[collector.paths[i]] for i in select.tolist()])
        metrics = class_metrics(
            scores[select],
            labels[select],
            collector.threshold,
            prob,
            None if maps is None or len(maps) != len(scores) else maps[select],
            None if masks is None or len(masks) != len(scores) else masks[select],
            collector.normal_only,
            float(base.get("requested_false_alarm_rate", 0.05)),
        )
        references = datamodule.reference_paths("test", int(index))
        bad = int((~torch.isfinite(scores[select])).sum())
        if bad:  # e.g. Padim with k = 1: its per-position covariance of one image is undefined
            metrics = dict.fromkeys(METRICS, float("nan"))
        rows.append(
            {
                **base,
                "class": names[index],
                "status": f"failed: {bad} of {len(select)} scores are NaN/inf" if bad else "ok",
                "n_test": len(select),
                "n_anomalous": int(labels[select].sum()),
                **metrics,
                "bank_refs": collector.bank_refs,
                "references": ";".join(Path(p).name for p in references),
            }
        )
        position = {path: i for i, path in enumerate(collector.paths)}
        examples[names[index]] = {
            key: amap for key, amap in collector.examples.items() if classes[position[key.split("::", 1)[1]]] == index
        }
    return rows, examples


def mean_row(rows: list[dict]) -> dict:
    """Class-mean row of a pass with several target classes."""
    keys = ("direction", "model", "k_shot", "seed", "status", "threshold_from", "requested_false_alarm_rate")
    out = {key: rows[0].get(key) for key in keys}
    out["class"] = "mean"
    out["n_test"] = sum(r["n_test"] for r in rows)
    out["n_anomalous"] = sum(r["n_anomalous"] for r in rows)
    for metric in METRICS:
        values = [r[metric] for r in rows if r[metric] is not None and math.isfinite(r[metric])]
        out[metric] = float(np.mean(values)) if values else float("nan")
    return out


# --------------------------------------------------------------------------- models
def resolve_model(name: str, config: dict) -> tuple[str, dict, int | None]:
    """Base model name, constructor arguments and training epochs of ``name`` (a protocol variant or a model).

    Epochs: the variant's own ``epochs``, else the protocol's, else ``None`` (the model's ``demo_epochs``).
    """
    variant = (config.get("variants") or {}).get(name)
    if variant is not None:
        return variant["model"], dict(variant.get("args") or {}), variant.get("epochs") or config.get("epochs")
    return name, dict(config.get("model_args", {}).get(name, {})), config.get("epochs")


def build_ours(name: str, config: dict, k: int):
    """A fresh CGAD / ResAD / MetaAD / PatchKNN at the benchmark's image size (visualizer off).

    ``name`` may also be a *variant* of the protocol (``variants: {NAME: {model: MetaAD, args: {...}}}``):
    the base model built with those constructor arguments, e.g. for ablations. A variant may also set
    ``epochs`` (it overrides the protocol's and the model's demo epochs for that variant only) and
    ``image_size`` (the protocol's for that variant only, e.g. a backbone × resolution sweep in one run).
    """
    variant = (config.get("variants") or {}).get(name) or {}
    size = (int(variant.get("image_size") or config.get("image_size", 160)),) * 2
    name, options, _ = resolve_model(name, config)
    if name == "PatchKNN":
        from benchmarks.patch_knn import PatchKNN

        cls = PatchKNN
    else:
        import anomalib_cgad

        cls = getattr(anomalib_cgad, name)
    options.setdefault("false_alarm_rate", float(config.get("false_alarm_rate", 0.05)))
    return cls(pre_processor=cls.configure_pre_processor(size), k_shot=k, visualizer=False, **options)


def _engine(folder: Path, collector: ScoreCollector, **kwargs):
    from anomalib.engine import Engine

    return Engine(
        callbacks=[collector],
        logger=False,
        default_root_dir=folder,
        accelerator="auto",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@dataclass
class Context:
    """What every model run of a direction needs."""

    config: dict
    direction: dict
    folder: Path
    recorder: RunRecorder
    data_root: Path | None
    overlays: dict = field(default_factory=dict)


def _pass_name(direction: str, model: str, k: int, seed: int) -> str:
    return f"{direction}/{model}/k={k}/seed={seed}"


def _report_line(rows: list[dict], name: str, seconds: float) -> None:
    row = rows[-1]
    extra = ""
    if row.get("image_AUROC_clear") is not None and math.isfinite(row.get("image_AUROC_clear", float("nan"))):
        extra = f" (clear {row['image_AUROC_clear']:.3f}, subtle {row['image_AUROC_subtle']:.3f})"
    print(
        f"[bench] {name} {row['class']}: image AUROC {row['image_AUROC']:.3f}{extra}, "
        f"F1 transferred {row['F1_transferred']:.3f}, oracle {row['F1_oracle']:.3f}, "
        f"normal-only {row.get('F1_normal_only', float('nan')):.3f} "
        f"(false alarms {row.get('false_alarm_rate', float('nan')):.3f}) ({seconds:.0f} s)",
        flush=True,
    )


def run_ours(ctx: Context, name: str) -> None:
    """Train (once) or set up a model of ours, then validate + test it for every ``(k, seed)``."""
    config, direction = ctx.config, ctx.direction
    ks, seeds = [int(k) for k in config["k_shot"]], [int(s) for s in config["seeds"]]
    collector = ScoreCollector()
    seed_everything(int(config.get("seed", 0)), verbose=False)  # weight init, episodes: same numbers on a rerun
    model = build_ours(name, config, ks[0])  # false_alarm_rate: the protocol's (default 0.05)
    work = ctx.folder / "work" / direction["name"] / name
    epochs = resolve_model(name, config)[2] or getattr(model, "demo_epochs", 1)
    engine = _engine(work, collector, max_epochs=int(epochs), check_val_every_n_epoch=int(epochs))
    fit_dm = make_datamodule(config, direction, ks[0], seeds[0], "validate", ctx.data_root)
    with MemoryMonitor() as memory:
        start = time.perf_counter()
        engine.fit(model=model, datamodule=fit_dm)  # trains (ONE_CLASS) or only validates (PatchKNN, FEW_SHOT)
        train_seconds = time.perf_counter() - start
        test_seconds, test_images = 0.0, 0
        for k in ks:
            for seed in seeds:
                pass_start = time.perf_counter()
                model.k_shot = k
                calibrated = int(getattr(getattr(model, "operating_point", None), "calibrated_k", -1)) == k
                # A validation on the source classes with these k references: it calibrates the operating point
                # for a new k; with one for this k it would only refit the post-processor's min/max (the
                # threshold is fixed at 0), which leaves the collected scores and labels unchanged.
                if (k, seed) != (ks[0], seeds[0]) and not calibrated:
                    engine.validate(
                        model=model,
                        datamodule=make_datamodule(config, direction, k, seed, "validate", ctx.data_root),
                        verbose=False,
                    )
                test_dm = make_datamodule(config, direction, k, seed, "test", ctx.data_root)
                collector.reset()
                engine.trainer.test(model=model, datamodule=test_dm, verbose=False)
                base = {"direction": direction["name"], "model": name, "k_shot": k, "seed": seed,
                        "threshold_from": "normal-only operating point (k references + source calibration)",
                        "requested_false_alarm_rate": model.false_alarm_rate}  # fmt: skip
                rows, examples = rows_from_collector(collector, test_dm, base)
                if len(rows) > 1:
                    rows.append(mean_row(rows))
                ctx.recorder.add(rows)
                test_seconds += collector.seconds
                test_images += len(collector.paths)
                _report_line(rows, _pass_name(direction["name"], name, k, seed), time.perf_counter() - pass_start)
                if k == max(ks) and seed == seeds[0]:
                    ctx.overlays[(direction["name"], name, k, seed)] = examples
    trained = resolve_model(name, config)[0] not in BASELINES
    ctx.recorder.add_speed(_speed_row(direction["name"], name, train_seconds if trained else 0.0,
                                      test_images, test_seconds, memory))  # fmt: skip


def _speed_row(direction: str, model: str, train_s: float, images: int, seconds: float, memory) -> dict:
    return {
        "direction": direction,
        "model": model,
        "train_s": round(train_s, 1),
        "test_images": images,
        "test_images_per_s": round(images / seconds, 1) if seconds else float("nan"),
        "peak_rss_mb": round(memory.peak_rss / 2**20),
        "peak_cuda_mb": None if memory.peak_cuda is None else round(memory.peak_cuda / 2**20),
    }


def _skip_rows(
    direction: str, model: str, k: int, seed: int, classes: list[str], reason: str, prefix: str = "skipped: "
) -> list[dict]:
    return [
        {"direction": direction, "model": model, "k_shot": k, "seed": seed, "class": c, "status": prefix + reason}
        for c in classes
    ]


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
            references = cross._ref_sets["test"][index]
            self.train_data = references.subsample(cross._references[("test", index)])
            paths = cross.test_data.samples.image_path
            rows = [i for i, p in enumerate(paths) if cross.class_index("test", str(p)) == index]
            self.test_data = cross.test_data.subsample(rows)

    return ReferenceFit()


def run_peer(ctx: Context, name: str) -> None:
    """Fit an anomalib model on the k references of each target class and test it on that class."""
    from benchmarks.peers import build_peer

    config, direction = ctx.config, ctx.direction
    ks, seeds = [int(k) for k in config["k_shot"]], [int(s) for s in config["seeds"]]
    size = (int(config.get("image_size", 160)),) * 2
    train_seconds, test_seconds, test_images = 0.0, 0.0, 0
    try:
        build_peer(name, ks[0], image_size=size)
    except RuntimeError as exc:  # e.g. WinClip / AnomalyDINO weights not reachable offline
        reason = str(exc)
        print(f"[bench] {direction['name']}/{name}: skipped ({reason})", flush=True)
        for k in ks:
            for seed in seeds:
                ctx.recorder.add(_skip_rows(direction["name"], name, k, seed, direction["target_categories"], reason))
        return
    rate = float(config.get("false_alarm_rate", 0.05))
    with MemoryMonitor() as memory:
        for k in ks:
            calibration: dict = {}  # the peer's tau grid on the source classes: once per k (seeds share it)
            for seed in seeds:
                cross = make_datamodule(config, direction, k, seed, "test", ctx.data_root)
                for index, category in enumerate(cross.test_categories):
                    pass_start = time.perf_counter()
                    seed_everything(int(config.get("seed", 0)), verbose=False)  # Padim's channels, coreset draw
                    model = build_peer(name, k, image_size=size)
                    collector = ScoreCollector()
                    data = reference_fit_datamodule(cross, index, config)
                    engine = _engine(ctx.folder / "work" / direction["name"] / name, collector)
                    start = time.perf_counter()
                    try:
                        engine.fit(model=model, datamodule=data)
                        train_seconds += time.perf_counter() - start
                        collector.normal_only = peer_normal_only(model, cross, index, calibration, rate)
                        engine.trainer.test(model=model, datamodule=data, verbose=False)
                    except Exception as exc:  # a peer failing (weights fetched lazily, ...) must not end the run
                        reason = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
                        print(f"[bench] {_pass_name(direction['name'], name, k, seed)}: {reason}", flush=True)
                        ctx.recorder.add(_skip_rows(direction["name"], name, k, seed, [category], reason, prefix=""))
                        continue
                    base = {"direction": direction["name"], "model": name, "k_shot": k, "seed": seed,
                            "threshold_from": "target test set (anomalib default val split)",
                            "requested_false_alarm_rate": rate}  # fmt: skip
                    rows, examples = rows_from_collector(collector, cross, base)
                    ctx.recorder.add(rows)
                    test_seconds += collector.seconds
                    test_images += len(collector.paths)
                    _report_line(rows, _pass_name(direction["name"], name, k, seed), time.perf_counter() - pass_start)
                    if k == max(ks) and seed == seeds[0]:
                        ctx.overlays.setdefault((direction["name"], name, k, seed), {}).update(examples)
    if test_images:
        ctx.recorder.add_speed(_speed_row(direction["name"], name, train_seconds, test_images, test_seconds, memory))


PEER_CALIBRATION_DRAWS = 8  # each draw refits the peer k + 1 times (our models: 32 draws, no refit)


def peer_normal_only(model, cross, index: int, calibration: dict, rate: float) -> dict[float, float]:
    """A peer's normal-only thresholds (raw score units) on target class ``index``, per requested rate.

    The same rule as our models (:mod:`anomalib_cgad.components.operating_point`): ``(location, scale)`` from
    the k references by leave-one-out (the peer refitted on k − 1 of them), ``tau(rate)`` calibrated by
    episodes on the source classes' normal training images (refitting the peer on each draw of k; computed
    on the first call and kept in ``calibration``). The peer's state fitted on all k references is restored.
    """
    from anomalib_cgad.components.operating_point import (
        OperatingPoint,
        collect_normals,
        leave_one_out_statistics,
        normalised_normal_scores,
    )
    from benchmarks.peers import PeerBank

    peer = PeerBank(model)
    fitted = peer.keep()
    transform = model.pre_processor.transform
    device = next(model.model.parameters()).device
    try:
        if "point" not in calibration:
            normals = {c: x.to(device) for c, x in collect_normals(cross.train_data, cross.category_of).items()}
            point = OperatingPoint()
            pooled = normalised_normal_scores(peer, normals, cross.k_shot, transform, draws=PEER_CALIBRATION_DRAWS)
            point.set_calibration(pooled, cross.k_shot)
            calibration["point"] = point
        point = calibration["point"]
        references = cross.reference_images("test", index).to(device)
        location, scale = leave_one_out_statistics(peer, references, transform).tolist()
    finally:
        peer.restore(fitted)
    rates = sorted({*REQUESTED_RATES, rate})
    return {r: location + scale * point.tau(r) for r in rates}


def next_run_folder(root: str | Path, name: str) -> Path:
    """A new ``<root>/<name>/v<N>`` folder (never an existing one)."""
    return next_version_folder(Path(root) / name)


def run_benchmark(config: dict, out: str | Path = "results/benchmarks") -> Path:
    """Run a resolved configuration (see :func:`load_config`); return the run folder.

    Example:
        >>> folder = run_benchmark(load_config(preset="elpv", quick=True))  # doctest: +SKIP
    """
    from benchmarks.report import write_report

    validate_config(config)
    folder = next_run_folder(out, config["name"])
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    recorder = RunRecorder(folder)
    overlays: dict = {}
    started = time.perf_counter()
    print(f"[bench] {config['name']}: models {config['models']}, k {config['k_shot']}, seeds {config['seeds']}; "
          f"results in {folder}", flush=True)  # fmt: skip
    for direction in config["directions"]:
        data_root = generate_data(config, direction, folder)
        for name in config["models"]:
            ctx = Context(config, direction, folder, recorder, data_root, overlays)
            if name in PEERS:
                run_peer(ctx, name)
            else:
                run_ours(ctx, name)
    elapsed = time.perf_counter() - started
    write_report(folder, recorder, overlays, config, elapsed)
    print((folder / "summary.md").read_text())
    print(f"[bench] finished in {elapsed / 60:.1f} min; results in {folder}", flush=True)
    return folder


def describe(value: Any) -> str:  # pragma: no cover - convenience for the CLI
    """Short YAML text of a configuration."""
    return yaml.safe_dump(value, sort_keys=False)
