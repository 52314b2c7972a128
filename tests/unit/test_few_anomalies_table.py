"""The few_anomalies table pairs each level with few_anomalies = 0 on the same direction and reference seed."""

from __future__ import annotations

import pandas as pd
import pytest

from benchmarks.few_anomalies_table import load_rows, main, tables

COLUMNS = ["direction", "model", "k_shot", "seed", "class", "status", "image_AUROC", "F1_oracle", "F1_normal_only",
           "false_alarm_rate", "miss_rate"]  # fmt: skip


def _run(folder, rows: list[tuple]):
    folder.mkdir(parents=True)
    pd.DataFrame(rows, columns=COLUMNS).to_csv(folder / "results.csv", index=False)
    return folder


def _row(direction: str, seed: int, auroc: float, target: str = "poly", model: str = "CGAD") -> tuple:
    return (direction, model, 4, seed, target, "ok", auroc, 0.7, 0.5, 0.05, 0.5)


def test_levels_and_paired_changes(tmp_path) -> None:
    rows = [_row("m2p_fa0", 0, 0.70), _row("m2p_fa0", 1, 0.80), _row("m2p_fa4", 0, 0.75), _row("m2p_fa4", 1, 0.85),
            _row("p2m_fa0", 0, 0.60, "mono"), _row("p2m_fa4", 0, 0.62, "mono"),
            ("m2p_fa0", "CGAD", 4, 0, "mean", "ok", 0.0, 0.0, 0.0, 0.0, 0.0)]  # fmt: skip
    frame = load_rows([_run(tmp_path / "run", rows)])
    assert sorted(frame["few_anomalies"].unique()) == [0, 4]  # the mean row is dropped
    text = tables(frame, per_direction=True)
    assert "| CGAD | 4 − 0 | 0.040 ± 0.017 |" in text  # pairs: +0.05, +0.05, +0.02
    assert "| CGAD | 0 | 0.700 ± 0.100 |" in text  # 0.70, 0.80, 0.60
    assert "| CGAD | m2p | 4 | 0.800 ± 0.071 |" in text
    main([str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "table.md").read_text() == tables(frame)


def test_a_direction_without_its_level_is_named(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"_fa<n>: \['m2p'\]"):
        load_rows([_run(tmp_path / "run", [_row("m2p", 0, 0.7)])])


def test_a_retrained_copy_gives_the_training_noise_row(tmp_path) -> None:
    rows = [_row("m2p_fa0", 0, 0.70), _row("m2p_fa0", 0, 0.66, model="cgad_seed_1"), _row("m2p_fa4", 0, 0.75)]
    text = tables(load_rows([_run(tmp_path / "run", rows)]))
    assert "| CGAD | `cgad_seed_1` − CGAD (training seed, same few_anomalies) | -0.040 ± 0.000 |" in text
