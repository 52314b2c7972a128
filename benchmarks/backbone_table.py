"""Backbone × resolution table from one or more benchmark runs whose models are variants with a backbone.

A sweep such as the ``elpv_backbones`` preset may be split over several processes (``--models`` of one
share each); this merges their run folders and writes, into a new folder:

1. ``results.csv`` and ``speed.csv``: the runs' rows, concatenated;
2. ``summary.md``: every metric, variant × k, per direction (the runner's own tables);
3. ``table.md``: one row per (backbone, image size): image AUROC per direction and their mean, the clear-defect
   AUROC, test milliseconds per image and peak resident memory (both from the runner's ``speed.csv``: the
   whole test pass, data loading and nearest-reference search included, on whatever machine load there was)
   and the backbone's arithmetic per image (``torch.utils.flop_counter``, which no machine load changes).

Example:
    $ python -m benchmarks.backbone_table runs/a/elpv_backbones/v0 runs/b/elpv_backbones/v0 \\
        --out benchmarks/results/elpv_backbones
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import yaml

from benchmarks.deploy_speed import flops_per_image
from benchmarks.report import _fmt, class_mean_frame, summary_tables

OUTPUTS = ("results.csv", "speed.csv", "summary.md", "table.md")


def variant_settings(folders: list[Path]) -> dict[str, tuple[str, int]]:
    """``{variant: (backbone, image size)}`` from the runs' ``config.yaml``."""
    settings = {}
    for folder in folders:
        config = yaml.safe_load((folder / "config.yaml").read_text())
        for name, variant in (config.get("variants") or {}).items():
            backbone = (variant.get("args") or {}).get("backbone", "tf_efficientnet_lite0")
            settings[name] = (backbone, int(variant.get("image_size") or config.get("image_size", 160)))
    return settings


def backbone_gflop(backbone: str, size: int) -> float:
    """GFLOP of one ``size``² image through the models' default stages of ``backbone`` (weights do not matter)."""
    import torch

    from anomalib_cgad.components.backbone import FeatureExtractor

    extractor = FeatureExtractor(backbone, weights=None)
    return flops_per_image(extractor, torch.rand(1, 3, size, size))[0] / 1e9


def backbone_table(results: pd.DataFrame, speed: pd.DataFrame, settings: dict[str, tuple[str, int]]) -> str:
    """Markdown table: (backbone, size) rows; AUROC mean ± std over seeds per direction; speed and memory."""
    per_pass = class_mean_frame(results[results.status == "ok"])
    directions = list(dict.fromkeys(results.direction))
    header = ["backbone", "px"]
    header += [f"AUROC {d}" for d in directions] + ["AUROC mean"]
    header += [f"clear {d}" for d in directions] + ["test ms / image", "peak RSS MB", "backbone GFLOP / image"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in sorted(settings, key=lambda name: settings[name]):
        rows = per_pass[per_pass.model == model]
        if rows.empty:
            continue
        backbone, size = settings[model]
        auroc = [_fmt(rows[rows.direction == d].image_AUROC.tolist()) for d in directions]
        means = [rows[rows.direction == d].image_AUROC.mean() for d in directions]
        clear = [_fmt(rows[rows.direction == d].image_AUROC_clear.dropna().tolist()) for d in directions]
        timing = speed[speed.model == model]
        images, seconds = timing.test_images.sum(), (timing.test_images / timing.test_images_per_s).sum()
        ms = f"{1000 * seconds / images:.0f}" if images else "–"
        rss = f"{timing.peak_rss_mb.max():.0f}" if not timing.empty else "–"
        mean = f"{sum(means) / len(means):.3f}" if all(pd.notna(means)) else "–"
        gflop = f"{backbone_gflop(backbone, size):.2f}"
        lines.append("| " + " | ".join([backbone, str(size), *auroc, mean, *clear, ms, rss, gflop]) + " |")
    return "\n".join(lines) + "\n"


def merge(folders: list[Path], out: Path) -> Path:
    """Merge the run ``folders`` into ``out`` (a new folder, or one without these outputs); return ``out``."""
    existing = [str(out / name) for name in OUTPUTS if (out / name).exists()]
    if existing:
        msg = f"Refusing to overwrite {existing}: choose another --out."
        raise FileExistsError(msg)
    missing = [str(folder) for folder in folders if not (folder / "results.csv").is_file()]
    if missing:
        msg = f"No results.csv in {missing}: pass benchmark run folders (…/<preset>/v<N>)."
        raise FileNotFoundError(msg)
    results = pd.concat([pd.read_csv(folder / "results.csv") for folder in folders], ignore_index=True)
    speeds = [pd.read_csv(folder / "speed.csv") for folder in folders if (folder / "speed.csv").is_file()]
    speed = pd.concat(speeds, ignore_index=True) if speeds else pd.DataFrame(columns=["model"])
    settings = variant_settings(folders)
    models = [name for name in sorted(settings, key=lambda name: settings[name]) if name in set(results.model)]
    out.mkdir(parents=True, exist_ok=True)
    results.to_csv(out / "results.csv", index=False)
    speed.to_csv(out / "speed.csv", index=False)
    (out / "summary.md").write_text(summary_tables(results, models))
    (out / "table.md").write_text(backbone_table(results, speed, settings))
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: run folders → merged folder; prints the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.backbone_table", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="benchmark run folders (…/<preset>/v<N>)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the merged files into")
    args = parser.parse_args(argv)
    print((merge(args.runs, args.out) / "table.md").read_text())


if __name__ == "__main__":
    main()
