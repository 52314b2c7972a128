"""Benchmark results: the rows of ``results.csv`` / ``speed.csv``, written after every pass by :class:`RunRecorder`.

The report at the end of a run (``summary.md``, plots, ``speed.md``) is :mod:`benchmarks.report`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from benchmarks.metrics import METRICS, class_metrics

if TYPE_CHECKING:
    from benchmarks.collection import MemoryMonitor, ScoreCollector

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


def speed_row(direction: str, model: str, train_s: float, images: int, seconds: float, memory: MemoryMonitor) -> dict:
    """One ``speed.csv`` row: training seconds, test images and throughput, peak memory of a model on a direction."""
    return {
        "direction": direction,
        "model": model,
        "train_s": round(train_s, 1),
        "test_images": images,
        "test_images_per_s": round(images / seconds, 1) if seconds else float("nan"),
        "peak_rss_mb": round(memory.peak_rss / 2**20),
        "peak_cuda_mb": None if memory.peak_cuda is None else round(memory.peak_cuda / 2**20),
    }


def skip_rows(
    direction: str, model: str, k: int, seed: int, classes: list[str], reason: str, prefix: str = "skipped: "
) -> list[dict]:
    """One row per class of a pass that did not run (``status`` = ``prefix`` + ``reason``, metrics empty)."""
    return [
        {"direction": direction, "model": model, "k_shot": k, "seed": seed, "class": c, "status": prefix + reason}
        for c in classes
    ]
