"""``benchmarks.train_speed``: its class lists, settings and ratio table (the timed fits are the benchmark's run)."""

from __future__ import annotations

import pandas as pd
import pytest

from benchmarks.train_speed import TARGET, _setting, ratio_table, source_classes


def test_source_classes_are_distinct_nested_prefixes_without_the_target() -> None:
    fifteen = source_classes(15)
    assert len(set(fifteen)) == 15
    assert TARGET not in fifteen
    assert source_classes(5) == fifteen[:5]
    assert source_classes(2) == ["stripes", "dots"]
    with pytest.raises(ValueError, match="--classes must lie in"):
        source_classes(0)


def test_settings_parse_and_bad_ones_are_named() -> None:
    assert _setting('unbounded={"episodes": {"epoch_classes": null}}') == (
        "unbounded",
        {"episodes": {"epoch_classes": None}},
    )
    assert _setting("defaults=") == ("defaults", {})
    for bad in ("x={epoch_classes: 2}", "=", "x=[1]"):
        with pytest.raises(SystemExit, match="--setting"):
            _setting(bad)


def test_ratio_table_divides_the_large_run_by_the_small_one_per_setting() -> None:
    frame = pd.DataFrame({
        "setting": ["a", "a", "b", "b"], "classes": [5, 15, 5, 15], "steps": [10, 30, 8, 8],
        "train_s": [10.0, 30.0, 10.0, 14.0], "train_cpu_s": [8.0, 24.0, 8.0, 10.0], "fit_s": [20.0, 60.0, 20.0, 40.0],
    })  # fmt: skip
    table = ratio_table(frame).set_index("setting")
    assert table.loc["a", "train_s 15/5"] == 3.0
    assert table.loc["b", "train_s 15/5"] == 1.4
    assert table.loc["b", "steps 15/5"] == 1.0
    assert table.loc["b", "train_cpu_s 15/5"] == 1.25
