"""Our own errors as one line (plus a hint) in both CLIs; anomalib's, Lightning's and real bugs keep their traceback.

An error is "ours" when the plugin raised it on purpose: a ``ValueError`` (our ``ReferenceError``,
``BankError``, ``ImageInputError``, ``CheckpointMismatchError``, ... derive from it), ``TypeError``,
``FileNotFoundError`` or ``FileExistsError`` whose innermost frame is a ``raise`` in the ``anomalib_cgad``
package. Its message already names the problem and the fix, and the ~300 lines of Lightning and
jsonargparse frames above it only hide it. Anything else (anomalib's own errors, an ``IndexError`` from a
bug of ours, an error raised by torch inside our code) goes to the previous ``sys.excepthook`` unchanged.

The full traceback of our errors: ``ANOMALIB_CGAD_TRACEBACK=1``, or ``anomalib-cgad --verbose ...``.

The hook is installed by ``anomalib-cgad``'s ``main`` and, right after ``anomalib.cli.cli`` is imported
(anomalib's console script: ``anomalib train|test|predict|export``), by the start-up hook
(``_anomalib_cgad_hook``), in front of the rich traceback hook that module installs; a Python program that
merely imports the plugin keeps Python's normal tracebacks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import TracebackType

TRACEBACK_ENV = "ANOMALIB_CGAD_TRACEBACK"
OUR_KINDS = (ValueError, TypeError, FileNotFoundError, FileExistsError)
_PACKAGE = Path(__file__).resolve().parent
HINT = f"(for the full traceback: {TRACEBACK_ENV}=1, or anomalib-cgad --verbose)"


class BankError(ValueError):
    """A reference bank (tensors or file) is unreadable or does not fit the model that should use it.

    The one bank error of the plugin: the torch models (``components/reference_bank.py``, where it is also
    importable as ``BankMismatchError``) and the torch-free deployment (``deploy/inferencer.py``) raise it,
    so it lives here, in a stdlib-only module both can import.
    """


def is_ours(exc: BaseException) -> bool:
    """Whether ``exc`` was raised on purpose by anomalib-cgad code (see the module docstring)."""
    if not isinstance(exc, OUR_KINDS):
        return False
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    try:
        return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE)
    except (OSError, ValueError):
        return False


def one_line(exc: BaseException) -> str:
    """``error: <Kind>: <message>`` on one line, then the hint."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    return f"error: {type(exc).__name__}: {message}\n{HINT}"


def wants_traceback() -> bool:
    """``ANOMALIB_CGAD_TRACEBACK`` set to anything but empty/0/false."""
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() not in {"", "0", "false", "no"}


def _make_hook(previous):
    def hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if exc.__traceback__ is None and tb is not None:
            exc = exc.with_traceback(tb)
        if is_ours(exc) and not wants_traceback():
            print(one_line(exc), file=sys.stderr)
            return
        previous(kind, exc, tb)

    hook.anomalib_cgad = True  # type: ignore[attr-defined]
    return hook


def install_excepthook() -> None:
    """Print our uncaught errors as one line; idempotent, chains to the hook installed before it."""
    if not getattr(sys.excepthook, "anomalib_cgad", False):
        sys.excepthook = _make_hook(sys.excepthook)
