"""Training time of the meta-learning models against the number of source classes, on generated data.

For each number of source classes (default 2, 5 and 15) and each setting (a model option, e.g. the bound on
the episodes of an epoch and its ``None`` = unbounded), one ``Engine.fit`` of the model on that many generated
classes (``anomalib_cgad.data.make_synthetic_mvtec``: the five families and their numbered variants), with the
same images per class and the same epochs, timed by phase:

- ``pool_s``: the training pool (every training image encoded once, the synthetic anomalies);
- ``epochs_s``: the training epochs without their validation (data loading and episodes);
- ``batches``: training batches Lightning iterated; ``steps`` and ``step_ms``: episodes run (a batch past the
  epoch's episode budget is skipped) and the mean wall time of an episode (the per-step cost); ``outer_steps``:
  episodes whose outer level had anomalous patches to step on;
- ``val_s``: validation on the source classes' test images, once after the last epoch unless ``--val-every``
  (it grows with the classes by design: it calibrates the operating point on every training class and scores
  every class's test images; bound it with ``--val-images`` or Lightning's ``limit_val_batches``);
- ``train_s = pool_s + epochs_s``: the training time the bound is about; ``fit_s``: the whole fit; the
  ``_cpu_s`` columns: the same in CPU seconds of this process (``time.process_time``), which a shared machine
  disturbs much less than the wall time.

``ratio_15_to_5`` (in ``speed.md``) divides ``train_s`` at the largest class count by ``train_s`` at 5 classes.
Results go to a new ``<out>/train_speed/v<N>/`` (``speed.csv``, ``speed.md``).

Example:
    $ OMP_NUM_THREADS=1 python -m benchmarks.train_speed --model CGAD --classes 2 5 15 \\
          --setting bounded= --setting unbounded='{"episodes": {"epoch_classes": null}}' --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from lightning.pytorch import Callback

from benchmarks.config import build_module

FAMILIES = ("stripes", "dots", "checker", "washer")
TARGET = "waves"
"""The unseen class every fit is validated against is never a source: a fit's cost, not its accuracy, is timed."""


def source_classes(count: int) -> list[str]:
    """The first ``count`` source classes: the four families, then their variants 1, 2, … (``waves`` is the target).

    Taking a prefix of one list keeps the smaller runs' classes inside the larger runs'.
    """
    from anomalib_cgad.data.synthetic import VARIANTS

    names = [*FAMILIES, *(f"{family}_{n}" for n in range(1, VARIANTS + 1) for family in (*FAMILIES, TARGET))]
    if not 1 <= count <= len(names):
        msg = f"--classes must lie in 1..{len(names)}, got {count}."
        raise ValueError(msg)
    return names[:count]


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


class PhaseTimer(Callback):
    """Wall and CPU time of the pool build, the training epochs (validation excluded), the episodes and
    validation (the CPU time of this process counts much less of the other jobs on a shared machine)."""

    PHASES = ("pool", "epochs", "steps", "val")

    def __init__(self) -> None:
        self.wall = dict.fromkeys(self.PHASES, 0.0)
        self.cpu = dict.fromkeys(self.PHASES, 0.0)
        self.steps = 0
        self._start: dict[str, tuple[float, float]] = {}

    def _begin(self, phase: str) -> None:
        self._start[phase] = _clock()

    def _end(self, phase: str) -> None:
        if phase in self._start:
            (wall, cpu), (now_wall, now_cpu) = self._start.pop(phase), _clock()
            self.wall[phase] += now_wall - wall
            self.cpu[phase] += now_cpu - cpu

    def on_train_start(self, trainer, pl_module) -> None:  # runs before the model's hook, which builds the pool
        self._begin("pool")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._begin("epochs")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if "pool" in self._start:  # the first step: the model's on_train_start (the pool) is done
            self._end("pool")
            self._begin("epochs")
        self._begin("steps")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._end("steps")
        self.steps += bool(outputs)  # a step the model skipped returned nothing: Lightning passes {}

    def on_validation_start(self, trainer, pl_module) -> None:
        self._end("epochs")  # validation runs inside the training epoch, at its end
        self._begin("val")

    def on_validation_end(self, trainer, pl_module) -> None:
        self._end("val")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._end("epochs")


def fit_once(model_name: str, options: dict, classes: list[str], data: Path, work: Path, args) -> dict:
    """One timed fit; the row of ``speed.csv``."""
    from anomalib.engine import Engine
    from anomalib.models import get_model
    from lightning.pytorch import seed_everything

    from anomalib_cgad.data import CrossClass

    seed_everything(0, workers=True)
    size = (args.image_size, args.image_size)
    model = build_module(type(get_model(model_name)), size, options, "the timed model's arguments")
    datamodule = CrossClass(
        source_dataset="MVTecAD", source_root=str(data), source_categories=classes, target_categories=[TARGET],
        k_shot=args.k_shot, train_batch_size=args.batch_size, eval_batch_size=args.batch_size,
    )  # fmt: skip
    timer = PhaseTimer()
    engine = Engine(
        max_epochs=args.epochs, default_root_dir=work, accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False, callbacks=[timer], check_val_every_n_epoch=args.val_every or args.epochs,
    )  # fmt: skip
    wall, cpu = time.perf_counter(), time.process_time()
    engine.fit(model=model, datamodule=datamodule)
    fit_s, cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    wall, cpu = timer.wall, timer.cpu
    return {
        "model": model_name,
        "classes": len(classes),
        "images_per_class": args.images_per_class,
        "epochs": args.epochs,
        "batches": engine.trainer.num_training_batches * args.epochs,
        "steps": timer.steps,
        "outer_steps": getattr(model, "outer_steps", None),
        "step_ms": round(1000 * wall["steps"] / max(timer.steps, 1), 1),
        "pool_s": round(wall["pool"], 2),
        "epochs_s": round(wall["epochs"], 2),
        "train_s": round(wall["pool"] + wall["epochs"], 2),
        "train_cpu_s": round(cpu["pool"] + cpu["epochs"], 2),
        "val_s": round(wall["val"], 2),
        "fit_s": round(fit_s, 2),
        "fit_cpu_s": round(cpu_s, 2),
    }


def _setting(text: str) -> tuple[str, dict]:
    name, _, options = text.partition("=")
    try:
        parsed = json.loads(options) if options.strip() else {}
    except json.JSONDecodeError as error:
        msg = f"--setting {text!r}: the options after the first '=' must be a JSON object ({error}); NAME has no '='."
        raise SystemExit(msg) from error
    if not name or not isinstance(parsed, dict):
        example = """unbounded='{"episodes": {"epoch_classes": null}}'"""
        msg = f"--setting {text!r}: expected NAME=JSON-object, e.g. {example}."
        raise SystemExit(msg)
    return name, parsed


def ratio_table(frame: pd.DataFrame, large: int = 15, small: int = 5) -> pd.DataFrame:
    """Per setting: ``train_s`` (and ``fit_s``) at ``large`` classes over the same at ``small`` classes."""
    rows = []
    for setting, group in frame.groupby("setting", sort=False):
        by = group.set_index("classes")
        if large in by.index and small in by.index:
            rows.append({
                "setting": setting,
                f"train_s {large}/{small}": round(by.loc[large, "train_s"] / by.loc[small, "train_s"], 2),
                f"train_cpu_s {large}/{small}": round(by.loc[large, "train_cpu_s"] / by.loc[small, "train_cpu_s"], 2),
                f"steps {large}/{small}": round(by.loc[large, "steps"] / by.loc[small, "steps"], 2),
                f"fit_s {large}/{small}": round(by.loc[large, "fit_s"] / by.loc[small, "fit_s"], 2),
            })  # fmt: skip
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> Path:
    """Parse the options, generate the classes, fit each (classes, setting) once, write the tables."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="CGAD", help="CGAD or MetaAD")
    parser.add_argument("--classes", nargs="+", type=int, default=[2, 5, 15], help="numbers of source classes")
    parser.add_argument(
        "--setting", action="append", type=_setting, metavar="NAME=JSON",
        help="a model setting, e.g. unbounded='{\"episodes\": {\"epoch_classes\": null}}' (repeatable)",
    )  # fmt: skip
    parser.add_argument("--images-per-class", type=int, default=16, help="normal training images per class")
    parser.add_argument("--val-images", type=int, default=2, help="normal and defective test images per class")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--val-every", type=int, help="validate every N epochs (default: once, after the last)")
    parser.add_argument("--batch-size", type=int, default=8, help="training and evaluation batch size")
    parser.add_argument("--k-shot", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    parser.add_argument("--out", default="results", help="results root; the run goes to <out>/train_speed/v<N>")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    settings = args.setting or [("defaults", {})]
    torch.set_num_threads(args.threads)

    from anomalib_cgad.data import make_synthetic_mvtec
    from benchmarks.runner import next_run_folder

    lists = {count: source_classes(count) for count in args.classes}
    out = next_run_folder(args.out, "train_speed")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        data = make_synthetic_mvtec(
            work / "data", categories=(*lists[max(lists)], TARGET), n_train=args.images_per_class,
            n_test_good=args.val_images, n_test_bad=args.val_images, image_size=args.image_size, seed=0,
        )  # fmt: skip
        for count, classes in lists.items():
            for name, options in settings:
                row = {"setting": name, **fit_once(args.model, options, classes, data, work / f"{name}_{count}", args)}
                rows.append(row)
                print(pd.DataFrame(rows).to_string(index=False), flush=True)
                pd.DataFrame(rows).to_csv(out / "speed.csv", index=False)  # each point kept if a later one fails
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "speed.csv", index=False)
    ratios = ratio_table(frame, large=max(lists), small=5 if 5 in lists else min(lists))
    command = "python -m benchmarks.train_speed " + " ".join(argv)
    header = (
        f"# Training time against the number of source classes, one run\n\n`{command}` on "
        f"{platform.processor() or platform.machine()}, torch threads {args.threads}, torch {torch.__version__}. "
        f"Settings: {dict(settings)}. Wall seconds; `train_s` = `pool_s` + `epochs_s` (validation excluded, "
        "in `val_s`).\n\n"
    )
    body = frame.to_markdown(index=False) + "\n\n" + (ratios.to_markdown(index=False) + "\n" if len(ratios) else "")
    (out / "speed.md").write_text(header + body)
    print(body)
    print(f"results in {out}")
    return out


if __name__ == "__main__":
    main()
