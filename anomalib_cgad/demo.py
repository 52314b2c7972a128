"""The embedded cross-class demo: train on some classes, detect defects on an unseen class from k references.

With the ``elpv`` extra installed it trains on monocrystalline ELPV solar cells and tests on polycrystalline
ones (real electroluminescence images, image-level labels); otherwise it generates a small MVTecAD-format
dataset and holds one texture class out. Results go to a new versioned folder under ``--out`` (nothing is
overwritten): the per-class metrics CSV and markdown table, ``scores_and_roc.png`` (the unseen class's score
histogram, normals vs defects, with the operating point the model labels with; its ROC beside the same-backbone
patch-kNN from the same references), ``most_and_least_anomalous.png`` (one page of the extreme test images with
their maps), a bar chart and anomalib's visualizer images.

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

from anomalib_cgad.versioning import next_version_folder

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


# The name models/base.py imported before the helper got its own module.
_next_version = next_version_folder


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


def collect_predictions(model, datamodule, batch_size: int = 16) -> dict:
    """Score the unseen class's test images with the model and with the same-backbone patch-kNN baseline.

    Both use the references the model holds for that class (``datamodule.reference_images("test", 0)``). The
    patch-kNN scores come from the trained model's own backbone (:func:`~anomalib_cgad.components.patch_knn.
    patch_knn_map`, image score = map maximum), so the comparison isolates what training added on top of it.

    Returns:
        dict: numpy arrays ``score``, ``pred_label``, ``gt_label``, ``knn_score``, ``anomaly_map``, ``image`` and
        the list ``path``.
    """
    import torch
    from torch.utils.data import DataLoader

    from anomalib_cgad.components.patch_knn import patch_knn_map
    from anomalib_cgad.components.reference_bank import flatten_patches

    model.eval()
    references = datamodule.reference_images("test", 0).to(model.device)
    model.set_references(references)
    loader = DataLoader(datamodule.test_data, batch_size=batch_size, collate_fn=datamodule.test_data.collate_fn)
    backbone, normalise = model.model.backbone, model.pre_processor.transform
    out: dict[str, list] = {k: [] for k in ("score", "pred_label", "gt_label", "knn_score", "anomaly_map", "image")}
    out["path"] = []
    with torch.no_grad():
        reference_levels = [flatten_patches(level) for level in backbone(normalise(references))]
        for batch in loader:
            images = batch.image.to(model.device)
            prediction = model(images)
            knn = patch_knn_map(backbone(normalise(images)), reference_levels, images.shape[-2:])
            out["score"].append(prediction.pred_score.reshape(-1).cpu())
            out["pred_label"].append(prediction.pred_label.reshape(-1).cpu())
            out["anomaly_map"].append(prediction.anomaly_map.reshape(len(images), *images.shape[-2:]).cpu())
            out["knn_score"].append(knn.flatten(1).amax(1).cpu())
            out["gt_label"].append(batch.gt_label.reshape(-1).cpu())
            out["image"].append(images.cpu())
            out["path"].extend(batch.image_path)
    return {k: (v if k == "path" else torch.cat(v).float().numpy()) for k, v in out.items()}


def operating_point(model, scores, pred_labels) -> float:
    """The score above which the model labels an image anomalous, as its post-processor decides ``pred_label``.

    anomalib's ``PostProcessor`` normalises scores so that ``pred_label = score > 1 - image_sensitivity``
    (``normalized_image_threshold``), whatever threshold (F1-adaptive, per-class, ...) it was calibrated with.
    The value is checked against the labels the model actually produced; if a post-processor decides
    otherwise, the boundary between the highest normal-labelled and lowest anomalous-labelled score is used,
    so the marked point is always the one the labels came from.
    """
    import numpy as np

    threshold = getattr(model.post_processor, "normalized_image_threshold", None)
    labels = pred_labels.astype(bool)
    if threshold is not None:
        threshold = float(threshold)
        if np.array_equal(scores > threshold, labels):
            return threshold
    below, above = scores[~labels], scores[labels]
    if len(below) and len(above):
        return float((below.max() + above.min()) / 2)
    return float(above.min()) if len(above) else float(below.max())


def plot_scores_and_roc(predictions: dict, threshold: float, path: Path, title: str, model_name: str) -> dict:
    """Left: score histogram of the unseen class (normals vs defects) with the operating point. Right: ROC of the
    model beside the same-backbone patch-kNN from the same references.

    Returns:
        dict: ``{"image_AUROC": ..., "patch_kNN_image_AUROC": ..., "operating_point": ...}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch
    from torchmetrics.functional.classification import binary_auroc, binary_roc

    gt = torch.as_tensor(predictions["gt_label"]).long()
    fig, (hist, roc) = plt.subplots(1, 2, figsize=(10, 4))
    scores = predictions["score"]
    bins = np.linspace(min(scores.min(), threshold), max(scores.max(), threshold), 30)
    for label, name, colour in ((0, "normal", "tab:blue"), (1, "defect", "tab:red")):
        hist.hist(scores[predictions["gt_label"] == label], bins=bins, alpha=0.6, color=colour,
                  label=f"{name} ({int((predictions['gt_label'] == label).sum())})")  # fmt: skip
    flagged = predictions["pred_label"].astype(bool)
    hist.axvline(threshold, color="black", linestyle="--", label=f"operating point {threshold:.3f}")
    hist.set_xlabel("image score (normalised by the post-processor)")
    hist.set_ylabel("test images")
    hist.set_title(f"{model_name}: {int(flagged.sum())} of {len(scores)} flagged as defective", fontsize=9)
    hist.legend(fontsize=8)
    numbers = {"operating_point": threshold}
    for key, name, style in (("score", model_name, "-"), ("knn_score", "patch-kNN, same backbone", "--")):
        values = torch.as_tensor(predictions[key], dtype=torch.float64)
        # torchmetrics reads floats outside [0, 1] as logits and squashes them with a sigmoid (patch-kNN distances
        # of ~45 all became 1.0, AUROC 0.5); min-max scaling keeps the order, which is all a ROC curve uses.
        values = (values - values.min()) / (values.max() - values.min()).clamp_min(1e-12)
        fpr, tpr, _ = binary_roc(values, gt)
        auroc = float(binary_auroc(values, gt))
        roc.plot(fpr.numpy(), tpr.numpy(), style, label=f"{name}: AUROC {auroc:.3f}")
        numbers["image_AUROC" if key == "score" else "patch_kNN_image_AUROC"] = auroc
    # The operating point on the model's ROC curve: the rates its labels actually give.
    positives, negatives = predictions["gt_label"] == 1, predictions["gt_label"] == 0
    tpr_op = float(flagged[positives].mean()) if positives.any() else float("nan")
    fpr_op = float(flagged[negatives].mean()) if negatives.any() else float("nan")
    roc.plot([fpr_op], [tpr_op], "ko", label=f"operating point (FPR {fpr_op:.2f}, TPR {tpr_op:.2f})")
    roc.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
    roc.set_xlabel("false positive rate")
    roc.set_ylabel("true positive rate")
    roc.set_title("ROC on the unseen class, same k references", fontsize=9)
    roc.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return numbers


def plot_extremes(predictions: dict, threshold: float, path: Path, title: str, count: int = 4) -> Path:
    """One page: the ``count`` most and least anomalous test images (top and bottom rows), each with its map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    order = np.argsort(-predictions["score"])
    count = min(count, len(order) // 2 or 1)
    picks = [("most anomalous", order[:count]), ("least anomalous", order[::-1][:count])]
    fig, axes = plt.subplots(4, count, figsize=(2.3 * count, 9.6), squeeze=False)
    vmax = float(np.percentile(predictions["anomaly_map"], 99.5))
    for block, (name, indices) in enumerate(picks):
        for column, index in enumerate(indices):
            image = predictions["image"][index].transpose(1, 2, 0)
            truth = "defect" if predictions["gt_label"][index] else "normal"
            called = "flagged" if predictions["score"][index] > threshold else "passed"
            top, bottom = axes[2 * block, column], axes[2 * block + 1, column]
            top.imshow(np.clip(image, 0, 1))
            top.set_title(f"{name}\nscore {predictions['score'][index]:.3f}: {truth}, {called}", fontsize=7)
            bottom.imshow(np.clip(image, 0, 1))
            bottom.imshow(predictions["anomaly_map"][index], cmap="jet", alpha=0.5, vmin=0, vmax=vmax)
            bottom.set_title(Path(predictions["path"][index]).name, fontsize=6)
    for axis in axes.flat:
        axis.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_demo(args: argparse.Namespace) -> dict[str, float]:
    """Train the chosen model on the source classes and test it on the unseen target classes."""
    from anomalib.engine import Engine
    from anomalib.models import get_model
    from lightning.pytorch import seed_everything

    # The models seed their own episodes, references and synthetic anomalies, but weight initialisation (and the
    # flow's random rotations, drawn with numpy) use the global generators: without this, two runs differed by up
    # to 0.004 image AUROC and 0.05 F1.
    seed_everything(args.seed, workers=True, verbose=False)
    out = next_version_folder(args.out)
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
    predictions = collect_predictions(model, datamodule)
    threshold = operating_point(model, predictions["score"], predictions["pred_label"])
    heading = f"{args.model}, {title}, k={args.k_shot}"
    numbers = plot_scores_and_roc(predictions, threshold, out / "scores_and_roc.png", heading, args.model)
    plot_extremes(predictions, threshold, out / "most_and_least_anomalous.png", heading)
    with (out / "metrics.md").open("a") as handle:
        handle.write(
            f"\nUnseen class, from the model's own predictions: image AUROC {numbers['image_AUROC']:.3f}; "
            f"patch-kNN with the same backbone and references {numbers['patch_kNN_image_AUROC']:.3f}; "
            f"operating point {threshold:.3f} (normalised score).\n"
        )
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
