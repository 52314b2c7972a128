"""Export time: our models against a built-in anomalib model, every export type, in one run.

For each model, a 1-epoch fit on one generated class (the weights do not change the graph, so neither do they
change the export time), then ``torch``, ``onnx`` and ``openvino`` exports into a fresh root, each timed in wall
seconds and in CPU seconds of this process (``time.process_time``: on a shared machine the wall time also counts
the other jobs, the CPU time much less so). For our models the OpenVINO export is timed twice:

- ``openvino (before)``: what the export did before this benchmark was written: anomalib's exporter for
  ``model.xml`` (its own trace + ONNX + conversion) plus the two bank graphs, with onnxscript's optimiser on
  every ONNX file;
- ``openvino``: the current export: the two bank graphs with the optimiser off, ``model.xml`` derived from
  ``bank_model`` by freezing the bank inputs (:func:`anomalib_cgad.deploy.openvino.single_input_ir`).

and the current one is split into its phases (``bank_model``, ``bank_encoder`` conversion, ``model.xml``
freeze), which says what dominates. Results go to a new ``<out>/export_time/v<N>/`` (``results.csv``,
``results.md``).

Example:
    $ python -m benchmarks.export_time --models CGAD ResAD MetaAD Padim --out benchmarks/results
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from benchmarks.config import build_module


@contextlib.contextmanager
def _timer(row: dict):
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    row["wall_s"] = round(time.perf_counter() - wall, 1)
    row["cpu_s"] = round(time.process_time() - cpu, 1)


def _model(name: str, image_size: int):
    from anomalib.models import Padim, get_model

    if name == "Padim":  # untrained backbone weights: timm cannot download them here, and time does not care
        return Padim(backbone="resnet18", pre_trained=False, visualizer=False)
    return build_module(type(get_model(name)), (image_size, image_size))


def _fit(name: str, data: Path, work: Path, image_size: int):
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine

    model = _model(name, image_size)
    datamodule = MVTecAD(root=data, category="waves", train_batch_size=4, eval_batch_size=4, num_workers=0)
    engine = Engine(max_epochs=1, default_root_dir=work, accelerator="cpu", devices=1, logger=False,
                    enable_progress_bar=False)  # fmt: skip
    engine.fit(model=model, datamodule=datamodule)
    return model.eval()


@contextlib.contextmanager
def _phases(rows: list[dict], name: str):
    """Time each bank-graph conversion and the model.xml freeze of our export as separate rows."""
    import anomalib_cgad.deploy.openvino as module

    convert, freeze = module._convert, module.single_input_ir

    def timed_convert(graph, *args, **kwargs):
        row = {"model": name, "export": f"  phase: {type(graph).__name__.strip('_')} trace + ONNX + OpenVINO"}
        with _timer(row):
            convert(graph, *args, **kwargs)
        rows.append(row)

    def timed_freeze(*args, **kwargs):
        row = {"model": name, "export": "  phase: model.xml = bank_model with the bank frozen"}
        with _timer(row):
            result = freeze(*args, **kwargs)
        rows.append(row)
        return result

    module._convert, module.single_input_ir = timed_convert, timed_freeze
    try:
        yield
    finally:
        module._convert, module.single_input_ir = convert, freeze


@contextlib.contextmanager
def _before():
    """The export as it was: optimiser on, anomalib's exporter for model.xml (forced by passing onnx_kwargs)."""
    import anomalib_cgad.deploy.openvino as module

    options = dict(module.ONNX_FOR_OPENVINO)
    module.ONNX_FOR_OPENVINO.clear()
    try:
        yield {"onnx_kwargs": {"opset_version": module.OPSET}}
    finally:
        module.ONNX_FOR_OPENVINO.update(options)


def measure(name: str, model, work: Path, before: bool) -> list[dict]:
    """Rows ``{model, export, wall_s, cpu_s}`` of every export type of ``model``."""
    from anomalib.deploy import ExportType

    from anomalib_cgad.deploy import BankExportMixin

    ours = isinstance(model, BankExportMixin)
    rows: list[dict] = []
    for export_type in (ExportType.TORCH, ExportType.ONNX, ExportType.OPENVINO):
        root = Path(tempfile.mkdtemp(dir=work))
        row = {"model": name, "export": export_type.value}
        phase_rows: list[dict] = []
        timed = ours and export_type == ExportType.OPENVINO
        with _phases(phase_rows, name) if timed else contextlib.nullcontext(), _timer(row):
            getattr(model, f"to_{export_type.value}")(root)
        rows.extend([row, *phase_rows])
        shutil.rmtree(root)
    if ours and before:
        root = Path(tempfile.mkdtemp(dir=work))
        row = {"model": name, "export": "openvino (before)"}
        with _before() as kwargs, _timer(row):
            model.to_openvino(root, **kwargs)
        rows.append(row)
        shutil.rmtree(root)
    return rows


def main(argv: list[str] | None = None) -> Path:
    """Parse the options, fit and export every model, write the tables."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.export_time", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["CGAD", "ResAD", "MetaAD", "Padim"])
    parser.add_argument("--image-size", type=int, default=256, help="our models' input size (Padim: 256)")
    parser.add_argument("--before", nargs="*", default=["CGAD"], help="models that also get 'openvino (before)'")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    parser.add_argument("--out", default="results", help="results root; the run goes to <out>/export_time/v<N>")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from anomalib_cgad.data import make_synthetic_mvtec
    from benchmarks.runner import next_run_folder

    out = next_run_folder(args.out, "export_time")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        data = make_synthetic_mvtec(work / "data", categories=("waves",), seed=0)
        for name in args.models:
            model = _fit(name, data, work / name, args.image_size)
            rows.extend(measure(name, model, work, before=name in args.before))
            print(pd.DataFrame(rows).to_string(index=False), flush=True)
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "results.csv", index=False)
    command = "python -m benchmarks.export_time " + " ".join(argv)
    header = (
        f"# Export time, one run\n\n`{command}` on {platform.processor() or platform.machine()}, "
        f"torch threads {args.threads}, {torch.__version__}. Wall and CPU seconds of this process.\n\n"
    )
    (out / "results.md").write_text(header + frame.to_markdown(index=False) + "\n")
    print(f"results in {out}")
    return out


if __name__ == "__main__":
    main()
