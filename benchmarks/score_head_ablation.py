"""Can the score adapt to a new class from its k references alone? Re-scored from a trained CGAD checkpoint.

Issue: CGAD's test-time score is an affine map of ResAD's per-level likelihood; the new class's references enter
only through the nearest-reference residual. This script tries score heads that *do* use the reference set,
computed in closed form from the k references' leave-one-out (LOO) passes (each reference against the others),
on the same checkpoint, references and test images, without retraining (a head that helps here is worth
meta-training; one that does not is unlikely to be rescued by it):

- ``shipped``: the model's own score (``score_features``);
- ``level_<l>``: one feature level's ``−logp̄`` alone (which level carries the signal);
- ``loo_standardised``: each level's ``−logp̄`` standardised by the mean and standard deviation of the
  references' LOO patches of that level (the levels weighted by the class's own spread);
- ``loo_centred_latent``: the flow's output ``z`` minus the mean of the references' LOO ``z`` (per level and
  channel) before the Gaussian log-likelihood: the flow's base distribution moved to the class;
- ``loo_whitened_latent``: also divided by the references' per-channel standard deviation.

Example:
    $ python -m benchmarks.score_head_ablation --checkpoint .../model.ckpt --preset synthetic_loco_operating_point \\
        --direction to_dots --out benchmarks/results/score_head_ablation/cgad_to_dots.csv
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import numpy as np
import torch

from anomalib_cgad.components.operating_point import encode
from anomalib_cgad.models.cgad.torch_model import leave_one_out_residuals
from benchmarks.rescoring import checkpoint_parser, load_direction, write_rows

HEADS = ("shipped", "loo_standardised", "loo_centred_latent", "loo_whitened_latent")


def latents(model, constrained: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per level, the flow's ``(z, log|det J|)`` of every patch row (``flatten_patches`` order)."""
    return [model.flow.latents(level, feature) for level, feature in enumerate(constrained)]


def gaussian_logp(z: torch.Tensor, log_jac_det: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """Per-dimension log-likelihood of rows ``z`` under ``N(mean, diag(std²))`` (default ``N(0, I)``).

    Example:
        >>> z = torch.zeros(1, 2)
        >>> round(float(gaussian_logp(z, torch.zeros(1))[0]), 4) == round(-0.5 * math.log(2 * math.pi), 4)
        True
        >>> float(gaussian_logp(z + 3, torch.zeros(1), mean=torch.full((2,), 3.0))[0]) == float(
        ...     gaussian_logp(z, torch.zeros(1))[0])
        True
    """
    channels = z.shape[1]
    log_std = torch.zeros(()) if std is None else torch.log(std).sum()
    z = z if mean is None else z - mean
    z = z if std is None else z / std
    return (-0.5 * channels * math.log(2 * math.pi) - 0.5 * (z**2).sum(1) + log_jac_det - log_std) / channels


def reference_head_statistics(model, reference_features: Sequence[torch.Tensor]) -> dict:
    """What each head needs from the references' LOO pass: per level ``−logp̄`` patches and ``z`` rows."""
    residuals = leave_one_out_residuals(reference_features, model.bank.matching, model.bank.residual)
    levels = model.levels_from_residuals(residuals)
    return {
        "neg_logp": [-logp.reshape(-1) for logp in levels.logps],
        "z": [z for z, _ in latents(model, levels.constrained)],
    }


def head_maps(model, levels, statistics: dict) -> dict[str, list[torch.Tensor]]:
    """Per head, the per-level patch scores ``(B, H_l, W_l)`` of test images' :class:`LevelOutputs`."""
    shapes = [logp.shape for logp in levels.logps]
    maps: dict[str, list[torch.Tensor]] = {f"level_{level}": [] for level in range(len(shapes))}
    maps |= {"loo_standardised": [], "loo_centred_latent": [], "loo_whitened_latent": []}
    flows = latents(model, levels.constrained)
    for level, (logp, (z, log_jac_det)) in enumerate(zip(levels.logps, flows, strict=True)):
        reference_scores, reference_z = statistics["neg_logp"][level], statistics["z"][level]
        maps[f"level_{level}"].append(-logp)
        maps["loo_standardised"].append((-logp - reference_scores.mean()) / reference_scores.std().clamp(min=1e-6))
        mean, std = reference_z.mean(0), reference_z.std(0).clamp(min=1e-3)
        centred = gaussian_logp(z, log_jac_det, mean=mean)
        whitened = gaussian_logp(z, log_jac_det, mean=mean, std=std)
        maps["loo_centred_latent"].append(-centred.reshape(shapes[level]))
        maps["loo_whitened_latent"].append(-whitened.reshape(shapes[level]))
    return maps


@torch.no_grad()
def image_scores(model, features, bank, statistics: dict, size, batch: int = 32) -> dict[str, np.ndarray]:
    """Image score (max of the smoothed, summed map) of every head for encoded test images."""
    scores: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(features[0]), batch):
        rows = [f[start : start + batch] for f in features]
        scores.setdefault("shipped", []).append(model.score_features(rows, bank, size).pred_score.numpy())
        levels = model.levels_from_residuals(model.test_residuals(rows, model.split_bank(bank)[0]))
        for head, per_level in head_maps(model, levels, statistics).items():
            anomaly_map = model.anomaly_map_generator([m.unsqueeze(1) for m in per_level], size)
            scores.setdefault(head, []).append(torch.amax(anomaly_map, dim=(-2, -1)).reshape(-1).numpy())
    return {head: np.concatenate(parts) for head, parts in scores.items()}


def run(args: argparse.Namespace) -> list[dict]:
    """One row per (head, reference seed): image AUROC on the unseen class (the benchmark's data and draws)."""
    from benchmarks.data import make_datamodule
    from benchmarks.metrics import auroc

    torch.set_num_threads(1)
    config, direction, _, model, transform, root = load_direction(args, "score_heads_")
    rows = []
    for seed in args.seeds:
        dm = make_datamodule(config, direction, args.k, seed, "test", root)
        test = dm.test_data
        images = torch.stack([test[i].image for i in range(len(test))])
        truth = torch.tensor([int(test[i].gt_label) for i in range(len(test))])
        refs = dm.reference_images("test", 0)
        size = transform(refs[:1]).shape[-2:]
        with torch.no_grad():
            reference_features = encode(model, refs, transform)
            bank = model.bank_from_features(reference_features, size)
            statistics = reference_head_statistics(model, reference_features)
            scores = image_scores(model, encode(model, images, transform), bank, statistics, size)
        for head, values in scores.items():
            row = {"model": args.model, "direction": args.direction, "head": head, "seed": seed}
            row["image_AUROC"] = auroc(torch.from_numpy(values), truth)
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> None:  # pragma: no cover - command line
    """Parse the arguments, run, write the CSV (never overwriting)."""
    write_rows(checkpoint_parser("python -m benchmarks.score_head_ablation", max_eval_per_class=None).parse_args(), run)


if __name__ == "__main__":  # pragma: no cover
    main()
