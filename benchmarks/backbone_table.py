"""Backbone × resolution table from one or more benchmark runs whose models are variants with a backbone.

A sweep such as the ``elpv_backbones`` preset may be split over several processes (``--models`` of one
share each); this merges their run folders and writes, into a new folder:

1. ``results.csv`` and ``speed.csv``: the runs' rows, concatenated;
2. ``summary.md``: every metric, variant × k, per direction (the runner's own tables);
3. ``table.md``: one row per (backbone, image size): image AUROC per direction and their mean, the clear-defect
   AUROC, test milliseconds per image and peak resident memory (both from the runner's ``speed.csv``: the
   whole test pass, data loading and nearest-reference search included, on whatever machine load there was)
   and the backbone's arithmetic per image (``torch.utils.flop_counter``, which no machine load changes).
   When the variants belong to more than one model (e.g. CGAD, ResAD and PatchKNN), the rows are
   (model, backbone, image size) and a ``model`` column comes first; when a model was trained, a ``train s``
   column (training seconds summed over the directions); a direction without clear/subtle labels
   (generated data) gets no ``clear`` column.

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
    return {name: setting[1:] for name, setting in variant_models(folders).items()}


def variant_models(folders: list[Path]) -> dict[str, tuple[str, str, int]]:
    """``{variant: (model, backbone, image size)}`` from the runs' ``config.yaml``."""
    settings = {}
    for folder in folders:
        config = yaml.safe_load((folder / "config.yaml").read_text())
        for name, variant in (config.get("variants") or {}).items():
            backbone = (variant.get("args") or {}).get("backbone", "tf_efficientnet_lite0")
            size = int(variant.get("image_size") or config.get("image_size", 160))
            settings[name] = (str(variant.get("model")), backbone, size)
    return settings


def backbone_gflop(backbone: str, size: int) -> float:
    """GFLOP of one ``size``² image through the models' default stages of ``backbone`` (weights do not matter)."""
    import torch

    from anomalib_cgad.components.backbone import FeatureExtractor

    extractor = FeatureExtractor(backbone, weights=None)
    return flops_per_image(extractor, torch.rand(1, 3, size, size))[0] / 1e9


def backbone_table(
    results: pd.DataFrame,
    speed: pd.DataFrame,
    settings: dict[str, tuple[str, int]],
    models: dict[str, str] | None = None,
) -> str:
    """Markdown table: (backbone, size) rows; AUROC mean ± std over seeds per direction; speed and memory.

    ``models`` (``{variant: base model}``): with more than one base model, rows are (model, backbone, size) and
    a ``model`` column comes first.
    """
    per_pass = class_mean_frame(results[results.status == "ok"])
    directions = list(dict.fromkeys(results.direction))
    models = models or {}
    with_model = len({models.get(name) for name in settings if name in set(per_pass.model)}) > 1
    clear_dirs = [d for d in directions if per_pass[per_pass.direction == d].image_AUROC_clear.notna().any()]
    trained = "train_s" in speed and bool((speed.train_s.fillna(0) > 0).any())
    header = (["model"] if with_model else []) + ["backbone", "px"]
    header += [f"AUROC {d}" for d in directions] + ["AUROC mean"]
    header += [f"clear {d}" for d in clear_dirs] + (["train s"] if trained else [])
    header += ["test ms / image", "peak RSS MB", "backbone GFLOP / image"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in sorted(settings, key=lambda name: (str(models.get(name)), *settings[name])):
        rows = per_pass[per_pass.model == model]
        if rows.empty:
            continue
        backbone, size = settings[model]
        auroc = [_fmt(rows[rows.direction == d].image_AUROC.tolist()) for d in directions]
        means = [rows[rows.direction == d].image_AUROC.mean() for d in directions]
        clear = [_fmt(rows[rows.direction == d].image_AUROC_clear.dropna().tolist()) for d in clear_dirs]
        timing = speed[speed.model == model]
        images, seconds = timing.test_images.sum(), (timing.test_images / timing.test_images_per_s).sum()
        ms = f"{1000 * seconds / images:.0f}" if images else "–"
        rss = f"{timing.peak_rss_mb.max():.0f}" if not timing.empty else "–"
        train = ([f"{timing.train_s.sum():.0f}" if not timing.empty else "–"]) if trained else []
        mean = f"{sum(means) / len(means):.3f}" if all(pd.notna(means)) else "–"
        gflop = f"{backbone_gflop(backbone, size):.2f}"
        first = [str(models.get(model))] if with_model else []
        cells = [*first, backbone, str(size), *auroc, mean, *clear, *train, ms, rss, gflop]
        lines.append("| " + " | ".join(cells) + " |")
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
    full = variant_models(folders)
    settings = {name: setting[1:] for name, setting in full.items()}
    order = sorted(full, key=lambda name: full[name])
    models = [name for name in order if name in set(results.model)]
    out.mkdir(parents=True, exist_ok=True)
    results.to_csv(out / "results.csv", index=False)
    speed.to_csv(out / "speed.csv", index=False)
    (out / "summary.md").write_text(summary_tables(results, models))
    bases = {name: setting[0] for name, setting in full.items()}
    (out / "table.md").write_text(backbone_table(results, speed, settings, bases))
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
