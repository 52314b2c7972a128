"""The embedded cross-class demo: train on some classes, detect defects on an unseen class from k references.

With the ``elpv`` extra installed it trains on monocrystalline ELPV solar cells and tests on polycrystalline
ones (real electroluminescence images, image-level labels); otherwise it generates a small MVTecAD-format
dataset and holds one texture class out. Results (per-class metrics CSV, a markdown table, a bar chart and
anomalib's visualizer images) go to a new versioned folder under ``--out``; nothing is overwritten.

Example:
    $ anomalib-cgad demo                       # CGAD, ELPV mono -> poly, k = 4
    $ anomalib-cgad demo --model ResAD --dataset synthetic --k-shot 2
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)

SYNTHETIC_SOURCES = ["stripes", "dots", "checker"]
SYNTHETIC_TARGETS = ["waves"]


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``demo`` options to ``parser``."""
    parser.add_argument("--model", default="CGAD", help="CGAD (default), ResAD or MetaAD")
    parser.add_argument(
        "--dataset",
        default="auto",
        choices=["auto", "elpv", "synthetic"],
        help="auto = ELPV when the 'elpv' extra is installed, else generated data",
    )
    parser.add_argument("--k-shot", type=int, default=4, help="normal reference images of the unseen class")
    parser.add_argument("--reference-seed", type=int, default=0, help="which k references are drawn")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of weight initialisation and training (same seed, same numbers)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the model's demo preset)")
    parser.add_argument("--image-size", type=int, default=160, help="square input size (160 keeps the CPU demo short)")
    parser.add_argument("--out", default="results/demo", help="results root; each run gets a new v<N> folder")
    parser.set_defaults(func=run_demo)


def _next_version(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name[1:]) for p in root.glob("v*") if p.name[1:].isdigit()]
    path = root / f"v{max(taken, default=-1) + 1}"
    path.mkdir()
    return path


def build_datamodule(dataset: str, out: Path, k_shot: int, reference_seed: int, image_size: int):
    """Return the demo's CrossClass datamodule and a short description of the protocol."""
    from anomalib_cgad.data import CrossClass, make_synthetic_mvtec

    if dataset == "auto":
        dataset = "elpv" if importlib.util.find_spec("elpv_dataset") else "synthetic"
    common = {"k_shot": k_shot, "reference_seed": reference_seed, "num_workers": 0}
    if dataset == "elpv":
        datamodule = CrossClass(
            source_dataset="ELPV",
            source_categories=["mono"],
            target_categories=["poly"],
            train_batch_size=16,
            eval_batch_size=16,
            **common,
        )
        return datamodule, "ELPV: train on mono, test on unseen poly"
    root = make_synthetic_mvtec(out / "data", categories=(*SYNTHETIC_SOURCES, *SYNTHETIC_TARGETS), seed=0)
    datamodule = CrossClass(
        source_dataset="MVTecAD",
        source_root=str(root),
        source_categories=SYNTHETIC_SOURCES,
        target_categories=SYNTHETIC_TARGETS,
        train_batch_size=8,
        eval_batch_size=8,
        **common,
    )
    return datamodule, f"generated data: train on {SYNTHETIC_SOURCES}, test on unseen {SYNTHETIC_TARGETS}"


def plot_class_bars(
    values: dict[str, dict[str, float]],
    path: Path,
    title: str,
    ylabel: str = "image AUROC",
    errors: dict[str, dict[str, float]] | None = None,
) -> Path:
    """Grouped bar chart: one group per class, one bar per series (model), with an optional error bar.

    Shared by the demo report and the benchmark report (``benchmarks/report.py``).

    Args:
        values (dict[str, dict[str, float]]): ``{series: {class: value}}``.
        path (Path): PNG file to write.
        title (str): figure title.
        ylabel (str): y axis label. Defaults to ``"image AUROC"``.
        errors (dict[str, dict[str, float]] | None): ``{series: {class: std}}``. Defaults to ``None``.

    Returns:
        Path: ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    series = list(values)
    classes = list(dict.fromkeys(c for s in series for c in values[s]))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(classes) * max(len(series), 1) * 0.5 + 2.5), 3.8))
    positions = np.arange(len(classes))
    for i, name in enumerate(series):
        heights = [values[name].get(c, float("nan")) for c in classes]
        err = [errors[name].get(c, 0.0) for c in classes] if errors and name in errors else None
        ax.bar(positions + (i - (len(series) - 1) / 2) * width, heights, width, yerr=err, capsize=2, label=name)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(positions, classes, rotation=20 if len(classes) > 4 else 0, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=7, ncol=max(1, len(series) // 4))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(metrics: dict[str, float], categories: list[str], folder: Path, title: str) -> None:
    """Write ``metrics.csv``, ``metrics.md`` and ``per_class_auroc.png`` for the per-class test metrics."""
    import pandas as pd

    names = sorted({key.split("/")[0] for key in metrics})
    rows = [{"class": c, **{n: metrics.get(f"{n}/{c}") for n in names}} for c in categories]
    rows.append({"class": "mean", **{n: metrics.get(n) for n in names}})
    frame = pd.DataFrame(rows)
    frame.to_csv(folder / "metrics.csv", index=False)
    (folder / "metrics.md").write_text(f"# {title}\n\n" + frame.to_markdown(index=False, floatfmt=".3f") + "\n")
    if "image_AUROC" in names:
        values = {"image AUROC": {c: metrics.get(f"image_AUROC/{c}", float("nan")) for c in categories}}
        plot_class_bars(values, folder / "per_class_auroc.png", title)


def run_demo(args: argparse.Namespace) -> dict[str, float]:
    """Train the chosen model on the source classes and test it on the unseen target classes."""
    from anomalib.engine import Engine
    from anomalib.models import get_model
    from lightning.pytorch import seed_everything

    # The models seed their own episodes, references and synthetic anomalies, but weight initialisation (and the
    # flow's random rotations, drawn with numpy) use the global generators: without this, two runs differed by up
    # to 0.004 image AUROC and 0.05 F1.
    seed_everything(args.seed, workers=True, verbose=False)
    out = _next_version(Path(args.out))
    datamodule, title = build_datamodule(args.dataset, out, args.k_shot, args.reference_seed, args.image_size)
    model_class = type(get_model(args.model))
    size = (args.image_size, args.image_size)
    model = model_class(pre_processor=model_class.configure_pre_processor(size))
    epochs = args.epochs if args.epochs is not None else getattr(model, "demo_epochs", 1)
    print(f"anomalib-cgad demo: {args.model}, {title}, k={args.k_shot}, {epochs} epoch(s); results in {out}")
    # Validation (which calibrates the operating point on the source classes) runs once, after the last epoch.
    engine = Engine(
        max_epochs=epochs, default_root_dir=out, accelerator="auto", devices=1, check_val_every_n_epoch=epochs
    )
    start = time.perf_counter()
    engine.train(model=model, datamodule=datamodule)
    elapsed = time.perf_counter() - start
    results = engine.trainer.callback_metrics
    metrics = {
        key: float(value) for key, value in results.items() if "/" in key or key.startswith(("image_", "pixel_"))
    }
    write_report(metrics, list(datamodule.test_categories), out, f"{args.model}, {title}, k={args.k_shot}")
    print((out / "metrics.md").read_text())
    print(
        f"image_F1Score and image_FalseAlarmRate: labels at the normal-only operating point (threshold from the k "
        f"references of each unseen class, requested false-alarm rate {model.false_alarm_rate:g}; no anomalous "
        "image of that class used)."
    )
    print(f"train + test took {elapsed:.0f} s; per-class CSV, table and plot in {out}")
    return metrics


def main() -> None:  # pragma: no cover - thin wrapper
    """Run the demo with default arguments (``python -m anomalib_cgad.demo``)."""
    parser = argparse.ArgumentParser(prog="python -m anomalib_cgad.demo")
    add_demo_arguments(parser)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
