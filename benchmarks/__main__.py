"""Command line of the benchmarks: ``python -m benchmarks run --preset elpv --quick``.

Example:
    $ python -m benchmarks run --preset elpv --quick
    $ python -m benchmarks run --preset elpv --models CGAD PatchKNN --k-shot 1 4 --seeds 0
    $ python -m benchmarks run --protocol my_protocol.yaml --out results/benchmarks
    $ python -m benchmarks list
    $ python -m benchmarks tasks --preset mvtec_to_visa          # the grid's (direction, model) tasks
    $ python -m benchmarks run --preset mvtec_to_visa --task 3 --out grid   # one task (a job-array element)
    $ python -m benchmarks merge grid/mvtec_to_visa                # merge the finished tasks (also automatic)
    $ python -m benchmarks merge results/a/v0 results/b/v0 --out results/merged   # runs split by --directions
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The ``run`` and ``list`` sub-commands."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a preset or a protocol YAML")
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="preset name in benchmarks/presets (elpv, synthetic, mvtec_to_visa, ...)")
    source.add_argument("--protocol", help="path of a protocol YAML (same schema as the presets)")
    run.add_argument("--models", nargs="+", help="override the models (CGAD ResAD MetaAD PatchKNN Patchcore ...)")
    run.add_argument("--k-shot", nargs="+", type=int, help="override the k values")
    run.add_argument("--seeds", nargs="+", type=int, help="override the reference seeds")
    run.add_argument("--epochs", type=int, help="override the training epochs of our models")
    run.add_argument("--image-size", type=int, help="override the square input size")
    run.add_argument("--max-eval-per-class", type=int, help="at most N normal + N anomalous eval images per class")
    run.add_argument("--max-val-per-class", type=int, help="at most N normal + N anomalous source-validation images")
    run.add_argument("--source-root", help="folder of the source dataset (presets on downloaded data)")
    run.add_argument("--target-root", help="folder of the target dataset (presets on downloaded data)")
    run.add_argument("--directions", nargs="+", help="run only these directions of the protocol (by name)")
    run.add_argument("--quick", action="store_true", help="apply the preset's quick section (short CPU run)")
    run.add_argument("--out", default="results/benchmarks", help="results root; each run gets a new v<N> folder")
    run.add_argument(
        "--task", help="run only task I of the grid (an index, or 'env' for $SLURM_ARRAY_TASK_ID / $TASK_ID)"
    )
    commands.add_parser("list", help="list the presets")
    listing = commands.add_parser("tasks", help="list the (direction, model) tasks of a preset's grid")
    listing.add_argument("--preset", required=True)
    listing.add_argument("--models", nargs="+", help="override the models")
    merging = commands.add_parser(
        "merge",
        help="merge the finished tasks of a grid run (one folder, <out>/<preset>), or, with --out, runs split by "
        "--directions (run folders, each with results.csv and config.yaml) into one new report",
    )
    merging.add_argument("folders", nargs="+", type=Path, help="a grid folder, or run folders with --out")
    merging.add_argument("--out", type=Path, help="new folder for the merged report of several run folders")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run."""
    args = build_parser().parse_args(argv)
    from benchmarks.config import PRESETS, load_config, validate_config

    if args.command == "merge" and args.out is not None:
        from benchmarks.report import merge_runs

        try:
            print(f"[bench] merged into {merge_runs(args.folders, args.out)}")
        except (FileNotFoundError, FileExistsError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "list":
        for path in sorted(PRESETS.glob("*.yaml")):
            print(path.stem)
        return 0
    from benchmarks import grid

    if args.command == "merge":
        if len(args.folders) != 1:
            print("error: merge takes one grid folder, or several run folders with --out <new folder>", file=sys.stderr)
            return 2
        try:
            grid.merge(args.folders[0])
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "tasks":
        config = load_config(preset=args.preset)
        if args.models:
            config["models"] = args.models
        for index, task in enumerate(grid.tasks(config)):
            print(index, task["name"])
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = load_config(preset=args.preset, protocol=args.protocol, quick=args.quick)
        overrides = {
            "models": args.models,
            "k_shot": args.k_shot,
            "seeds": args.seeds,
            "epochs": args.epochs,
            "image_size": args.image_size,
            "max_eval_per_class": args.max_eval_per_class,
            "max_val_per_class": args.max_val_per_class,
        }
        config.update({key: value for key, value in overrides.items() if value is not None})
        if args.directions:
            names = [d["name"] for d in config["directions"]]
            unknown = [name for name in args.directions if name not in names]
            if unknown:
                msg = f"Unknown directions {unknown}; the protocol has {names}."
                raise ValueError(msg)
            config["directions"] = [d for d in config["directions"] if d["name"] in args.directions]
        for direction in config["directions"]:
            if args.source_root:
                direction["source_root"] = args.source_root
            if args.target_root:
                direction["target_root"] = args.target_root
        validate_config(config)
        index = None if args.task is None else grid.task_index(args.task, len(grid.tasks(config)))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if index is None:
        from benchmarks.runner import run_benchmark

        run_benchmark(config, args.out)
    else:
        grid.run_task(config, index, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
