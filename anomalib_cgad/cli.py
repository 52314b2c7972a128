"""``anomalib-cgad`` command line.

Subcommands:

- ``demo``: the embedded cross-class demo (train on some classes, test on an unseen one with k references).
- ``bank``: compute the reference bank of a new class from k normal images with an OpenVINO export
  (``anomalib export --export_type openvino``), without torch, retraining or re-export.
- ``predict-ov``: score images with the OpenVINO export against a bank; prints score and label per image and
  optionally writes anomaly-map overlays.
- ``train | fit | validate | test | predict | export``: anomalib's own CLI with the plugin imported first.
  ``anomalib train --model CGAD`` already works after ``pip install`` (start-up hook); this spelling is the
  fallback for ``python -S`` and for Pythons that ignore ``.pth`` import lines.

Example:
    $ anomalib-cgad demo --model CGAD
    $ anomalib-cgad train --model CGAD --config configs/protocols/elpv_mono_to_poly.yaml
    $ anomalib-cgad bank --images new_product/good --model exports/cgad --out banks/new_product.npz
    $ anomalib-cgad predict-ov --model exports/cgad --bank banks/new_product.npz --images line/ --out maps/
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

ANOMALIB_SUBCOMMANDS = {"train", "fit", "validate", "test", "predict", "export", "benchmark", "install"}


def _run_anomalib(argv: list[str]) -> None:
    from anomalib.cli.cli import main as anomalib_main

    import anomalib_cgad.models  # noqa: F401 - registers the models before anomalib parses
    from anomalib_cgad.errors import install_excepthook

    install_excepthook()  # again: importing anomalib's CLI installed rich's traceback hook over ours

    sys.argv = ["anomalib", *argv]
    anomalib_main()


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the plugin's own subcommands."""
    parser = argparse.ArgumentParser(
        prog="anomalib-cgad",
        description="Class-generalizable anomaly detection for anomalib. Also accepts anomalib's own "
        f"subcommands ({', '.join(sorted(ANOMALIB_SUBCOMMANDS))}) with the plugin's models registered.",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="full tracebacks for anomalib-cgad's errors (default: one line)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    from anomalib_cgad.demo import add_demo_arguments

    add_demo_arguments(sub.add_parser("demo", help="embedded cross-class demo (ELPV when installed, else generated)"))
    _add_bank_arguments(sub.add_parser("bank", help="reference bank of a new class from k images (OpenVINO)"))
    _add_predict_ov_arguments(sub.add_parser("predict-ov", help="score images with an OpenVINO export and a bank"))
    return parser


def _fail(command: str, message: str) -> None:
    raise SystemExit(f"anomalib-cgad {command}: error: {message}")


def _add_common_ov_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        type=Path,
        help="export folder of 'anomalib export --export_type openvino' (<root> or <root>/weights/openvino)",
    )
    parser.add_argument("--device", default="CPU", help="OpenVINO device (default: CPU)")
    parser.add_argument(
        "--precision",
        choices=("f32", "bf16", "f16", "default"),
        default="f32",
        help="OpenVINO INFERENCE_PRECISION_HINT; 'default' = the device's own (bf16 on recent Xeons). Default: f32",
    )


def _inferencer(args: argparse.Namespace, command: str):
    from anomalib_cgad.deploy.inferencer import BankInferencer

    config = {} if args.precision == "default" else {"INFERENCE_PRECISION_HINT": args.precision}
    try:
        return BankInferencer(args.model, device=args.device, config=config)
    except FileNotFoundError as exc:
        _fail(command, str(exc))
    return None  # unreachable


def _images_and_inferencer(args: argparse.Namespace, command: str):
    """``--bad-images`` mode, the ``--images`` files and the export's inferencer, or a one-line failure."""
    from anomalib_cgad.deploy.inferencer import bad_images_mode, list_images

    try:
        mode = bad_images_mode(args.bad_images)
        paths = list_images(args.images)
    except (FileNotFoundError, ValueError) as exc:
        _fail(command, str(exc))
    return mode, paths, _inferencer(args, command)


def _add_bad_images_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bad-images",
        choices=("stop", "skip"),
        default=None,
        help="an unreadable image file: stop naming it, or skip and report it "
        "(default: $ANOMALIB_CGAD_BAD_IMAGES, else stop)",
    )


def _add_bank_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, nargs="+", help="folder(s) or files of normal images of the class")
    _add_common_ov_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, help="bank file to write (.npz)")
    parser.add_argument("--k", type=int, default=None, help="images to use (default: the model's k_shot)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _add_bad_images_argument(parser)
    parser.set_defaults(func=_bank_command)


def _bank_command(args: argparse.Namespace) -> None:
    """``anomalib-cgad bank``: k images → ``.npz`` bank, with the exported encoder."""
    import numpy as np

    from anomalib_cgad.deploy.inferencer import (
        BankError,
        ImageInputError,
        check_unreadable,
        read_image,
    )

    if args.out.suffix != ".npz":
        _fail("bank", f"--out must be a .npz file, got '{args.out}'.")
    if args.out.exists() and not args.overwrite:
        _fail("bank", f"'{args.out}' already exists; pass --overwrite to replace it.")
    if args.k is not None and args.k < 1:
        _fail("bank", f"--k must be >= 1, got {args.k}.")
    mode, paths, inferencer = _images_and_inferencer(args, "bank")
    k = args.k or inferencer.k_shot
    if len(paths) < k:
        _fail("bank", f"{len(paths)} image(s) given but k={k} references are needed (pass --k to use fewer).")
    arrays, bad = [], {}
    for path in paths:  # the first k readable images (with --bad-images skip, unreadable ones are passed over)
        if len(arrays) == k:
            break
        try:
            arrays.append(read_image(path, inferencer.image_size))
        except ImageInputError as exc:
            if mode == "stop":
                _fail("bank", f"{exc} Fix or remove it, or pass --bad-images skip.")
            bad[str(path)] = str(exc.__cause__ or exc)
    check_unreadable(bad, "the bank's images", "skip")
    if len(arrays) < k:
        _fail("bank", f"only {len(arrays)} of the {len(paths)} images given can be read; k={k} are needed.")
    try:
        bank = inferencer.compute_bank(np.stack(arrays))
    except ValueError as exc:
        _fail("bank", str(exc))
    bank.save(args.out, overwrite=args.overwrite)
    shapes = ", ".join(str(tuple(t.shape)) for t in bank.tensors)
    print(f"Wrote the bank of {k} image(s) ({bank.metadata['model']}, tensors {shapes}) to {args.out}")
    location, scale = (float(v) for v in bank.reference_stats)
    print(f"Normal-only operating point from the {k} image(s): location {location:.4f}, scale {scale:.4f}", end="")
    try:
        rate = inferencer.false_alarm_rate
        print(f"; threshold {inferencer.threshold(bank):.4f} for a requested false-alarm rate of {rate:g}")
    except BankError as exc:
        print(f"; no threshold: {exc}")


def _add_predict_ov_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common_ov_arguments(parser)
    parser.add_argument("--images", required=True, nargs="+", help="folder(s) or files to score")
    parser.add_argument("--bank", type=Path, default=None, help="bank file (.npz); default: the bank of the export")
    parser.add_argument("--out", type=Path, default=None, help="folder for anomaly-map overlays and predictions.csv")
    parser.add_argument("--overwrite", action="store_true", help="write into an existing non-empty --out folder")
    parser.add_argument(
        "--false-alarm-rate", type=float, default=None,
        help="requested share of normal images labelled anomalous (default: the export's, 0.05 unless set)",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=8, help="images per inference call (default: 8)")
    _add_bad_images_argument(parser)
    parser.set_defaults(func=_predict_ov_command)


def _save_overlay(path: Path, image, anomaly_map) -> None:
    from anomalib_cgad.deploy.overlay import overlay_heatmap  # numpy + Pillow: --out needs no torch either

    overlay_heatmap(image, anomaly_map).save(path)


def _predict_ov_command(args: argparse.Namespace) -> None:
    """``anomalib-cgad predict-ov``: score and label per image, optional overlays.

    ``predictions.csv`` is written even when the run stops on an unreadable image: it then holds the
    scores of every image before it. With ``--bad-images skip`` unreadable images get a row with the label
    ``unreadable`` and no score.
    """
    import numpy as np

    from anomalib_cgad.deploy.inferencer import (
        Bank,
        BankError,
        ImageInputError,
        read_image,
    )

    if args.batch_size < 1:
        _fail("predict-ov", f"--batch-size must be >= 1, got {args.batch_size}.")
    if args.out is not None and args.out.exists():
        if not args.out.is_dir():
            _fail("predict-ov", f"--out '{args.out}' exists and is not a folder.")
        if any(args.out.iterdir()) and not args.overwrite:
            _fail("predict-ov", f"--out folder '{args.out}' is not empty; pass --overwrite to write into it.")
    mode, paths, inferencer = _images_and_inferencer(args, "predict-ov")
    try:
        bank = Bank.load(args.bank) if args.bank is not None else inferencer.default_bank
        inferencer.check_bank(bank)
    except (FileNotFoundError, BankError) as exc:
        _fail("predict-ov", str(exc))
    rows: list[dict] = []
    used: set[str] = set()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    print(f"{'score':>8}  {'label':<9}  image")
    failure: ImageInputError | None = None
    try:
        for start in range(0, len(paths), args.batch_size):
            arrays, chunk, unreadable = [], [], {}
            for path in paths[start : start + args.batch_size]:
                try:
                    arrays.append(read_image(path, inferencer.image_size))
                    chunk.append(path)
                except ImageInputError as exc:
                    if mode == "stop":
                        failure = exc
                        break
                    chunk.append(path)
                    unreadable[path] = str(exc.__cause__ or exc)
            try:
                result = (
                    inferencer.predict(np.stack(arrays), bank, false_alarm_rate=args.false_alarm_rate)
                    if arrays
                    else None
                )
            except (BankError, ValueError) as exc:
                _fail("predict-ov", str(exc))
            row = 0  # index into the batch of the readable images
            for path in chunk:  # rows in the order of the images given
                if path in unreadable:
                    rows.append({"image": str(path), "score": "", "label": "unreadable"})
                    print(f"{'-':>8}  {'unreadable':<9}  {path}  ({unreadable[path]})")
                    continue
                score = float(result["pred_score"].reshape(-1)[row])
                label = "anomalous" if bool(result["pred_label"].reshape(-1)[row]) else "normal"
                rows.append({"image": str(path), "score": score, "label": label})
                print(f"{score:8.4f}  {label:<9}  {path}")
                if args.out is not None:
                    name = f"{path.stem}_anomaly_map.png"
                    name = name if name not in used else f"{path.stem}_{len(rows)}_anomaly_map.png"
                    used.add(name)
                    _save_overlay(args.out / name, arrays[row], result["anomaly_map"][row])
                row += 1
            if failure is not None:
                break
    finally:  # the scores already computed are written even if a later image or the user stops the run
        if args.out is not None:
            with (args.out / "predictions.csv").open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=["image", "score", "label"])
                writer.writeheader()
                writer.writerows(rows)
    if failure is not None:
        where = (
            f" (the {len(rows)} image(s) scored before it are in {args.out / 'predictions.csv'})" if args.out else ""
        )
        _fail("predict-ov", f"{failure}{where}. Fix or remove it, or pass --bad-images skip.")
    skipped = sum(row["label"] == "unreadable" for row in rows)
    if skipped:
        print(f"Skipped {skipped} unreadable image(s) (label 'unreadable').")
    if args.out is not None:
        print(f"Wrote {len(rows) - skipped} anomaly-map overlay(s) and predictions.csv to {args.out}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``anomalib-cgad`` console script."""
    from anomalib_cgad.errors import TRACEBACK_ENV, install_excepthook

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--verbose" in argv:  # ours, in any position (anomalib's parser would refuse it): full tracebacks
        argv.remove("--verbose")
        os.environ[TRACEBACK_ENV] = "1"
    install_excepthook()
    if argv and argv[0] in ANOMALIB_SUBCOMMANDS:
        _run_anomalib(argv)
        return
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
