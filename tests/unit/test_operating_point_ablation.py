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


class _ScoreIsBankDistance:
    """A stand-in model: an image's score is how far its one feature lies from the nearest bank feature."""

    def bank_from_features(self, features, size):
        del size
        return features[0].reshape(-1)

    def score_features(self, features, bank, size):
        del size
        from types import SimpleNamespace

        query = features[0].reshape(-1, 1)
        return SimpleNamespace(pred_score=(query - bank.reshape(1, -1)).abs().amin(dim=1))


def test_leave_two_out_mean_scores_each_pair_against_the_others() -> None:
    import torch

    from benchmarks.operating_point_ablation import leave_two_out_mean

    features = [torch.tensor([0.0, 1.0, 3.0, 7.0])]
    # held-out pair -> distance of each to the nearer of the other two:
    # {0,1}: 3, 2; {0,2}: 1, 2; {0,3}: 1, 4; {1,2}: 1, 3; {1,3}: 1, 4; {2,3}: 2, 6
    expected = np.mean([3, 2, 1, 2, 1, 4, 1, 3, 1, 4, 2, 6])
    assert abs(leave_two_out_mean(_ScoreIsBankDistance(), features, None) - expected) < 1e-6
    assert np.isnan(leave_two_out_mean(_ScoreIsBankDistance(), [torch.tensor([0.0, 1.0])], None))


def test_jackknife_extrapolates_the_location_and_keeps_the_scale_choice() -> None:
    from benchmarks.operating_point_ablation import jackknife_location, normalisation

    loo = np.array([2.0, 2.0, 2.0, 2.0])
    assert jackknife_location(loo, 3.0) == 1.5  # k = 4: c = 0.5 of the drop from k - 2 to k - 1 references
    assert jackknife_location(loo, float("nan")) == 2.0  # k < 3: no leave-two-out pass, the LOO mean
    assert normalisation("jackknife", loo, 0.2, l2o_mean=3.0) == (1.5, 0.2)
    assert normalisation("jackknife_shift", loo, 0.2, l2o_mean=3.0) == (1.5, 1.0)


def test_tail_row_reads_the_threshold_against_the_normalised_normals() -> None:
    from benchmarks.operating_point_ablation import tail_row

    raw = np.array([0.0, 1.0, 2.0, 3.0, 10.0, 12.0])
    truth = np.array([0, 0, 0, 0, 1, 1])
    loo = np.array([1.0, 1.0, 1.0, 1.0])
    pooled = np.linspace(-3.0, 3.0, 601)
    row = tail_row(raw, truth, loo, 0.5, pooled, np.linspace(4.0, 1.0, 13))
    assert (row["location"], row["scale"]) == (1.0, 0.5)
    assert abs(row["target_normal_z_q0.5"] - 1.0) < 1e-9  # normals 0..3 -> z -2, 0, 2, 4: median 1
    assert abs(row["source_normal_z_q0.5"]) < 1e-9
    assert row["target_anomalous_z_median"] == 20.0
    assert row["tau_at_0.01"] > row["tau_at_0.05"] > row["tau_at_0.1"]


def test_docstring_examples_of_the_ablation_script_run() -> None:
    import doctest

    import benchmarks.operating_point_ablation as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0
