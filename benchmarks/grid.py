"""The benchmark grid split into independent tasks, for a job array (SLURM, xargs, ...), merged by the runner.

A protocol's grid is ``directions × models``; each ``(direction, model)`` pair is one **task**: it trains the model
once on that direction and runs every ``(k, seed)`` pass, so tasks share nothing and run on any device or machine
in any order. ``python -m benchmarks tasks --preset P`` lists them; ``python -m benchmarks run --preset P --task I
--out GRID`` runs task ``I`` (``--task env`` reads ``$SLURM_ARRAY_TASK_ID``, then ``$TASK_ID``) into
``GRID/<preset>/tasks/<direction>__<model>/v<N>/``; the task that finds every task's ``results.csv`` present merges
them into ``GRID/<preset>/merged/v<N>/`` (``results.csv``, ``speed.csv`` and the usual report), and
``python -m benchmarks merge GRID/<preset>`` does the same by hand (after a re-run of one task, say).

Example:
    $ python -m benchmarks tasks --preset mvtec_to_visa
    $ sbatch --array=0-5 --gres=gpu:1 --wrap "python -m benchmarks run --preset mvtec_to_visa --task env --out grid"
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

TASK_ENV = ("SLURM_ARRAY_TASK_ID", "TASK_ID")


def tasks(config: dict) -> list[dict]:
    """One configuration per ``(direction, model)``, in a fixed order (directions outer, models inner)."""
    out = []
    for direction in config["directions"]:
        for model in config["models"]:
            task = copy.deepcopy(config)
            task.update(directions=[copy.deepcopy(direction)], models=[model], name=f"{direction['name']}__{model}")
            out.append(task)
    return out


def task_index(value: str, count: int) -> int:
    """``value`` (an index or ``env``) as a task index in ``[0, count)``; a clear error otherwise."""
    if value == "env":
        found = next((os.environ[name] for name in TASK_ENV if name in os.environ), None)
        if found is None:
            msg = f"--task env: none of {list(TASK_ENV)} is set (run it inside a job array or set TASK_ID)."
            raise ValueError(msg)
        value = found
    if not value.isdigit() or int(value) >= count:
        msg = f"--task must be an index in 0..{count - 1} or 'env', got {value!r}."
        raise ValueError(msg)
    return int(value)


def run_task(config: dict, index: int, out: str | Path) -> Path:
    """Run task ``index`` of ``config``'s grid under ``<out>/<name>/tasks``; merge when it is the last to finish."""
    from benchmarks.runner import run_benchmark

    grid = Path(out) / config["name"]
    folder = run_benchmark(tasks(config)[index], grid / "tasks")
    if not missing_tasks(config, grid):
        merge(grid, config)
    return folder


def _latest(grid: Path, name: str) -> Path | None:
    runs = [p for p in (grid / "tasks" / name).glob("v*") if (p / "results.csv").is_file() and p.name[1:].isdigit()]
    return max(runs, key=lambda p: int(p.name[1:]), default=None)


def missing_tasks(config: dict, grid: Path) -> list[str]:
    """Names of the tasks with no finished ``results.csv`` under ``grid``."""
    return [task["name"] for task in tasks(config) if _latest(grid, task["name"]) is None]


def _wall_minutes(run: Path) -> float:
    """The wall time a task's ``summary.md`` reports (0 when it cannot be read)."""
    import re

    found = (
        re.search(r"wall time ([0-9.]+) min", (run / "summary.md").read_text())
        if (run / "summary.md").is_file()
        else None
    )
    return float(found.group(1)) if found else 0.0


def merge(grid: str | Path, config: dict | None = None) -> Path:
    """Concatenate the latest run of every task into ``<grid>/merged/v<N>/`` and write the report there.

    Args:
        grid (str | Path): ``<out>/<name>`` of a grid run.
        config (dict | None): the grid's configuration; ``None`` reads it from the tasks' ``config.yaml``.

    Returns:
        Path: the merged run folder.

    Raises:
        FileNotFoundError: no task has finished.
    """
    import pandas as pd
    import yaml

    from benchmarks.report import write_report
    from benchmarks.runner import RunRecorder, next_run_folder

    grid = Path(grid)
    runs = sorted(p for p in (grid / "tasks").glob("*") if _latest(grid, p.name))
    if not runs:
        msg = f"No finished task under {grid / 'tasks'} (each task writes tasks/<direction>__<model>/v<N>/)."
        raise FileNotFoundError(msg)
    latest = [_latest(grid, p.name) for p in runs]
    configs = [yaml.safe_load((run / "config.yaml").read_text()) for run in latest]
    if config is None:
        config = copy.deepcopy(configs[0])
        config["models"] = list(dict.fromkeys(m for c in configs for m in c["models"]))
        names = dict.fromkeys(d["name"] for c in configs for d in c["directions"])
        config["directions"] = [{"name": name} for name in names]
        config["name"] = grid.name
    folder = next_run_folder(grid, "merged")
    recorder = RunRecorder(folder)
    recorder.add(pd.concat([pd.read_csv(run / "results.csv") for run in latest]).to_dict("records"))
    for run in latest:
        if (run / "speed.csv").is_file():
            for row in pd.read_csv(run / "speed.csv").to_dict("records"):
                recorder.add_speed(row)
    minutes = [_wall_minutes(run) for run in latest]
    (folder / "tasks.txt").write_text(
        "merged task runs (wall minutes each; the report's wall time is their sum, not the grid's wall time):\n"
        + "".join(f"{run.relative_to(grid)} {m:.1f}\n" for run, m in zip(latest, minutes, strict=True))
    )
    write_report(folder, recorder, {}, {**config, "name": grid.name}, elapsed=60 * sum(minutes))
    print(f"[bench] merged {len(latest)} task(s) into {folder}", flush=True)
    return folder
