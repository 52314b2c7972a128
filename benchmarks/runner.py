"""Cross-class benchmark runner: our models, the patch-kNN baseline and anomalib's own models on one protocol.

For every direction (source classes → unseen target classes) of a protocol:

1. **our models** (CGAD, ResAD, MetaAD) are trained *once* on the source classes through anomalib's ``Engine``;
   then, for each ``(k, seed)``, only the references change: a new :class:`~anomalib_cgad.data.CrossClass` with
   that ``k_shot`` / ``reference_seed`` is validated on the source classes (the post-processor learns the
   *transferred* threshold with k references there) and tested on the target classes;
2. **PatchKNN** (:mod:`benchmarks.patch_knn`) is training-free and goes through the same validate + test;
3. **peers** (anomalib's Patchcore, Padim, WinClip, AnomalyDINO; :mod:`benchmarks.peers`) are fitted on the k
   references of each target class and tested on the same test images; their threshold comes from anomalib's
   default validation split for a per-class datamodule (``same_as_test``), see the README;
4. per-image raw scores, labels and (when masks exist) anomaly maps are collected by :class:`ScoreCollector`
   and turned into metrics in one place (:func:`class_metrics`), so every model is measured identically.

Results are appended after each run to ``results.csv`` (an interrupted run keeps what it finished) and the
report (``summary.md``, plots, ``speed.md``) is written at the end (:mod:`benchmarks.report`).

This module runs the passes; the other stages have their own modules, and their names stay importable from
here (``from benchmarks.runner import load_config, class_metrics, ...``):

- :mod:`benchmarks.config`: presets, model groups, :func:`load_config`, :func:`validate_config`,
  :func:`resolve_model`;
- :mod:`benchmarks.data`: the :class:`~anomalib_cgad.data.CrossClass` of a pass (:func:`make_datamodule`),
  generated classes, a peer's per-class datamodule;
- :mod:`benchmarks.collection`: :class:`ScoreCollector` and :class:`MemoryMonitor`;
- :mod:`benchmarks.metrics`: :func:`class_metrics` and the normal-only operating point's metrics;
- :mod:`benchmarks.results`: the rows of ``results.csv`` / ``speed.csv`` (:class:`RunRecorder`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from lightning.pytorch import seed_everything

from anomalib_cgad.versioning import next_version_folder
from benchmarks.collection import OVERLAYS_PER_CLASS, MemoryMonitor, ScoreCollector
from benchmarks.config import (
    ALL_MODELS,
    BASELINES,
    OURS,
    PEERS,
    PRESETS,
    build_module,
    describe,
    load_config,
    resolve_model,
    validate_config,
)
from benchmarks.data import generate_data, make_datamodule, reference_fit_datamodule, subsample_eval
from benchmarks.metrics import (
    METRICS,
    REQUESTED_RATES,
    class_metrics,
    normal_only_metrics,
    normal_only_offsets,
    unit_scale,
)
from benchmarks.results import COLUMNS, RunRecorder, mean_row, rows_from_collector, skip_rows, speed_row

__all__ = [
    "ALL_MODELS",
    "BASELINES",
    "COLUMNS",
    "METRICS",
    "OURS",
    "OVERLAYS_PER_CLASS",
    "PEERS",
    "PEER_CALIBRATION_DRAWS",
    "PRESETS",
    "REQUESTED_RATES",
    "Context",
    "MemoryMonitor",
    "RunRecorder",
    "ScoreCollector",
    "build_ours",
    "class_metrics",
    "describe",
    "generate_data",
    "load_config",
    "make_datamodule",
    "mean_row",
    "next_run_folder",
    "normal_only_metrics",
    "normal_only_offsets",
    "peer_normal_only",
    "reference_fit_datamodule",
    "resolve_model",
    "rows_from_collector",
    "run_benchmark",
    "run_ours",
    "run_peer",
    "subsample_eval",
    "unit_scale",
    "validate_config",
]


# --------------------------------------------------------------------------- models and passes
def build_ours(name: str, config: dict, k: int):
    """A fresh CGAD / ResAD / MetaAD / PatchKNN at the benchmark's image size (visualizer off).

    ``name`` may also be a *variant* of the protocol (``variants: {NAME: {model: MetaAD, args: {...}}}``):
    the base model built with those constructor arguments, e.g. for ablations. A variant may also set
    ``epochs`` (it overrides the protocol's and the model's demo epochs for that variant only) and
    ``image_size`` (the protocol's for that variant only, e.g. a backbone × resolution sweep in one run).
    """
    variant = (config.get("variants") or {}).get(name) or {}
    size = (int(variant.get("image_size") or config.get("image_size", 160)),) * 2
    name, options, _ = resolve_model(name, config)
    if name == "PatchKNN":
        from benchmarks.patch_knn import PatchKNN

        cls = PatchKNN
    else:
        import anomalib_cgad

        cls = getattr(anomalib_cgad, name)
    options.setdefault("false_alarm_rate", float(config.get("false_alarm_rate", 0.05)))
    return build_module(cls, size, options, f"the protocol's arguments for '{name}'", k_shot=k)


def _engine(folder: Path, collector: ScoreCollector, **kwargs):
    from anomalib.engine import Engine

    return Engine(
        callbacks=[collector],
        logger=False,
        default_root_dir=folder,
        accelerator="auto",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@dataclass
class Context:
    """What every model run of a direction needs."""

    config: dict
    direction: dict
    folder: Path
    recorder: RunRecorder
    data_root: Path | None
    overlays: dict = field(default_factory=dict)


def _pass_name(direction: str, model: str, k: int, seed: int) -> str:
    return f"{direction}/{model}/k={k}/seed={seed}"


def _report_line(rows: list[dict], name: str, seconds: float) -> None:
    row = rows[-1]
    extra = ""
    if row.get("image_AUROC_clear") is not None and math.isfinite(row.get("image_AUROC_clear", float("nan"))):
        extra = f" (clear {row['image_AUROC_clear']:.3f}, subtle {row['image_AUROC_subtle']:.3f})"
    print(
        f"[bench] {name} {row['class']}: image AUROC {row['image_AUROC']:.3f}{extra}, "
        f"F1 transferred {row['F1_transferred']:.3f}, oracle {row['F1_oracle']:.3f}, "
        f"normal-only {row.get('F1_normal_only', float('nan')):.3f} "
        f"(false alarms {row.get('false_alarm_rate', float('nan')):.3f}) ({seconds:.0f} s)",
        flush=True,
    )


def run_ours(ctx: Context, name: str) -> None:
    """Train (once) or set up a model of ours, then validate + test it for every ``(k, seed)``."""
    config, direction = ctx.config, ctx.direction
    ks, seeds = [int(k) for k in config["k_shot"]], [int(s) for s in config["seeds"]]
    collector = ScoreCollector()
    seed_everything(int(config.get("seed", 0)), verbose=False)  # weight init, episodes: same numbers on a rerun
    model = build_ours(name, config, ks[0])  # false_alarm_rate: the protocol's (default 0.05)
    work = ctx.folder / "work" / direction["name"] / name
    epochs = resolve_model(name, config)[2] or getattr(model, "demo_epochs", 1)
    engine = _engine(work, collector, max_epochs=int(epochs), check_val_every_n_epoch=int(epochs))
    fit_dm = make_datamodule(config, direction, ks[0], seeds[0], "validate", ctx.data_root)
    with MemoryMonitor() as memory:
        start = time.perf_counter()
        engine.fit(model=model, datamodule=fit_dm)  # trains (ONE_CLASS) or only validates (PatchKNN, FEW_SHOT)
        train_seconds = time.perf_counter() - start
        test_seconds, test_images = 0.0, 0
        for k in ks:
            for seed in seeds:
                pass_start = time.perf_counter()
                model.k_shot = k
                calibrated = int(getattr(getattr(model, "operating_point", None), "calibrated_k", -1)) == k
                # A validation on the source classes with these k references: it calibrates the operating point
                # for a new k; with one for this k it would only refit the post-processor's min/max (the
                # threshold is fixed at 0), which leaves the collected scores and labels unchanged.
                if (k, seed) != (ks[0], seeds[0]) and not calibrated:
                    engine.validate(
                        model=model,
                        datamodule=make_datamodule(config, direction, k, seed, "validate", ctx.data_root),
                        verbose=False,
                    )
                test_dm = make_datamodule(config, direction, k, seed, "test", ctx.data_root)
                collector.reset()
                engine.trainer.test(model=model, datamodule=test_dm, verbose=False)
                base = {"direction": direction["name"], "model": name, "k_shot": k, "seed": seed,
                        "threshold_from": "normal-only operating point (k references + source calibration)",
                        "requested_false_alarm_rate": model.false_alarm_rate}  # fmt: skip
                rows, examples = rows_from_collector(collector, test_dm, base)
                if len(rows) > 1:
                    rows.append(mean_row(rows))
                ctx.recorder.add(rows)
                test_seconds += collector.seconds
                test_images += len(collector.paths)
                _report_line(rows, _pass_name(direction["name"], name, k, seed), time.perf_counter() - pass_start)
                if k == max(ks) and seed == seeds[0]:
                    ctx.overlays[(direction["name"], name, k, seed)] = examples
    trained = resolve_model(name, config)[0] not in BASELINES
    ctx.recorder.add_speed(speed_row(direction["name"], name, train_seconds if trained else 0.0,
                                     test_images, test_seconds, memory))  # fmt: skip


def run_peer(ctx: Context, name: str) -> None:
    """Fit an anomalib model on the k references of each target class and test it on that class."""
    from benchmarks.peers import build_peer

    config, direction = ctx.config, ctx.direction
    ks, seeds = [int(k) for k in config["k_shot"]], [int(s) for s in config["seeds"]]
    size = (int(config.get("image_size", 160)),) * 2
    train_seconds, test_seconds, test_images = 0.0, 0.0, 0
    try:
        build_peer(name, ks[0], image_size=size)
    except RuntimeError as exc:  # e.g. WinClip / AnomalyDINO weights not reachable offline
        reason = str(exc)
        print(f"[bench] {direction['name']}/{name}: skipped ({reason})", flush=True)
        for k in ks:
            for seed in seeds:
                ctx.recorder.add(skip_rows(direction["name"], name, k, seed, direction["target_categories"], reason))
        return
    rate = float(config.get("false_alarm_rate", 0.05))
    with MemoryMonitor() as memory:
        for k in ks:
            calibration: dict = {}  # the peer's tau grid on the source classes: once per k (seeds share it)
            for seed in seeds:
                cross = make_datamodule(config, direction, k, seed, "test", ctx.data_root)
                for index, category in enumerate(cross.test_categories):
                    pass_start = time.perf_counter()
                    seed_everything(int(config.get("seed", 0)), verbose=False)  # Padim's channels, coreset draw
                    model = build_peer(name, k, image_size=size)
                    collector = ScoreCollector()
                    data = reference_fit_datamodule(cross, index, config)
                    engine = _engine(ctx.folder / "work" / direction["name"] / name, collector)
                    start = time.perf_counter()
                    try:
                        engine.fit(model=model, datamodule=data)
                        train_seconds += time.perf_counter() - start
                        collector.normal_only = peer_normal_only(model, cross, index, calibration, rate)
                        engine.trainer.test(model=model, datamodule=data, verbose=False)
                    except Exception as exc:  # a peer failing (weights fetched lazily, ...) must not end the run
                        reason = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
                        print(f"[bench] {_pass_name(direction['name'], name, k, seed)}: {reason}", flush=True)
                        ctx.recorder.add(skip_rows(direction["name"], name, k, seed, [category], reason, prefix=""))
                        continue
                    base = {"direction": direction["name"], "model": name, "k_shot": k, "seed": seed,
                            "threshold_from": "target test set (anomalib default val split)",
                            "requested_false_alarm_rate": rate}  # fmt: skip
                    rows, examples = rows_from_collector(collector, cross, base)
                    ctx.recorder.add(rows)
                    test_seconds += collector.seconds
                    test_images += len(collector.paths)
                    _report_line(rows, _pass_name(direction["name"], name, k, seed), time.perf_counter() - pass_start)
                    if k == max(ks) and seed == seeds[0]:
                        ctx.overlays.setdefault((direction["name"], name, k, seed), {}).update(examples)
    if test_images:
        ctx.recorder.add_speed(speed_row(direction["name"], name, train_seconds, test_images, test_seconds, memory))


PEER_CALIBRATION_DRAWS = 8  # each draw refits the peer k + 1 times (our models: 32 draws, no refit)


def peer_normal_only(model, cross, index: int, calibration: dict, rate: float) -> dict[float, float]:
    """A peer's normal-only thresholds (raw score units) on target class ``index``, per requested rate.

    The same rule as our models (:mod:`anomalib_cgad.components.operating_point`): ``(location, scale)`` from
    the k references by leave-one-out (the peer refitted on k − 1 of them), ``tau(rate)`` calibrated by
    episodes on the source classes' normal training images (refitting the peer on each draw of k; computed
    on the first call and kept in ``calibration``). The peer's state fitted on all k references is restored.
    """
    from anomalib_cgad.components.operating_point import (
        OperatingPoint,
        collect_normals,
        leave_one_out_statistics,
        normalised_normal_scores,
    )
    from benchmarks.peers import PeerBank

    peer = PeerBank(model)
    fitted = peer.keep()
    transform = model.pre_processor.transform
    device = next(model.model.parameters()).device
    try:
        if "point" not in calibration:
            normals = {c: x.to(device) for c, x in collect_normals(cross.train_data, cross.category_of).items()}
            point = OperatingPoint()
            pooled = normalised_normal_scores(peer, normals, cross.k_shot, transform, draws=PEER_CALIBRATION_DRAWS)
            point.set_calibration(pooled, cross.k_shot)
            calibration["point"] = point
        point = calibration["point"]
        references = cross.reference_images("test", index).to(device)
        location, scale = leave_one_out_statistics(peer, references, transform).tolist()
    finally:
        peer.restore(fitted)
    rates = sorted({*REQUESTED_RATES, rate})
    return {r: location + scale * point.tau(r) for r in rates}


def next_run_folder(root: str | Path, name: str) -> Path:
    """A new ``<root>/<name>/v<N>`` folder (never an existing one)."""
    return next_version_folder(Path(root) / name)


def run_benchmark(config: dict, out: str | Path = "results/benchmarks") -> Path:
    """Run a resolved configuration (see :func:`load_config`); return the run folder.

    Example:
        >>> folder = run_benchmark(load_config(preset="elpv", quick=True))  # doctest: +SKIP
    """
    from benchmarks.report import write_report

    validate_config(config)
    folder = next_run_folder(out, config["name"])
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    recorder = RunRecorder(folder)
    overlays: dict = {}
    started = time.perf_counter()
    print(f"[bench] {config['name']}: models {config['models']}, k {config['k_shot']}, seeds {config['seeds']}; "
          f"results in {folder}", flush=True)  # fmt: skip
    for direction in config["directions"]:
        data_root = generate_data(config, direction, folder)
        for name in config["models"]:
            ctx = Context(config, direction, folder, recorder, data_root, overlays)
            if name in PEERS:
                run_peer(ctx, name)
            else:
                run_ours(ctx, name)
    elapsed = time.perf_counter() - started
    write_report(folder, recorder, overlays, config, elapsed)
    print((folder / "summary.md").read_text())
    print(f"[bench] finished in {elapsed / 60:.1f} min; results in {folder}", flush=True)
    return folder
