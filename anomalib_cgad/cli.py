"""``anomalib-cgad`` command line.

Subcommands:

- ``demo``: the embedded cross-class demo (train on some classes, test on an unseen one with k references).
- ``train | fit | validate | test | predict | export``: anomalib's own CLI with the plugin imported first.
  ``anomalib train --model CGAD`` already works after ``pip install`` (start-up hook); this spelling is the
  fallback for ``python -S`` and for Pythons that ignore ``.pth`` import lines.

Example:
    $ anomalib-cgad demo --model CGAD
    $ anomalib-cgad train --model CGAD --config configs/protocols/elpv_mono_to_poly.yaml
"""

from __future__ import annotations

import argparse
import sys

ANOMALIB_SUBCOMMANDS = {"train", "fit", "validate", "test", "predict", "export", "benchmark", "install"}


def _run_anomalib(argv: list[str]) -> None:
    from anomalib.cli.cli import main as anomalib_main

    import anomalib_cgad  # noqa: F401 - registers the models before anomalib parses

    sys.argv = ["anomalib", *argv]
    anomalib_main()


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the plugin's own subcommands."""
    parser = argparse.ArgumentParser(
        prog="anomalib-cgad",
        description="Class-generalizable anomaly detection for anomalib. Also accepts anomalib's own "
        f"subcommands ({', '.join(sorted(ANOMALIB_SUBCOMMANDS))}) with the plugin's models registered.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    from anomalib_cgad.demo import add_demo_arguments

    add_demo_arguments(sub.add_parser("demo", help="embedded cross-class demo (ELPV when installed, else generated)"))
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``anomalib-cgad`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ANOMALIB_SUBCOMMANDS:
        _run_anomalib(argv)
        return
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
