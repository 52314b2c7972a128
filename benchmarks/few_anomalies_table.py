"""Model × few_anomalies table of a run whose directions differ only in ``few_anomalies`` (e.g. ``mono_to_poly_fa4``).

The ``elpv_few_anomalies`` and ``synthetic_loco_few_anomalies`` presets train each direction once per number of
real labelled anomalies of the source classes (0, 4, 16); their direction names end in ``_fa<n>``. This reads
the runs' ``results.csv`` (target-class rows, no ``mean`` rows) and writes ``table.md`` into ``--out``:

1. per model and ``few_anomalies``: image AUROC, oracle F1, normal-only F1, achieved false-alarm rate and miss
   rate at the normal-only operating point, mean ± std over (direction, reference seed);
2. the paired change against ``few_anomalies = 0`` (same direction, same reference seed), mean ± std over the
   pairs, beside the spread over reference seeds at 0 (the std over seeds within a direction, averaged over
   the directions): a change is read as real only when it clearly exceeds that spread;
   A model named ``<model>_seed_<n>`` (a retrained copy with another training seed, as the presets' control
   variants) gets a row of its paired change against ``<model>``: the training noise to compare with;
3. with ``--per-direction``: every metric per model, direction and ``few_anomalies`` (mean ± std over seeds).

Example:
    $ python -m benchmarks.few_anomalies_table benchmarks/results/elpv_few_anomalies \\
        --out benchmarks/results/elpv_few_anomalies
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd

METRICS = {
    "image_AUROC": "image AUROC",
    "F1_oracle": "F1 oracle",
    "F1_normal_only": "F1 normal-only",
    "false_alarm_rate": "FAR (requested 0.05)",
    "miss_rate": "miss rate",
}
PATTERN = re.compile(r"^(?P<base>.+)_fa(?P<n>\d+)$")


def load_rows(folders: list[Path]) -> pd.DataFrame:
    """Target-class rows of the runs with ``base`` (direction without its suffix) and ``few_anomalies``."""
    frame = pd.concat([pd.read_csv(folder / "results.csv") for folder in folders], ignore_index=True)
    frame = frame[(frame["class"] != "mean") & (frame["status"] == "ok")].copy()
    parts = frame["direction"].str.extract(PATTERN)
    if parts["n"].isna().any():
        bad = sorted(frame.loc[parts["n"].isna(), "direction"].unique())
        msg = f"Direction names must end in _fa<n>: {bad}."
        raise ValueError(msg)
    frame["base"], frame["few_anomalies"] = parts["base"], parts["n"].astype(int)
    return frame


def _pm(values: pd.Series) -> str:
    return f"{values.mean():.3f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.3f}"


def tables(frame: pd.DataFrame, per_direction: bool = False) -> str:
    """The markdown tables (levels, paired changes; per direction too) of ``frame`` (from :func:`load_rows`)."""
    models = list(dict.fromkeys(frame["model"]))
    levels = sorted(frame["few_anomalies"].unique())
    n_dir, n_seed = frame["base"].nunique(), frame["seed"].nunique()
    lines = [
        f"Mean ± std over {n_dir} direction(s) × {n_seed} reference seed(s) (k = "
        f"{', '.join(map(str, sorted(frame['k_shot'].unique())))}).",
        "",
        "| model | few_anomalies | " + " | ".join(METRICS.values()) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for model in models:
        for level in levels:
            rows = frame[(frame["model"] == model) & (frame["few_anomalies"] == level)]
            if rows.empty:
                continue
            lines.append(f"| {model} | {level} | " + " | ".join(_pm(rows[m]) for m in METRICS) + " |")
    lines += [
        "",
        "Paired change against few_anomalies = 0 (same direction and reference seed; mean ± std over the pairs) "
        "and, in the `seed spread` rows, the std over reference seeds at 0 (averaged over directions).",
        "",
        "| model | change | " + " | ".join(METRICS.values()) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    keys = ["base", "seed", "k_shot"]
    for model in models:
        rows = frame[frame["model"] == model]
        zero = rows[rows["few_anomalies"] == 0].set_index(keys)
        if zero.empty:
            continue
        spread = zero.groupby(level="base")[list(METRICS)].std(ddof=1).mean()
        lines.append(f"| {model} | seed spread at 0 | " + " | ".join(f"{spread[m]:.3f}" for m in METRICS) + " |")
        for level in levels:
            if level == 0:
                continue
            other = rows[rows["few_anomalies"] == level].set_index(keys)
            change = (other[list(METRICS)] - zero[list(METRICS)]).dropna()
            if change.empty:
                continue
            lines.append(f"| {model} | {level} − 0 | " + " | ".join(_pm(change[m]) for m in METRICS) + " |")
    controls = [(m, b) for m in models for b in models if re.fullmatch(rf"{b.lower()}_seed_\d+", m.lower())]
    for control, base_model in controls:  # a retrained copy (other training seed): training noise, same data
        a = frame[frame["model"] == control].set_index([*keys, "few_anomalies"])
        b = frame[frame["model"] == base_model].set_index([*keys, "few_anomalies"])
        change = (a[list(METRICS)] - b[list(METRICS)]).dropna()
        if not change.empty:
            cells = " | ".join(_pm(change[m]) for m in METRICS)
            lines.append(f"| {base_model} | `{control}` − {base_model} (training seed, same few_anomalies) | {cells} |")
    if per_direction:
        lines += [
            "",
            "Per direction (mean ± std over reference seeds).",
            "",
            "| model | direction | few_anomalies | " + " | ".join(METRICS.values()) + " |",
            "|---|---|---|" + "---|" * len(METRICS),
        ]
        for model in models:
            for base in dict.fromkeys(frame["base"]):
                for level in levels:
                    rows = frame[
                        (frame["model"] == model) & (frame["base"] == base) & (frame["few_anomalies"] == level)
                    ]
                    if not rows.empty:
                        cells = " | ".join(_pm(rows[m]) for m in METRICS)
                        lines.append(f"| {model} | {base} | {level} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Command line: run folders (each with ``results.csv``) → ``<out>/table.md``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("folders", nargs="+", type=Path, help="run folders, each with results.csv")
    parser.add_argument("--out", type=Path, required=True, help="folder for table.md")
    parser.add_argument("--per-direction", action="store_true", help="add a table per direction")
    args = parser.parse_args(argv)
    text = tables(load_rows(args.folders), per_direction=args.per_direction)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
