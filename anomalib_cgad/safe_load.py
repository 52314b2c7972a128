"""The one place where anomalib-cgad reads torch files: ``weights_only=True`` and a clear error.

Checkpoints, reference banks and backbone weights all go through :func:`load_weights_only`, so a missing
or unreadable file raises the caller's error type with a message naming the file, and no file is ever
unpickled with arbitrary code.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "x.pt"
    >>> torch.save({"a": torch.ones(1)}, path)
    >>> load_weights_only(path, ValueError, missing="{path} is missing", unreadable="{path}: {exc}")["a"]
    tensor([1.])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def load_weights_only(
    path: str | Path,
    error: type[Exception],
    missing: str,
    unreadable: str,
    missing_error: type[Exception] = FileNotFoundError,
) -> Any:
    """Load ``path`` with ``torch.load(..., weights_only=True)`` on the CPU.

    Args:
        path (str | Path): the file.
        error (type[Exception]): raised (from the original exception) when the file cannot be read.
        missing (str): message when the file does not exist; ``{path}`` is filled in.
        unreadable (str): message when it cannot be read; ``{path}``, ``{exc}`` and ``{kind}`` (the
            exception's class name) are filled in.
        missing_error (type[Exception]): raised when the file does not exist. Defaults to
            ``FileNotFoundError``.

    Returns:
        Any: the loaded object.
    """
    path = Path(path)
    if not path.is_file():
        raise missing_error(missing.format(path=path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise error(unreadable.format(path=path, exc=exc, kind=type(exc).__name__)) from exc
