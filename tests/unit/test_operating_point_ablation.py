"""The learned threshold map of the operating-point ablation: ridge regression on reference-set statistics."""

from __future__ import annotations

import numpy as np

from benchmarks.operating_point_ablation import fit_threshold_map, reference_statistics


def test_fit_recovers_a_linear_map_and_shrinks_with_alpha() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)) * [1.0, 0.1, 0.5] + [2.0, 0.3, 0.2]
    y = 0.5 + 3.0 * (x[:, 1] - 0.3)
    exact = fit_threshold_map(x, y, alpha=0.0)
    assert np.allclose(exact(x), y)
    assert abs(exact.intercept - y.mean()) < 1e-12
    shrunk = fit_threshold_map(x, y, alpha=1000.0)
    assert np.linalg.norm(shrunk.slopes) < np.linalg.norm(exact.slopes)
    # a constant statistic does not break the fit, and a single new row predicts one value
    constant = np.column_stack([x[:, 0], np.ones(64)])
    assert fit_threshold_map(constant, y, alpha=1.0)(constant[0]).shape == (1,)


def test_reference_statistics() -> None:
    stats = reference_statistics(np.array([1.0, 2.0, 3.0, 4.0]), 0.25)
    assert np.allclose(stats, [2.5, 0.25, np.std([1, 2, 3, 4], ddof=1)])


def test_source_check_leaves_each_source_class_out() -> None:
    from benchmarks.operating_point_ablation import source_check

    rng = np.random.default_rng(1)
    calibration, classes = [], []
    for name, shift in (("a", 0.0), ("b", 1.0), ("c", 2.0)):
        for _ in range(4):
            calibration.append((rng.normal(shift, 0.1, size=4), 0.1, rng.normal(shift, 0.1, size=200)))
            classes.append(name)
    rows = source_check(calibration, classes)
    assert [row["held_out_source"] for row in rows] == ["a", "b", "c"]
    assert all(0.0 <= row["learned_false_alarm_rate_at_0.05"] <= 1.0 for row in rows)
    assert source_check(calibration[:4], classes[:4]) == []  # one source class: nothing to leave out
