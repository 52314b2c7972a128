"""Benchmark report: summary tables (mean ± std over seeds), plots, anomaly-map overlays and the speed table.

Files written into the run folder (``results.csv`` and ``speed.csv`` are written by the runner as it goes):

- ``summary.md``: with several directions first each metric averaged over them (mean ± std over directions);
  then per direction and metric, a model × k table of the class-mean metric, mean ± std over reference
  seeds; skipped models with their reason; the run's wall time;
- ``auroc_vs_k_<direction>.png``: image AUROC against k, one line per model, error bars over seeds;
- ``per_class_bar.png``: image AUROC per target class and model at the largest k (seed mean ± std);
- ``false_alarm_rate.png``: achieved vs requested false-alarm rate at the normal-only operating point, per
  model (mean ± std over directions and seeds), with the ±0.05 band; the table "Normal-only operating
  point" in ``summary.md`` gives the same numbers with F1 against the oracle F1;
- ``overlays/<direction>_<model>_k<k>_s<seed>.png``: a few test images with their anomaly map (anomalib's
  ``visualize_anomaly_map`` + ``overlay_image``);
- ``speed.md``: training time, test throughput and peak memory per model and direction.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.metrics import REQUESTED_RATES  # the achieved-vs-requested columns false_alarm_rate_at_<rate>

SUMMARY_METRICS = (
    ("image_AUROC", "image AUROC (all test images)"),
    ("image_AUROC_clear", "image AUROC, clear defects vs normals"),
    ("image_AUROC_subtle", "image AUROC, subtle defects vs normals"),
    ("pixel_AUROC", "pixel AUROC"),
    ("AUPRO", "AUPRO"),
    ("F1_transferred", "image F1 at the transferred threshold"),
    ("F1_oracle", "image F1 at the best threshold on the test class (F1Max)"),
    ("F1_normal_only", "image F1 at the normal-only operating point (k references + source calibration)"),
    ("false_alarm_rate", "false-alarm rate at the normal-only operating point (normal test images labelled anomalous)"),
    ("miss_rate", "miss rate at the normal-only operating point (defective test images labelled normal)"),
)


def _fmt(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def class_mean_frame(frame):
    """Rows of successful passes, one per (direction, model, k, seed): the class mean (or the single class)."""
    import pandas as pd

    ok = frame[frame.status == "ok"]
    means = ok[ok["class"] == "mean"]
    single = ok.groupby(["direction", "model", "k_shot", "seed"]).filter(lambda g: len(g) == 1)
    return pd.concat([means, single]) if len(means) else single


def _metric_tables(part, models: list[str], ks: list[int], spread: str, cell) -> list[str]:
    """Markdown lines: for each metric with values in ``part``, a model × k table of ``cell(rows, k, metric)``."""
    lines: list[str] = []
    for metric, title in SUMMARY_METRICS:
        if metric not in part or part[metric].isna().all():
            continue
        lines.append(f"**{title}** (`{metric}`; {spread})\n")
        lines.append("| model | " + " | ".join(f"k={k}" for k in ks) + " |")
        lines.append("|---|" + "---|" * len(ks))
        for model in models:
            rows = part[part.model == model]
            if not rows.empty:
                lines.append(f"| {model} | " + " | ".join(cell(rows, k, metric) for k in ks) + " |")
        lines.append("")
    return lines


def summary_tables(frame, models: list[str]) -> str:
    """Markdown: per direction and metric, model rows × k columns, mean ± std over seeds."""
    per_pass = class_mean_frame(frame)
    ks = sorted(int(k) for k in frame.k_shot.dropna().unique())
    lines: list[str] = []
    for direction in dict.fromkeys(frame.direction):
        lines.append(f"## {direction}\n")
        lines += _metric_tables(
            per_pass[per_pass.direction == direction],
            models,
            ks,
            "mean ± std over reference seeds",
            lambda rows, k, metric: _fmt(rows[rows.k_shot == k][metric].tolist()),
        )
        skipped = frame[(frame.direction == direction) & (frame.status != "ok")]
        for model, reason in dict(zip(skipped.model, skipped.status, strict=True)).items():
            lines.append(f"- **{model}**: {reason}")
        if not skipped.empty:
            lines.append("")
    return "\n".join(lines)


def plot_auroc_vs_k(frame, folder: Path, models: list[str]) -> list[Path]:
    """One PNG per direction: class-mean image AUROC vs k, one line per model, error bars over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_pass = class_mean_frame(frame)
    paths = []
    for direction in dict.fromkeys(frame.direction):
        part = per_pass[per_pass.direction == direction]
        if part.empty:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for model in models:
            rows = part[part.model == model]
            if rows.empty:
                continue
            grouped = rows.groupby("k_shot")["image_AUROC"]
            ks = sorted(grouped.groups)
            mean = [grouped.get_group(k).mean() for k in ks]
            std = [grouped.get_group(k).std(ddof=1) if len(grouped.get_group(k)) > 1 else 0.0 for k in ks]
            ax.errorbar(ks, mean, yerr=std, marker="o", capsize=3, label=model)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(part.k_shot.unique()), [str(int(k)) for k in sorted(part.k_shot.unique())])
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("k (normal reference images of the unseen class)")
        ax.set_ylabel("image AUROC")
        ax.set_title(f"{direction}: image AUROC vs k", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / f"auroc_vs_k_{direction}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_per_class(frame, folder: Path, models: list[str]) -> Path | None:
    """Image AUROC per target class (``direction:class``) and model at the largest k, seed mean ± std."""
    from anomalib_cgad.demo import plot_class_bars

    ok = frame[(frame.status == "ok") & (frame["class"] != "mean")]
    if ok.empty:
        return None
    k = int(ok.k_shot.max())
    ok = ok[ok.k_shot == k]
    values: dict[str, dict[str, float]] = {}
    errors: dict[str, dict[str, float]] = {}
    for model in models:
        rows = ok[ok.model == model]
        for (direction, category), group in rows.groupby(["direction", "class"], sort=False):
            label = f"{direction}:{category}"
            values.setdefault(model, {})[label] = float(group.image_AUROC.mean())
            errors.setdefault(model, {})[label] = float(group.image_AUROC.std(ddof=1)) if len(group) > 1 else 0.0
    return plot_class_bars(values, folder / "per_class_bar.png", f"image AUROC per class, k={k}", errors=errors)


def write_overlays(overlays: dict, folder: Path, size: int = 160) -> list[Path]:
    """Grids of test images with their anomaly maps (anomalib's visualisation helpers)."""
    from anomalib.visualization.image.functional import (
        add_text_to_image,
        create_image_grid,
        overlay_image,
        visualize_anomaly_map,
    )
    from PIL import Image

    target = folder / "overlays"
    paths = []
    for (direction, model, k, seed), per_class in overlays.items():
        tiles = []
        every = [amap for examples in per_class.values() for amap in examples.values()]
        if not every:
            continue
        low = min(float(a.min()) for a in every)
        high = max(float(a.max()) for a in every)
        for category, examples in per_class.items():
            for key, amap in examples.items():
                label, path = key.split("::", 1)
                with Image.open(path) as image:
                    base = image.convert("RGB").resize((size, size))
                # one scale for the grid (normal images stay calm); raw maps are not in [0, 1] and
                # to_pil_image would wrap values > 1 around
                scaled = ((amap - low) / (high - low) if high > low else amap * 0).clamp(0, 1)
                heat = visualize_anomaly_map(scaled, colormap=True).resize((size, size))
                tile = overlay_image(base, heat, alpha=0.45)
                text = f"{category} {'defect' if label == '1' else 'normal'}"
                tiles.append(add_text_to_image(tile.convert("RGB"), text, size=12))
        if not tiles:
            continue
        target.mkdir(exist_ok=True)
        out = target / f"{direction}_{model}_k{k}_s{seed}.png"
        create_image_grid(tiles, nrow=min(len(tiles), 6)).save(out)
        paths.append(out)
    return paths


def across_directions_tables(frame, models: list[str]) -> str:
    """Markdown, for runs of several directions (leave-one-class-out): each metric averaged over directions.

    A cell is the mean over directions of the per-direction seed mean, ± its std over directions (how much
    the answer depends on which class is held out). A model with results in only some directions for a k
    says in how many, e.g. ``0.812 ± 0.050 (4/5)``.
    """
    directions = list(dict.fromkeys(frame.direction))
    if len(directions) < 2:
        return ""
    ks = sorted(int(k) for k in frame.k_shot.dropna().unique())

    def cell(rows, k: int, metric: str) -> str:
        means = rows[rows.k_shot == k].groupby("direction")[metric].mean().dropna()
        text = _fmt(means.tolist())
        return text + (f" ({len(means)}/{len(directions)})" if 0 < len(means) < len(directions) else "")

    lines = [f"## All {len(directions)} directions\n"]
    lines += _metric_tables(class_mean_frame(frame), models, ks, "mean ± std over directions of the seed mean", cell)
    return "\n".join(lines) + "\n"


def _achieved(part, rate: float):
    column = f"false_alarm_rate_at_{rate:g}"
    return part[column].dropna() if column in part else part.iloc[0:0]


def operating_point_table(frame, models: list[str]) -> str:
    """Markdown: per model (largest k), F1 at the normal-only operating point against the oracle F1, the
    worst reference draw, and the achieved false-alarm rate at each requested rate (mean ± std over
    directions × seeds of the class-mean rows)."""
    per_pass = class_mean_frame(frame)
    if "F1_normal_only" not in per_pass or per_pass["F1_normal_only"].isna().all():
        return ""
    k = int(per_pass.k_shot.max())
    part = per_pass[per_pass.k_shot == k]
    rates = " | ".join(f"FAR at {r:g}" for r in REQUESTED_RATES)
    lines = [
        f"## Normal-only operating point (k = {k}; mean ± std over directions × reference seeds)\n",
        f"| model | F1 normal-only | F1 oracle | oracle − normal-only | worst draw | miss rate | {rates} |",
        "|---|---|---|---|---|---|" + "---|" * len(REQUESTED_RATES),
    ]
    for model in models:
        rows = part[part.model == model].dropna(subset=["F1_normal_only"])
        if rows.empty:
            continue
        gap = (rows.F1_oracle - rows.F1_normal_only).tolist()
        cells = [
            _fmt(rows.F1_normal_only.tolist()), _fmt(rows.F1_oracle.tolist()), _fmt(gap),
            f"{rows.F1_normal_only.min():.3f}", _fmt(rows.miss_rate.tolist()),
            *(_fmt(_achieved(rows, r).tolist()) for r in REQUESTED_RATES),
        ]  # fmt: skip
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n"


def plot_false_alarm_rate(frame, folder: Path, models: list[str]) -> Path | None:
    """Achieved vs requested false-alarm rate per model (largest k), mean ± std over directions × seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_pass = class_mean_frame(frame)
    if per_pass.empty or f"false_alarm_rate_at_{REQUESTED_RATES[0]:g}" not in per_pass:
        return None
    part = per_pass[per_pass.k_shot == per_pass.k_shot.max()]
    fig, ax = plt.subplots(figsize=(5.0, 4.0))
    grid = np.array([0.0, max(REQUESTED_RATES) * 1.2])
    ax.fill_between(grid, grid - 0.05, grid + 0.05, color="grey", alpha=0.15, label="±0.05")
    ax.plot(grid, grid, color="grey", linestyle="--", linewidth=1)
    for offset, model in enumerate(models):
        rows = part[part.model == model]
        values = [_achieved(rows, r) for r in REQUESTED_RATES]
        if rows.empty or all(v.empty for v in values):
            continue
        shift = (offset - len(models) / 2) * 0.0015  # separate the error bars
        ax.errorbar([r + shift for r in REQUESTED_RATES], [v.mean() for v in values],
                    yerr=[v.std(ddof=1) if len(v) > 1 else 0.0 for v in values], marker="o", capsize=3,
                    label=model)  # fmt: skip
    ax.set_xlabel("requested false-alarm rate")
    ax.set_ylabel("achieved (unseen class, normal test images)")
    ax.set_title("normal-only operating point: achieved vs requested", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = folder / "false_alarm_rate.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _eval_text(limit: int | None) -> str:
    if not limit:
        return "all evaluation images"
    return f"at most {limit} normal + {limit} defective evaluation images per class (fixed draw)"


def write_report(folder: Path, recorder: Any, overlays: dict, config: dict, elapsed: float) -> None:
    """Write ``summary.md``, the plots, the overlays and ``speed.md`` for a finished run."""
    import pandas as pd

    frame = pd.DataFrame(recorder.rows)
    models = list(config["models"])
    header = (
        f"# Benchmark `{config['name']}`\n\n"
        f"models {models}, k {config['k_shot']}, reference seeds {config['seeds']}, image size "
        f"{config.get('image_size', 160)}, epochs {config.get('epochs') or 'model default'}, "
        f"{_eval_text(config.get('max_eval_per_class'))}; "
        f"wall time {elapsed / 60:.1f} min.\n\n"
    )
    summary = operating_point_table(frame, models) + across_directions_tables(frame, models)
    summary += summary_tables(frame, models)
    (folder / "summary.md").write_text(header + summary + "\n")
    if not frame.empty and (frame.status == "ok").any():
        plot_auroc_vs_k(frame, folder, models)
        plot_per_class(frame, folder, models)
        plot_false_alarm_rate(frame, folder, models)
    write_overlays(overlays, folder, size=int(config.get("image_size", 160)))
    if recorder.speed:
        speed = pd.DataFrame(recorder.speed)
        (folder / "speed.md").write_text(
            "# Speed and memory\n\n"
            "train_s: training (ours) / fitting on the references, all passes (peers); test_images_per_s: test "
            "passes only; peak_rss_mb: peak resident memory of the process during the model's runs; "
            "peak_cuda_mb: torch peak CUDA memory (empty on CPU).\n\n" + speed.to_markdown(index=False) + "\n"
        )


def merge_runs(folders: list[Path], out: Path) -> Path:
    """One report from runs of the same protocol split over processes (e.g. ``--directions`` per process).

    Concatenates ``results.csv`` and ``speed.csv``, takes the first run's ``config.yaml`` with the union of
    the runs' directions (each once, also when runs split by model) and models, copies the overlays and
    rewrites ``summary.md`` and the plots. The wall time is the longest run's (they ran side by side).
    ``out`` must not exist (nothing is overwritten).
    """
    import re
    import shutil
    from types import SimpleNamespace

    import pandas as pd
    import yaml

    folders = [Path(f) for f in folders]
    out = Path(out)
    if out.exists():
        msg = f"Refusing to overwrite '{out}'; choose a new folder."
        raise FileExistsError(msg)
    configs = [yaml.safe_load((f / "config.yaml").read_text()) for f in folders]
    config = dict(configs[0])
    # runs split by model repeat the same directions: keep each direction once, in first-seen order
    directions: dict[str, dict] = {}
    for c in configs:
        for d in c["directions"]:
            directions.setdefault(d["name"], d)
    config["directions"] = list(directions.values())
    config["models"] = list(dict.fromkeys(m for c in configs for m in c["models"]))
    rows = pd.concat([pd.read_csv(f / "results.csv") for f in folders], ignore_index=True)
    speed = [pd.read_csv(f / "speed.csv") for f in folders if (f / "speed.csv").is_file()]
    minutes = [
        float(m.group(1))
        for f in folders
        if (f / "summary.md").is_file() and (m := re.search(r"wall time ([0-9.]+) min", (f / "summary.md").read_text()))
    ]
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    rows.to_csv(out / "results.csv", index=False)
    if speed:
        pd.concat(speed, ignore_index=True).to_csv(out / "speed.csv", index=False)
    for folder in folders:
        for png in sorted((folder / "overlays").glob("*.png")):
            (out / "overlays").mkdir(exist_ok=True)
            shutil.copy2(png, out / "overlays" / png.name)
    recorder = SimpleNamespace(rows=rows.to_dict("records"), speed=pd.concat(speed).to_dict("records") if speed else [])
    write_report(out, recorder, {}, config, 60 * max(minutes, default=0.0))
    return out
