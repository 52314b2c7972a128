"""Re-export into the same root the way anomalib's models do (replace), without ever leaving a mix of two exports.

anomalib's own ``to_onnx`` / ``to_openvino`` / ``to_torch`` write straight into ``<root>/weights/<type>/`` and
overwrite what is there. Our OpenVINO export is several files (anomalib's ``model.xml`` plus the swappable-bank
graphs), so writing in place could leave a folder whose ``model.xml`` is new and whose bank graphs are old, e.g. when
an export fails half way. :func:`write_aside_then_swap` therefore writes the whole export into a fresh folder beside
the target (``<root>/weights/.<type>-new-*``), and only when it is complete swaps it in with two renames:

1. files of the previous export that the new one does not write (an old ``model.onnx.data``) are dropped with it;
   anything else in the folder (a user's saved ``.npz`` banks, ``openvino_cache/``) is moved into the new folder;
2. the previous folder is renamed aside, the new one renamed into place, then the previous one deleted.

Between the two renames the target is briefly absent, never mixed. The log names what was replaced.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

# Files a previous export of each type may hold besides the names the new export writes (so an old
# ``model.onnx.data`` never outlives its ``model.onnx``). Anything else in the folder is the user's and is kept.
PREVIOUS_EXPORT = {
    "openvino": ("model.xml", "model.bin", "bank_model.xml", "bank_model.bin", "bank_encoder.xml",
                 "bank_encoder.bin", "bank.npz", "bank_metadata.json"),
    "onnx": (".onnx", ".onnx.data"),
    "torch": (".pt",),
}  # fmt: skip


def _is_previous_export(path: Path, kind: str, new_names: set[str]) -> bool:
    return path.name in new_names or (path.is_file() and path.name.endswith(PREVIOUS_EXPORT[kind]))


def write_aside_then_swap(export_root: str | Path, kind: str, write: Callable[[Path], Path]) -> Path:
    """Run ``write(staging_root)`` (which writes ``<staging_root>/weights/<kind>/...``), then swap it into place.

    Args:
        export_root (str | Path): the export root (``<root>/weights/<kind>`` is replaced).
        kind (str): ``"openvino"``, ``"onnx"`` or ``"torch"`` (anomalib's folder names).
        write (Callable[[Path], Path]): writes the export under the root it is given and returns its main file.

    Returns:
        Path: the main file, at its final place under ``export_root``.
    """
    weights = Path(export_root) / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    final = weights / kind
    staging_root = Path(tempfile.mkdtemp(prefix=f".{kind}-new-", dir=weights))
    new = staging_root / "weights" / kind
    try:
        relative = Path(write(staging_root)).relative_to(new)
    except BaseException:
        shutil.rmtree(staging_root, ignore_errors=True)  # a failed export leaves the previous one untouched
        raise
    # No clean-up on failure from here: the staging folder may then hold the user's files, so it stays for recovery.
    replaced, kept = _swap(new, final, staging_root / "previous", kind)
    shutil.rmtree(staging_root, ignore_errors=True)
    if replaced:
        logger.info("Replaced the previous %s export in %s (%s)", kind, final, ", ".join(replaced))
    if kept:
        logger.info("Kept files that are not part of an export in %s: %s", final, ", ".join(kept))
    return final / relative


def _swap(new: Path, final: Path, aside: Path, kind: str) -> tuple[list[str], list[str]]:
    """Put ``new`` at ``final``; return (names of the previous export's files, names of other files kept)."""
    if not final.exists():
        new.rename(final)
        return [], []
    new_names = {path.name for path in new.iterdir()}
    replaced, kept = [], []
    for path in sorted(final.iterdir()):
        if _is_previous_export(path, kind, new_names):
            replaced.append(path.name)
        else:
            shutil.move(str(path), new / path.name)
            kept.append(path.name)
    final.rename(aside)
    new.rename(final)
    shutil.rmtree(aside, ignore_errors=True)
    return replaced, kept
