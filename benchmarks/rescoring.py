"""What the re-scoring scripts share: a trained checkpoint, a preset direction's data and a CSV that is never
overwritten (``operating_point_ablation``, ``score_head_ablation``)."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path


def checkpoint_parser(prog: str, max_eval_per_class: int | None, epilog: str | None = None) -> argparse.ArgumentParser:
    """The arguments of a re-scoring script: checkpoint, model, preset, direction, k, seeds, test subsample, out."""
    parser = argparse.ArgumentParser(prog=prog, epilog=epilog)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--model", default="CGAD")
    parser.add_argument("--preset", default="elpv_operating_point")
    parser.add_argument("--direction", required=True, help="a direction of the preset, e.g. mono_to_poly")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--max-eval-per-class", type=int, default=max_eval_per_class, help="as the benchmark run (ELPV: 150)"
    )
    parser.add_argument("--out", required=True, type=Path)
    return parser


def load_direction(args: argparse.Namespace, prefix: str):
    """``(config, direction, module, model, transform, root)``: the preset's direction with its test subsample,
    the checkpoint's module (eval mode), its torch model and pre-processing, and the data folder (generated
    presets: the same classes the benchmark run trained on, same generator settings and seed)."""
    import anomalib_cgad
    from benchmarks.config import load_config
    from benchmarks.data import generate_data

    config = load_config(preset=args.preset)
    config["max_eval_per_class"] = args.max_eval_per_class
    direction = next(d for d in config["directions"] if d["name"] == args.direction)
    module = getattr(anomalib_cgad, args.model).load_from_checkpoint(args.checkpoint).eval()
    root = generate_data(config, direction, Path(tempfile.mkdtemp(prefix=prefix)))
    return config, direction, module, module.model.eval(), module.pre_processor.transform, root


def write_rows(args: argparse.Namespace, run: Callable[[argparse.Namespace], list[dict]]) -> None:
    """Run and write ``args.out`` as CSV; an existing file is refused before anything runs."""
    import pandas as pd

    if args.out.exists():
        raise SystemExit(f"error: '{args.out}' exists; choose a new file.")
    rows = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(args.out, index=False)
