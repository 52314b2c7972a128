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
- ``jackknife``: the leave-one-out scores come from banks of k − 1 references while the class is then scored
  against all k, so their mean over-estimates a normal image's score by however much one more reference lowers
  it, which differs between classes (a varied class gains more from a fifth cell than a uniform one).
  Leave-two-out passes (each pair of references scored against a bank of the other k − 2) measure that drop per
  class, ``d = m₂ − m₁``, and the location is extrapolated to a bank of k: ``m₁ − c·d`` with
  ``c = (k − 2) / k``, the ratio a ``1/n`` decrease of the score with the bank size ``n`` gives (0.5 at
  k = 4; fixed by that model, not fitted); scale as ``pixel_std``;
- ``jackknife_shift``: the ``jackknife`` location with scale 1;
- ``learned``: the threshold itself is predicted from statistics of the reference set, by a map fitted on the
  source classes' calibration episodes (a source class plays the new product: k references drawn from its
  normal training images, its other normals scored). Per episode the statistics ``x = (m, s, d)``: the mean
  LOO image score ``m``, the LOO map pixel std ``s`` and the std of the k LOO image scores ``d``; the target
  ``q(rate) − m``, the raw-score ``1 − rate`` quantile of the held-out normals minus ``m``. For each requested
  rate, a ridge regression ``q − m = b₀ + b·z(x)`` on the statistics standardised over the source episodes
  (``z``), intercept unpenalised, penalty ``alpha = 1`` on ``|b|²`` (fixed before any target was seen). The
  unseen class's threshold is ``m + b₀ + b·z(x)`` of its k references (:func:`fit_threshold_map`).

Beside the variants, an ``ideal`` row per draw: the threshold at the ``1 − rate`` quantile of the unseen class's
own normal test scores, the best any rule that sees only normal images can do at that rate, with the oracle F1
(best threshold on the test labels) beside it.

``--tails FILE`` also writes, per reference draw, where the shipped rule's threshold falls against the unseen
class's normal test scores (its ``(location, scale)``, the LOO scores, ``tau`` and the quantiles of the
normalised test normals beside the pooled calibration's), and ``FILE`` with ``.png`` for ``.csv``: the normal
test images the shipped rule flags at 0.05 in every draw (:func:`tail_row`, :func:`save_flagged_normals`).

``--source-check FILE`` also writes a leave-one-source-class-out check of ``pixel_std`` and ``learned`` (fitted on
all source classes but one, achieved rate on the left-out one's calibration episodes; :func:`source_check`).

Example:
    $ python -m benchmarks.operating_point_ablation --checkpoint .../model.ckpt --model CGAD \\
        --direction mono_to_poly --out benchmarks/results/operating_point_ablation/cgad_mono_to_poly.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from anomalib_cgad.components.operating_point import collect_normals, encode
from anomalib_cgad.deploy.inferencer import FAR_GRID, calibrated_tau, leave_one_out_sets, normal_quantiles
from benchmarks.rescoring import checkpoint_parser, load_direction, write_rows

RATES = (0.01, 0.05, 0.1)
VARIANTS = ("pixel_std", "image_std", "shift", "global", "shrunk_std", "jackknife", "jackknife_shift")
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


@torch.no_grad()
def leave_two_out_mean(model, features, size) -> float:
    """Mean image score of each pair of references against a bank of the other k − 2 (NaN when k < 3)."""
    k = len(features[0])
    if k < 3:
        return float("nan")
    scores = []
    for first in range(k):
        for second in range(first + 1, k):
            held = [first, second]
            others = [i for i in range(k) if i not in held]
            bank = model.bank_from_features([f[others] for f in features], size)
            scores.append(model.score_features([f[held] for f in features], bank, size).pred_score.reshape(-1))
    return float(torch.cat(scores).mean())


def jackknife_location(scores: np.ndarray, l2o_mean: float) -> float:
    """The mean LOO score extrapolated from banks of k − 1 to k references (``m₁ − (k − 2)/k · (m₂ − m₁)``).

    Example:
        >>> jackknife_location(np.array([1.0, 1.0, 1.0, 1.0]), 1.5)  # k = 4: half the drop from k − 2 to k − 1
        0.75
    """
    k, m1 = len(scores), float(scores.mean())
    if not np.isfinite(l2o_mean):
        return m1
    return m1 - (k - 2) / k * (l2o_mean - m1)


def normalisation(
    variant: str, scores: np.ndarray, pixel_std: float, prior_std: float = 1.0, l2o_mean: float = float("nan")
) -> tuple[float, float]:
    """``(location, scale)`` of a class under ``variant`` (``prior_std``: the source draws' median pixel std;
    ``l2o_mean``: the mean leave-two-out score, for the ``jackknife`` variants)."""
    if variant == "global":
        return 0.0, 1.0
    if variant.startswith("jackknife"):
        location = jackknife_location(scores, l2o_mean)
        return location, (max(pixel_std, 1e-6) if variant == "jackknife" else 1.0)
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
    stats = np.stack([reference_statistics(draw[0], draw[1]) for draw in calibration])
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


TAIL_LEVELS = (0.5, 0.9, 0.95, 0.99)


def tail_row(raw, truth, loo, pixel_std, pooled, taus) -> dict:
    """Where the shipped (``pixel_std``) threshold falls for one reference draw of the unseen class.

    ``pooled``: the calibration's pooled normalised source normals, ``taus``: their quantiles on ``FAR_GRID``.
    """
    location, scale = normalisation("pixel_std", loo, pixel_std)
    z = (np.asarray(raw) - location) / scale
    normal = np.asarray(truth) == 0
    row = {"location": location, "scale": scale, "loo_scores": " ".join(f"{v:.3f}" for v in loo)}
    row |= {f"tau_at_{rate:g}": calibrated_tau(FAR_GRID, taus, rate) for rate in RATES}
    for level in TAIL_LEVELS:
        row[f"target_normal_z_q{level:g}"] = float(np.quantile(z[normal], level))
        row[f"source_normal_z_q{level:g}"] = float(np.quantile(pooled, level))
    row["target_anomalous_z_median"] = float(np.median(z[~normal])) if (~normal).any() else float("nan")
    return row


def save_flagged_normals(flags: dict[str, int], draws: int, path: Path, most: int = 8) -> int:
    """A row of the normal test images flagged in every one of ``draws`` draws (at most ``most``); their count."""
    from PIL import Image

    always = sorted(name for name, count in flags.items() if count == draws)
    if always:
        tiles = [Image.open(name).convert("L").resize((128, 128)) for name in always[:most]]
        sheet = Image.new("L", (128 * len(tiles), 128))
        for column, tile in enumerate(tiles):
            sheet.paste(tile, (128 * column, 0))
        sheet.save(path)
    return len(always)


def labelled_row(key: dict, raw: np.ndarray, truth: torch.Tensor, thresholds: dict[float, float]) -> dict:
    """``key`` with the achieved false-alarm rate and F1 of ``raw > threshold`` at each requested rate (printed)."""
    from benchmarks.metrics import f1_score

    row = dict(key)
    for rate, threshold in thresholds.items():
        predicted = torch.from_numpy(raw > threshold)
        row[f"false_alarm_rate_at_{rate:g}"] = float(predicted[truth == 0].float().mean())
        row[f"F1_at_{rate:g}"] = f1_score(predicted, truth)
    print(row, flush=True)
    return row


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
    from benchmarks.data import make_datamodule
    from benchmarks.metrics import f1_score

    torch.set_num_threads(1)
    config, direction, _, model, transform, root = load_direction(args, "op_ablation_")
    generator = torch.Generator().manual_seed(0)
    calibration = []  # (LOO scores, pixel std, held-out raw scores, leave-two-out mean) per draw
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
            held_scores = score(model, [f[held_out] for f in features], bank, size)
            calibration.append((loo, pixel_std, held_scores, leave_two_out_mean(model, ref_features, size)))
            classes.append(name)
    prior_std = float(np.median([draw[1] for draw in calibration]))
    # learned: one map per rate from the source episodes' reference statistics to their held-out quantile
    episode_stats = np.stack([reference_statistics(draw[0], draw[1]) for draw in calibration])
    threshold_maps = {
        rate: fit_threshold_map(
            episode_stats,
            np.array([np.quantile(draw[2], 1.0 - rate) for draw in calibration]) - episode_stats[:, 0],
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
    rows, tails, flags = [], [], {}
    for seed in args.seeds:
        dm = make_datamodule(config, direction, args.k, seed, "test", root)
        test = dm.test_data
        paths = [str(name) for name in test.samples.image_path]
        images = torch.stack([test[i].image for i in range(len(test))])
        truth = torch.tensor([int(test[i].gt_label) for i in range(len(test))])
        refs = dm.reference_images("test", 0)
        size = transform(refs[:1]).shape[-2:]
        ref_features = encode(model, refs, transform)  # once, for the bank and the leave-k-out passes
        raw = score(model, encode(model, images, transform), model.bank_from_features(ref_features, size), size)
        loo, pixel_std = loo_parts(model, refs, transform, ref_features)
        l2o = leave_two_out_mean(model, ref_features, size)
        normal_raw = raw[(truth == 0).numpy()]
        key = {"model": args.model, "direction": args.direction, "variant": None, "seed": seed}  # the CSV's order
        # the ceiling of any normal-only rule: the threshold at the requested quantile of the test normals
        ideal = labelled_row(key | {"variant": "ideal"}, raw, truth, {r: np.quantile(normal_raw, 1 - r) for r in RATES})
        ideal["F1_oracle"] = max(f1_score(torch.from_numpy(raw >= t), truth) for t in np.unique(raw))
        rows.append(ideal)
        for variant in VARIANTS:
            pooled = []
            for draw_loo, draw_std, held_out_scores, draw_l2o in calibration:
                draw_location, draw_scale = normalisation(variant, draw_loo, draw_std, prior_std, draw_l2o)
                pooled.append((held_out_scores - draw_location) / draw_scale)
            pooled = np.concatenate(pooled)
            taus = normal_quantiles(pooled, FAR_GRID)
            location, scale = normalisation(variant, loo, pixel_std, prior_std, l2o)
            if variant == "pixel_std":
                tail = tail_row(raw, truth, loo, pixel_std, pooled, taus)
                tails.append({"direction": args.direction, "seed": seed} | tail)
                flagged = raw > location + scale * calibrated_tau(FAR_GRID, taus, 0.05)
                for name, label, flag in zip(paths, truth.tolist(), flagged.tolist(), strict=True):
                    flags[name] = flags.get(name, 0) + int(label == 0 and flag)
            thresholds = {rate: location + scale * calibrated_tau(FAR_GRID, taus, rate) for rate in RATES}
            rows.append(labelled_row(key | {"variant": variant}, raw, truth, thresholds))
        stats = reference_statistics(loo, pixel_std)
        thresholds = {rate: stats[0] + float(threshold_maps[rate](stats)[0]) for rate in RATES}
        rows.append(labelled_row(key | {"variant": "learned"}, raw, truth, thresholds))
    if getattr(args, "tails", None) is not None:
        import pandas as pd

        image = args.tails.with_suffix(".png")
        always = save_flagged_normals(flags, len(args.seeds), image)
        frame = pd.DataFrame(tails).assign(normals_flagged_in_every_draw=always)
        frame.to_csv(args.tails, index=False)
        print(
            f"{always} normal test images flagged at 0.05 in every draw; {args.tails}"
            + (f", {image}" if always else "")
        )
    return rows


def summarise(paths: list[Path]):
    """One row per (protocol, variant) of the ablation CSVs: mean achieved rate and F1 at each requested rate,
    the worst draw's F1 at 0.05 and, for ``ideal``, the oracle F1 (generated directions ``to_*`` pooled).

    Example:
        >>> import pandas as pd, tempfile
        >>> path = Path(tempfile.mkdtemp()) / "cgad_to_a.csv"
        >>> pd.DataFrame({"direction": ["to_a", "to_a"], "variant": ["pixel_std"] * 2, "F1_at_0.05": [0.5, 0.7],
        ...               "false_alarm_rate_at_0.05": [0.0, 0.1]}).to_csv(path, index=False)
        >>> summarise([path])[["protocol", "variant", "F1_at_0.05", "worst_F1_at_0.05", "rows"]].values.tolist()
        [['generated', 'pixel_std', 0.6, 0.5, 2]]
    """
    import pandas as pd

    frame = pd.concat([pd.read_csv(path) for path in paths], ignore_index=True)
    frame["protocol"] = frame["direction"].map(lambda name: "generated" if name.startswith("to_") else name)
    columns = [c for c in frame.columns if c.startswith(("false_alarm_rate_at_", "F1_at_", "F1_oracle"))]
    groups = frame.groupby(["protocol", "variant"], sort=False)
    summary = groups[columns].mean().round(4)
    summary["worst_F1_at_0.05"] = groups["F1_at_0.05"].min().round(4)
    summary["rows"] = groups.size()
    return summary.reset_index()


def main() -> None:  # pragma: no cover - command line
    """Parse the arguments, run, write the CSV (never overwriting); or ``--summarise DIR``."""

    if len(sys.argv) == 3 and sys.argv[1] == "--summarise":
        folder = Path(sys.argv[2])
        table = summarise(sorted(folder.glob("cgad_*.csv")))
        table.to_csv(folder / "summary.csv", index=False)
        (folder / "summary.md").write_text(table.to_markdown(index=False, floatfmt=".3f") + "\n")
        print(table.to_string(index=False))
        return
    parser = checkpoint_parser(
        "python -m benchmarks.operating_point_ablation",
        max_eval_per_class=150,
        epilog="--summarise DIR: summary.csv/.md of DIR/cgad_*.csv",
    )
    parser.add_argument("--draws", type=int, default=16)
    parser.add_argument("--normals", type=int, default=40)
    parser.add_argument("--tails", type=Path, help="CSV of where the shipped threshold falls, per draw (optional)")
    parser.add_argument("--source-check", type=Path, help="CSV of the leave-one-source-class-out check (optional)")
    write_rows(parser.parse_args(), run)


if __name__ == "__main__":  # pragma: no cover
    main()
