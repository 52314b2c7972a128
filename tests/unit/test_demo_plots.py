"""The demo's plots on hand-made predictions: the operating point is the one the labels came from."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from anomalib_cgad.demo import operating_point, plot_extremes, plot_scores_and_roc


def _predictions(threshold: float) -> dict:
    rng = np.random.default_rng(0)
    gt = np.array([0] * 10 + [1] * 10)
    score = np.concatenate([rng.uniform(0.3, 0.6, 10), rng.uniform(0.45, 0.9, 10)]).astype(np.float32)
    return {
        "score": score,
        "pred_label": (score > threshold).astype(np.float32),
        "gt_label": gt.astype(np.float32),
        "knn_score": (score * 40 + 10).astype(np.float32),  # distances, far outside [0, 1]
        "anomaly_map": rng.random((20, 16, 16)).astype(np.float32),
        "image": rng.random((20, 3, 16, 16)).astype(np.float32),
        "path": [f"{i:03}.png" for i in range(20)],
    }


def test_operating_point_is_the_post_processors_and_is_checked_against_the_labels() -> None:
    predictions = _predictions(0.5)
    post = SimpleNamespace(normalized_image_threshold=torch.tensor(0.5))
    assert operating_point(SimpleNamespace(post_processor=post), predictions["score"], predictions["pred_label"]) == 0.5
    # labels decided elsewhere (another threshold): the boundary the labels show, not the stale 0.5
    other = _predictions(0.7)
    point = operating_point(SimpleNamespace(post_processor=post), other["score"], other["pred_label"])
    assert np.array_equal(other["score"] > point, other["pred_label"].astype(bool))


def test_roc_of_distances_is_not_squashed_and_the_pages_are_written(tmp_path) -> None:
    predictions = _predictions(0.5)
    numbers = plot_scores_and_roc(predictions, 0.5, tmp_path / "roc.png", "title", "CGAD")
    # the patch-kNN scores are a monotone map of the model's: the same AUROC, not 0.5 from a sigmoid
    assert numbers["patch_kNN_image_AUROC"] == numbers["image_AUROC"] > 0.6
    plot_extremes(predictions, 0.5, tmp_path / "extremes.png", "title")
    assert (tmp_path / "roc.png").stat().st_size > 0 and (tmp_path / "extremes.png").stat().st_size > 0
