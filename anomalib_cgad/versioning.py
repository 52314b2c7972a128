"""One new ``v<N>`` folder per run, so a run never writes into (or over) an earlier run's files (stdlib only).

The demo's results, ``anomalib predict``'s images and the benchmark scripts' result folders are numbered the
same way: ``v0`` in a new root, else one above the highest ``v<N>`` there (a removed ``v1`` between ``v0``
and ``v2`` is not reused, so the numbers keep the order the runs were made in).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> root = Path(tempfile.mkdtemp())
    >>> next_version_folder(root).name, next_version_folder(root).name
    ('v0', 'v1')
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["next_version_folder"]


def next_version_folder(root: str | Path) -> Path:
    """Create and return ``<root>/v<N>``: ``v0`` in a new or empty root, else the highest ``v<N>`` plus one.

    Args:
        root (str | Path): folder holding the versions; created with its parents if missing.

    Returns:
        Path: the new, empty folder.

    Raises:
        FileExistsError: another process created the same ``v<N>`` in between (never reuses a folder).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name[1:]) for p in root.glob("v*") if p.name[1:].isdigit()]
    path = root / f"v{max(taken, default=-1) + 1}"
    path.mkdir()
    return path
