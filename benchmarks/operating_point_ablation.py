"""Which per-class normalisation makes the normal-only threshold transfer? Re-scored from a trained checkpoint.

The shipped rule (``anomalib_cgad.components.operating_point``) normalises a class's scores by
``(location, scale)`` from its k references' leave-one-out (LOO) passes. This script scores, once, everything
the rule needs with a trained model (the calibration episodes on the source classes' normal training images,
and each reference draw of the unseen class with its test images), then evaluates several ``(location,
scale)`` choices on the same raw scores:

- ``pixel_std`` (shipped): location = mean LOO image score, scale = standard deviation of the LOO map pixels;
- ``image_std``: location = mean LOO image score, scale = standard deviation of the k LOO image scores;
- ``shift``: location = mean LOO image score, scale = 1 (``tau`` in raw score units);
- ``global``: location 0, scale 1 (one threshold for every class: the source classes' normal quantile);
- ``shrunk_std``: location as ``pixel_std``; scale = √(½·s² + ½·s₀²), the references' pixel std ``s`` pulled
  half-way (in variance) towards ``s₀``, the median pixel std of the source classes' calibration draws (k = 4
  references are few to estimate a spread from; the half-way weight is fixed, not fitted);
- ``learned``: the threshold itself is predicted from statistics of the reference set, by a map fitted on the
  source classes' calibration episodes (a source class plays the new product: k references drawn from its
  normal training images, its other normals scored). Per episode the statistics ``x = (m, s, d)``: the mean
  LOO image score ``m``, the LOO map pixel std ``s`` and the std of the k LOO image scores ``d``; the target
  ``q(rate) − m``, the raw-score ``1 − rate`` quantile of the held-out normals minus ``m``. For each requested
  rate, a ridge regression ``q − m = b₀ + b·z(x)`` on the statistics standardised over the source episodes
  (``z``), intercept unpenalised, penalty ``alpha = 1`` on ``|b|²`` (fixed before any target was seen). The
  unseen class's threshold is ``m + b₀ + b·z(x)`` of its k references (:func:`fit_threshold_map`).

``--source-check FILE`` also writes a leave-one-source-class-out check of ``pixel_std`` and ``learned`` (fitted on
all source classes but one, achieved rate on the left-out one's calibration episodes; :func:`source_check`).

Example:
    $ python -m benchmarks.operating_point_ablation --checkpoint .../model.ckpt --model CGAD \\
        --direction mono_to_poly --out benchmarks/results/operating_point_ablation/cgad_mono_to_poly.csv
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from anomalib_cgad.components.operating_point import collect_normals, encode
from anomalib_cgad.deploy.inferencer import FAR_GRID, calibrated_tau, leave_one_out_sets, normal_quantiles

RATES = (0.01, 0.05, 0.1)
VARIANTS = ("pixel_std", "image_std", "shift", "global", "shrunk_std")
LEARNED_ALPHA = 1.0  # ridge penalty of the learned map on standardised statistics (fixed, not tuned)


def reference_statistics(scores: np.ndarray, pixel_std: float) -> np.ndarray:
    """``(m, s, d)`` of a reference set: mean LOO image score, LOO pixel std, std of the k LOO image scores."""
    spread = float(scores.std(ddof=1)) if len(scores) > 1 else 0.0
    return np.array([float(scores.mean()), float(pixel_std), spread])


def fit_threshold_map(statistics: np.ndarray, targets: np.ndarray, alpha: float = LEARNED_ALPHA):
    """Ridge regression of ``targets`` on ``statistics`` (one row per episode); return ``predict(statistics)``.

    The statistics are standardised over the fitting episodes (a constant one gets scale 1); the intercept is
    not penalised, the slopes by ``alpha · |b|²``.

    Example:
        >>> x = np.array([[0.0], [1.0], [2.0], [3.0]])
        >>> predict = fit_threshold_map(x, 2.0 * x[:, 0] + 1.0, alpha=0.0)
        >>> round(float(predict(np.array([[4.0]]))[0]), 6)
        9.0
    """
    x, y = np.asarray(statistics, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    z = (x - mean) / std
    intercept = float(y.mean())
    slopes = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - intercept))

    def predict(new: np.ndarray) -> np.ndarray:
        return intercept + ((np.atleast_2d(np.asarray(new, dtype=np.float64)) - mean) / std) @ slopes

    predict.slopes, predict.intercept = slopes, intercept
    return predict


@torch.no_grad()
def loo_parts(model, images: torch.Tensor, transform, features=None) -> tuple[np.ndarray, float]:
    """The k LOO image scores and the pixel standard deviation of the LOO maps (raw model scores).

    ``features``: the images' :func:`~anomalib_cgad.components.operating_point.encode`, when the caller has it.
    """
    features = encode(model, images, transform) if features is None else features
    size = transform(images[:1]).shape[-2:]
    scores, pixels = [], []
    for held, others in leave_one_out_sets(len(images)):
        refs = (
            [f[others] for f in features]
            if others is not None
            else encode(model, images[held : held + 1].flip(-1), transform)
        )
        output = model.score_features(
            [f[held : held + 1] for f in features], model.bank_from_features(refs, size), size
        )
        scores.append(float(output.pred_score.reshape(-1)[0]))
        pixels.append(output.anomaly_map.float().reshape(-1).numpy())
    return np.array(scores), float(np.concatenate(pixels).std())


def normalisation(variant: str, scores: np.ndarray, pixel_std: float, prior_std: float = 1.0) -> tuple[float, float]:
    """``(location, scale)`` of a class under ``variant`` (``prior_std``: the source draws' median pixel std)."""
    if variant == "global":
        return 0.0, 1.0
    location = float(scores.mean())
    if variant == "pixel_std":
        return location, max(pixel_std, 1e-6)
    if variant == "shrunk_std":  # the k references' pixel std pulled half-way (in variance) to the source prior
        return location, max(float(np.sqrt(0.5 * pixel_std**2 + 0.5 * prior_std**2)), 1e-6)
    if variant == "image_std":
        return location, max(float(scores.std(ddof=1)) if len(scores) > 1 else pixel_std, 1e-6)
    return location, 1.0


def source_check(calibration: list, classes: list[str]) -> list[dict]:
    """Leave one source class out: fit ``pixel_std``'s ``tau`` / the learned map on the other source classes'
    episodes, return the achieved false-alarm rate on the held-out class's episodes (mean over its draws).

    Empty with a single source class (ELPV: nothing to leave out).
    """
    rows, names = [], np.array(classes)
    if len(set(classes)) < 2:
        return rows
    stats = np.stack([reference_statistics(loo, std) for loo, std, _ in calibration])
    for held in dict.fromkeys(classes):
        fit, test = np.flatnonzero(names != held), np.flatnonzero(names == held)
        pooled = np.concatenate([(calibration[i][2] - stats[i, 0]) / max(stats[i, 1], 1e-6) for i in fit])
        taus = normal_quantiles(pooled, FAR_GRID)
        row = {"held_out_source": held, "episodes": len(test)}
        for rate in RATES:
            targets = np.array([np.quantile(calibration[i][2], 1.0 - rate) for i in fit]) - stats[fit, 0]
            learned = stats[test, 0] + fit_threshold_map(stats[fit], targets)(stats[test])
            shipped = stats[test, 0] + np.maximum(stats[test, 1], 1e-6) * calibrated_tau(FAR_GRID, taus, rate)
            for variant, thresholds in (("pixel_std", shipped), ("learned", learned)):
                achieved = [float((calibration[i][2] > t).mean()) for i, t in zip(test, thresholds, strict=True)]
                row[f"{variant}_false_alarm_rate_at_{rate:g}"] = float(np.mean(achieved))
        rows.append(row)
    return rows


@torch.no_grad()
def score(model, features, bank, size, batch: int = 32) -> np.ndarray:
    """Raw image scores of encoded images against ``bank``."""
    count = len(features[0])
    parts = [model.score_features([f[i : i + batch] for f in features], bank, size) for i in range(0, count, batch)]
    return torch.cat([part.pred_score for part in parts]).numpy()


def run(args: argparse.Namespace) -> list[dict]:
    """Score once, evaluate every variant; return one row per (variant, seed).

    The data are the benchmark's (``benchmarks.data.make_datamodule`` of the preset's direction: the same
    references and the same fixed test subsample); the calibration uses ``--draws`` draws of ``--normals`` images.
    """
    import anomalib_cgad
    from benchmarks.config import load_config
    from benchmarks.data import generate_data, make_datamodule
    from benchmarks.metrics import f1_score

    torch.set_num_threads(1)
    config = load_config(preset=args.preset)
    config["max_eval_per_class"] = args.max_eval_per_class
    direction = next(d for d in config["directions"] if d["name"] == args.direction)
    module = getattr(anomalib_cgad, args.model).load_from_checkpoint(args.checkpoint).eval()
    model, transform = module.model.eval(), module.pre_processor.transform
    generator = torch.Generator().manual_seed(0)
    calibration = []  # (LOO scores, pixel std, held-out raw scores) per draw
    # generated presets: the same classes the benchmark run trained on (same generator settings and seed)
    root = generate_data(config, direction, Path(tempfile.mkdtemp(prefix="op_ablation_")))
    dm = make_datamodule(config, direction, args.k, args.seeds[0], "test", root)
    classes = []  # the source class of each calibration draw (for the leave-one-source-class-out check)
    for name, images in collect_normals(dm.train_data, dm.category_of, limit=args.normals).items():
        features, size = encode(model, images, transform), transform(images[:1]).shape[-2:]
        for _ in range(args.draws):
            order = torch.randperm(len(images), generator=generator)
            refs, held_out = order[: args.k], order[args.k :]
            ref_features = [f[refs] for f in features]
            loo, pixel_std = loo_parts(model, images[refs], transform, ref_features)
            bank = model.bank_from_features(ref_features, size)
            calibration.append((loo, pixel_std, score(model, [f[held_out] for f in features], bank, size)))
            classes.append(name)
    prior_std = float(np.median([draw_std for _, draw_std, _ in calibration]))
    # learned: one map per rate from the source episodes' reference statistics to their held-out quantile
    episode_stats = np.stack([reference_statistics(draw_loo, draw_std) for draw_loo, draw_std, _ in calibration])
    threshold_maps = {
        rate: fit_threshold_map(
            episode_stats,
            np.array([np.quantile(held, 1.0 - rate) for _, _, held in calibration]) - episode_stats[:, 0],
        )
        for rate in RATES
    }
    for rate, fitted in threshold_maps.items():
        print(f"learned map at {rate:g}: intercept {fitted.intercept:.4g}, slopes (m, s, d) {fitted.slopes}")
    if getattr(args, "source_check", None) is not None and len(set(classes)) > 1:
        import pandas as pd

        pd.DataFrame(source_check(calibration, classes)).assign(model=args.model, direction=args.direction).to_csv(
            args.source_check, index=False
        )
    rows = []
    for seed in args.seeds:
        dm = make_datamodule(config, direction, args.k, seed, "test", root)
        test = dm.test_data
        images = torch.stack([test[i].image for i in range(len(test))])
        truth = torch.tensor([int(test[i].gt_label) for i in range(len(test))])
        refs = dm.reference_images("test", 0)
        size = transform(refs[:1]).shape[-2:]
        raw = score(model, encode(model, images, transform), model.compute_bank(transform(refs)), size)
        loo, pixel_std = loo_parts(model, refs, transform)
        for variant in VARIANTS:
            pooled = []
            for draw_loo, draw_std, held_out_scores in calibration:
                draw_location, draw_scale = normalisation(variant, draw_loo, draw_std, prior_std)
                pooled.append((held_out_scores - draw_location) / draw_scale)
            pooled = np.concatenate(pooled)
            taus = normal_quantiles(pooled, FAR_GRID)
            location, scale = normalisation(variant, loo, pixel_std, prior_std)
            row = {"model": args.model, "direction": args.direction, "variant": variant, "seed": seed}
            for rate in RATES:
                predicted = torch.from_numpy(raw > location + scale * calibrated_tau(FAR_GRID, taus, rate))
                row[f"false_alarm_rate_at_{rate:g}"] = float(predicted[truth == 0].float().mean())
                row[f"F1_at_{rate:g}"] = f1_score(predicted, truth)
            rows.append(row)
            print(row, flush=True)
        stats = reference_statistics(loo, pixel_std)
        row = {"model": args.model, "direction": args.direction, "variant": "learned", "seed": seed}
        for rate in RATES:
            threshold = stats[0] + float(threshold_maps[rate](stats)[0])
            predicted = torch.from_numpy(raw > threshold)
            row[f"false_alarm_rate_at_{rate:g}"] = float(predicted[truth == 0].float().mean())
            row[f"F1_at_{rate:g}"] = f1_score(predicted, truth)
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:  # pragma: no cover - command line
    """Parse the arguments, run, write the CSV (never overwriting)."""
    import pandas as pd

    parser = argparse.ArgumentParser(prog="python -m benchmarks.operating_point_ablation")
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--model", default="CGAD")
    parser.add_argument("--preset", default="elpv_operating_point")
    parser.add_argument("--direction", required=True, help="a direction of the preset, e.g. mono_to_poly")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--draws", type=int, default=16)
    parser.add_argument("--normals", type=int, default=40)
    parser.add_argument("--max-eval-per-class", type=int, default=150, help="as the benchmark run")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--source-check", type=Path, help="CSV of the leave-one-source-class-out check (optional)")
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"error: '{args.out}' exists; choose a new file.")
    rows = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(args.out, index=False)


if __name__ == "__main__":  # pragma: no cover
    main()
