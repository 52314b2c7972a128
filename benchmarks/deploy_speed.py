"""Deployment speed: torch CPU vs OpenVINO CPU, and the model vs its bare backbone, in one run.

For one model (``CGAD`` by default) at one image size, measures images/s and the median latency per image at
batch 1 and batch 8 of:

1. ``backbone (torch)``: the bare feature extractor forward (the reference: CGAD's test-time cost is
   reported as a multiple of it);
2. ``<model> (torch)``: the Lightning module's forward (pre-processor → model → post-processor);
3. ``backbone (OpenVINO f32)`` and ``<model> (OpenVINO f32)``: the exported graphs compiled with
   ``INFERENCE_PRECISION_HINT=f32`` (the parity setting); the model graph is ``bank_model.xml``, the deployed
   graph with the reference bank as an input (anomalib's ``model.xml`` has the same operations with the bank
   frozen);
4. ``<model> (OpenVINO bf16)``: the CPU plugin's bf16 mode, only when the CPU reports BF16 (labelled; its
   scores move by ~1e-2, see the README).

Each torch row also gets its arithmetic, counted by ``torch.utils.flop_counter`` on one batch-1 forward
(FLOPs per image do not depend on the batch), and ``results.md`` splits the model's count into the torch
model's parts (backbone, constraintor, flow, map; what no sub-module runs, e.g. the nearest-reference search,
is ``other``): the latency ratio cannot drop much below the arithmetic ratio when both run at the same
FLOP rate.

With ``--compare KEY=VALUE ...`` a second variant of the model (the same weights, those constructor arguments
changed, e.g. ``bank.coreset=0.5``) is exported and timed in the same rounds, as rows named
``<model> (KEY=VALUE)``.

The model is **untrained** (random flow and constraintor weights, ImageNet backbone, bank from k random
images): latency does not depend on the trained values. Every timing takes ``--warmup`` un-timed calls, then
``--iterations`` timed rounds; each round calls every component once, in turn, so a slow spell of the machine
hits all of them alike instead of one (on this shared 2-core machine the same backbone measured 11.9 and
14.6 ms per image in two runs minutes apart). The table reports each component's median. Results go to a new
``<out>/<model>_<size>px/v<N>/`` folder (``results.csv``, ``results.md``, ``environment.json``); an existing
folder is never reused.

On a machine shared with other jobs, pass ``--threads 1``: with more threads than free cores, torch's OpenMP
barriers stall (a 64 px backbone forward went from 8 ms with 1 thread to 0.2-3 s with 2 threads on a loaded
2-core machine), which measures the contention, not the model.

Example:
    $ python -m benchmarks.deploy_speed --model CGAD --image-size 256 --out results/deploy_speed
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from anomalib_cgad.versioning import next_version_folder
from benchmarks.config import build_module

MODELS = ("CGAD", "ResAD", "MetaAD")


def timed_rounds(functions: Sequence[Callable[[], object]], warmup: int, iterations: int) -> list[float]:
    """Median wall time (s) of each function over ``iterations`` rounds that call every function once, in turn.

    ``warmup`` un-timed rounds come first.
    """
    times: list[list[float]] = [[] for _ in functions]
    for round_index in range(warmup + iterations):
        for function, record in zip(functions, times, strict=True):
            start = time.perf_counter()
            function()
            if round_index >= warmup:
                record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def flops_per_image(function: Callable[[torch.Tensor], object], image: torch.Tensor) -> tuple[int, dict[str, int]]:
    """FLOPs of ``function(image)`` for one image ``(1, 3, H, W)``, and per module path (``FlopCounterMode``)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        function(image)
    per_module = {name: sum(counts.values()) for name, counts in counter.get_flop_counts().items()}
    return counter.get_total_flops(), per_module


def model_parts(per_module: dict[str, int], root: str) -> dict[str, int]:
    """FLOPs of each direct child of the torch model ``root`` (e.g. ``CGAD.model``), plus ``other`` for the rest."""
    depth = root.count(".") + 1
    parts = {name.rsplit(".", 1)[1]: flops for name, flops in per_module.items()
             if name.startswith(root + ".") and name.count(".") == depth}  # fmt: skip
    parts["other"] = per_module.get(root, 0) - sum(parts.values())
    return parts


def _operating_point(inferencer, bank) -> np.ndarray:
    """The bank graph's ``operating_point`` input for timing: the bank's statistics, ``tau = 0`` (cost is the same)."""
    del inferencer
    return np.array([*np.asarray(bank.reference_stats).reshape(2), 0.0], dtype=np.float32)


def _bf16_supported(core) -> bool:
    try:
        return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except RuntimeError:
        return False


def _export_backbone(backbone: torch.nn.Module, size: int, xml: Path) -> None:
    import openvino as ov

    example = torch.rand(1, 3, size, size)
    onnx_path = xml.with_suffix(".onnx")
    torch.onnx.export(
        backbone,
        (example,),
        str(onnx_path),
        dynamo=True,
        opset_version=18,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    ov.save_model(ov.convert_model(onnx_path), xml)


def build_model(name: str, size: int, k: int, seed: int, options: dict | None = None):
    """An untrained ``name`` at ``size`` px (with constructor ``options``) holding a bank of ``k`` random images."""
    import anomalib_cgad

    torch.manual_seed(seed)
    model = build_module(getattr(anomalib_cgad, name), (size, size), options, "--set / --compare", k_shot=k)
    model.eval()
    model.set_references(torch.rand(k, 3, size, size))
    return model


def _variants(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(component name, constructor arguments) of the model and of its ``--compare`` variant."""
    variants = [(args.model, dict(args.set))]
    if args.compare:
        variants.append((f"{args.model}{_options_text(args.compare)}", {**args.set, **args.compare}))
    return variants


def run(args: argparse.Namespace) -> tuple[list[dict], Path]:
    """Time every variant at every batch size; write the results; return the rows and the folder.

    ``--threads`` applies to this run only: torch's thread count is restored afterwards (a caller in the same
    process, e.g. a test session, keeps its own).
    """
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _timed_run(args)
    finally:
        torch.set_num_threads(threads)


def _timed_run(args: argparse.Namespace) -> tuple[list[dict], Path]:
    import openvino as ov

    from anomalib_cgad.deploy import BankInferencer, export_swappable_bank

    suffix = "".join(f"_{key}{value}" for key, value in args.set.items())
    folder = next_version_folder(Path(args.out) / f"{args.model}{suffix}_{args.image_size}px")
    size = args.image_size
    models = {name: build_model(args.model, size, args.k, args.seed, options) for name, options in _variants(args)}
    first = next(iter(models.values()))
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    if args.threads:
        config["INFERENCE_NUM_THREADS"] = args.threads
    with tempfile.TemporaryDirectory() as tmp:
        print(f"Exporting {', '.join(models)} ({size}px) and the backbone to OpenVINO ...", flush=True)
        start = time.perf_counter()
        inferencers: dict[tuple[str, str], tuple] = {}
        for index, (name, model) in enumerate(models.items()):
            export_folder = export_swappable_bank(model, Path(tmp) / f"model_{index}", input_size=None)
            f32 = BankInferencer(export_folder, config=config)
            inferencers[(name, "f32")] = (f32, f32.default_bank)
            if _bf16_supported(core) and not args.no_bf16:
                bf16 = BankInferencer(export_folder, config={**config, "INFERENCE_PRECISION_HINT": "bf16"})
                inferencers[(name, "bf16")] = (bf16, f32.default_bank)
        backbone_xml = Path(tmp) / "backbone.xml"
        _export_backbone(first.model.backbone, size, backbone_xml)
        export_seconds = time.perf_counter() - start
        ov_backbone = core.compile_model(backbone_xml, "CPU", config)
        flops, parts = {}, {}
        for name, model in models.items():
            flops[name], per_module = flops_per_image(model, torch.rand(1, 3, size, size))
            parts[name] = model_parts(per_module, f"{model.__class__.__name__}.model")
        flops["backbone"] = parts[next(iter(models))]["backbone"]  # the bare backbone row runs the same module
        rows = []
        for batch_size in args.batch_sizes:
            images = torch.rand(batch_size, 3, size, size)
            normalised = first.pre_processor.transform(images)
            array = images.numpy()
            normalised_array = normalised.numpy()
            variants: list[tuple[str, str, str, Callable[[], object]]] = [
                ("backbone", "torch", "f32", lambda x=normalised: first.model.backbone(x)),
                *((name, "torch", "f32", lambda x=images, m=model: m(x)) for name, model in models.items()),
                ("backbone", "OpenVINO", "f32", lambda x=normalised_array: ov_backbone(x)),
            ]
            for (name, precision), (inferencer, bank) in inferencers.items():
                run = lambda x=array, i=inferencer, b=bank: i.model([x, *b.tensors, _operating_point(i, b)])  # noqa: E731
                variants.append((name, "OpenVINO", precision, run))
            with torch.no_grad():
                medians = timed_rounds([function for *_, function in variants], args.warmup, args.iterations)
            for (component, runtime, precision, _), seconds in zip(variants, medians, strict=True):
                rows.append({
                    "model": args.model,
                    "component": component,
                    "runtime": runtime,
                    "precision": precision,
                    "image_size": size,
                    "batch_size": batch_size,
                    "ms_per_image": 1000 * seconds / batch_size,
                    "images_per_s": batch_size / seconds,
                    "ms_per_batch": 1000 * seconds,
                    "mflop_per_image": flops[component] / 1e6 if runtime == "torch" else float("nan"),
                })  # fmt: skip
                print(f"  batch {batch_size:>2} {component:>8} {runtime:>8} {precision}: "
                      f"{1000 * seconds / batch_size:8.2f} ms/image", flush=True)  # fmt: skip
    _add_ratios(rows)
    _write(folder, rows, args, export_seconds, parts, flops["backbone"])
    return rows, folder


def _add_ratios(rows: list[dict]) -> None:
    """``vs_backbone`` (the backbone of the same runtime, f32) and ``speedup_vs_torch`` (same component)."""
    lookup = {(r["component"], r["runtime"], r["precision"], r["batch_size"]): r for r in rows}
    for row in rows:
        backbone = lookup.get(("backbone", row["runtime"], "f32", row["batch_size"]))
        row["vs_backbone"] = row["ms_per_image"] / backbone["ms_per_image"] if backbone else float("nan")
        row["flops_vs_backbone"] = row["mflop_per_image"] / backbone["mflop_per_image"] if backbone else float("nan")
        torch_row = lookup.get((row["component"], "torch", "f32", row["batch_size"]))
        row["speedup_vs_torch"] = torch_row["ms_per_image"] / row["ms_per_image"] if torch_row else float("nan")


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| component | runtime | precision | batch | ms / image (median) | images / s | × backbone "
        "| × faster than torch | MFLOP / image | FLOPs × backbone |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['component']} | {r['runtime']} | {r['precision']} | {r['batch_size']} | {r['ms_per_image']:.2f} "
            f"| {r['images_per_s']:.2f} | {r['vs_backbone']:.2f} | {r['speedup_vs_torch']:.2f} "
            f"| {_number(r['mflop_per_image'], '.1f')} | {_number(r['flops_vs_backbone'], '.2f')} |"
        )
    return "\n".join(lines)


def _number(value: float, spec: str) -> str:
    return "–" if value != value else format(value, spec)  # NaN (an OpenVINO row) → dash


def parts_table(parts: dict[str, dict[str, int]], backbone_flops: int) -> str:
    """Each variant's FLOPs per image by part of the torch model, in MFLOP and as a share of the backbone's."""
    lines = ["| variant | part | MFLOP / image | × backbone |", "|---|---|---:|---:|"]
    for name, counts in parts.items():
        for part, value in counts.items():
            lines.append(f"| {name} | {part} | {value / 1e6:.1f} | {value / backbone_flops:.2f} |")
    return "\n".join(lines)


def _environment(args: argparse.Namespace, export_seconds: float) -> dict:
    import openvino as ov

    return {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.deploy_speed", *sys.argv[1:]]),
        "model": args.model,
        "model_args": args.set,
        "compare_args": args.compare,
        "image_size": args.image_size,
        "k_shot": args.k,
        "warmup": args.warmup,
        "iterations": args.iterations,
        "trained": False,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "openvino": ov.__version__,
        "numpy": np.__version__,
        "export_seconds": round(export_seconds, 1),
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _write(
    folder: Path,
    rows: list[dict],
    args: argparse.Namespace,
    export_seconds: float,
    parts: dict[str, dict[str, int]],
    backbone_flops: int,
) -> None:
    with (folder / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    environment = _environment(args, export_seconds)
    (folder / "environment.json").write_text(json.dumps(environment, indent=2))
    header = (
        f"# Deployment speed: {args.model}{_options_text(args.set)}, {args.image_size}px, k={args.k} "
        "(untrained weights; timing only)\n\n"
        f"`{environment['command']}`: median of {args.iterations} interleaved rounds after {args.warmup} warm-up "
        "rounds (each round calls every row's component once), "
        f"{environment['cpu_count']} CPU(s), torch {environment['torch']} ({environment['torch_threads']} threads), "
        f"OpenVINO {environment['openvino']}, 1-min load average at the end {environment['loadavg_1min']}.\n\n"
    )
    arithmetic = (
        "\n\n## Arithmetic per image by part\n\nCounted by `torch.utils.flop_counter` on one batch-1 torch forward; "
        "`other` is what no sub-module of the torch model runs (the nearest-reference search of ResAD and CGAD).\n\n"
    )
    (folder / "results.md").write_text(
        header + markdown_table(rows) + arithmetic + parts_table(parts, backbone_flops) + "\n"
    )


def _options_text(options: dict) -> str:
    return f" ({', '.join(f'{key}={value}' for key, value in options.items())})" if options else ""


def _model_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with a YAML value (``flow.coupling_blocks=2`` → ``("flow.coupling_blocks", 2)``)."""
    import yaml

    key, separator, value = text.partition("=")
    if not separator or not all(part.isidentifier() for part in key.split(".")):
        msg = f"expected KEY=VALUE (e.g. flow.coupling_blocks=2), got '{text}'"
        raise argparse.ArgumentTypeError(msg)
    return key, yaml.safe_load(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.deploy_speed", description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=MODELS, default="CGAD")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--k", type=int, default=4, help="reference images in the bank (default: 4)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch and OpenVINO threads (0 = their defaults)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the OpenVINO bf16 row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set",
        type=_model_option,
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="model constructor arguments, e.g. --set flow.coupling_blocks=2 flow.condition_dim=32",
    )
    parser.add_argument(
        "--compare",
        type=_model_option,
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="also time the model with these arguments changed, in the same rounds (e.g. bank.coreset=0.5)",
    )
    parser.add_argument("--out", default="results/deploy_speed")
    args = parser.parse_args(argv)
    args.set = dict(args.set)
    args.compare = dict(args.compare)
    if args.image_size < 32 or min(args.batch_sizes) < 1 or args.iterations < 1 or args.warmup < 0 or args.k < 1:
        parser.error("--image-size >= 32, --batch-sizes >= 1, --iterations >= 1, --warmup >= 0 and --k >= 1.")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table."""
    args = parse_args(argv)
    _, folder = run(args)
    print()
    print((folder / "results.md").read_text())
    print(f"\nWrote {folder / 'results.csv'} and {folder / 'results.md'}")


if __name__ == "__main__":
    main()
