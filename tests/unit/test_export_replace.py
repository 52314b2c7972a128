"""Re-export into the same root: written aside, swapped in whole, the user's own files kept, the log says what.

Fast unit tests of :func:`anomalib_cgad.deploy.replace.write_aside_then_swap` with plain file writers; the real
exports go through it in ``tests/integration/test_anomalib_suite.py`` (every model exports into one shared root there).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from anomalib_cgad.deploy.inferencer import IR_KEY, BankError, check_ir_belongs, ir_digest
from anomalib_cgad.deploy.replace import write_aside_then_swap


def _writer(files: dict[str, str], main: str):
    def write(root: Path) -> Path:
        folder = root / "weights" / "onnx"
        folder.mkdir(parents=True)
        for name, text in files.items():
            (folder / name).write_text(text)
        return folder / main

    return write


def test_first_export_lands_in_place(tmp_path) -> None:
    path = write_aside_then_swap(tmp_path, "onnx", _writer({"model.onnx": "new"}, "model.onnx"))
    assert path == tmp_path / "weights" / "onnx" / "model.onnx"
    assert path.read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["onnx"]


def test_reexport_replaces_the_old_export_whole_and_keeps_the_users_files(tmp_path, caplog) -> None:
    folder = tmp_path / "weights" / "onnx"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_text("old")
    (folder / "model.onnx.data").write_text("old weights")  # the new export has no external data
    (folder / "notes.txt").write_text("the user's")
    with caplog.at_level(logging.INFO, logger="anomalib_cgad.deploy.replace"):
        write_aside_then_swap(tmp_path, "onnx", _writer({"model.onnx": "new"}, "model.onnx"))
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "notes.txt"]
    assert (folder / "model.onnx").read_text() == "new"
    assert (folder / "notes.txt").read_text() == "the user's"
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "Replaced the previous onnx export" in messages
    assert "model.onnx, model.onnx.data" in messages
    assert "notes.txt" in messages
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["onnx"]  # no staging folder left


def test_a_failed_export_leaves_the_previous_one_untouched(tmp_path) -> None:
    folder = tmp_path / "weights" / "onnx"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_text("old")

    def broken(root: Path) -> Path:
        (root / "weights" / "onnx").mkdir(parents=True)
        (root / "weights" / "onnx" / "model.onnx").write_text("half")
        raise RuntimeError("export failed half way")

    with pytest.raises(RuntimeError, match="half way"):
        write_aside_then_swap(tmp_path, "onnx", broken)
    assert (folder / "model.onnx").read_text() == "old"
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["onnx"]


def test_bank_graphs_beside_a_replaced_model_xml_are_refused(tmp_path) -> None:
    xml = tmp_path / "model.xml"
    xml.write_text("<ours/>")
    xml.with_suffix(".bin").write_bytes(b"\x00\x01")
    metadata = {IR_KEY: {"file": "model.xml", "sha256": ir_digest(xml)}}
    check_ir_belongs(tmp_path, metadata)  # ours: accepted
    check_ir_belongs(tmp_path, {})  # bank graphs exported on their own: nothing to match
    xml.with_suffix(".bin").write_bytes(b"\x00\x02")  # another model's weights under the same name
    with pytest.raises(BankError, match=r"mixes two exports: model\.xml was replaced"):
        check_ir_belongs(tmp_path, metadata)
