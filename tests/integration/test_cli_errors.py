"""Our errors as one line in both CLIs (anomalib's errors untouched), and predict runs that never replace files.

- ``anomalib predict`` (anomalib's console script, the plugin imported by the start-up hook) on a folder with
  a truncated image: exit 1, stderr ends with ``error: ImageInputError: ...`` naming the file and the hint,
  no traceback; ``ANOMALIB_CGAD_TRACEBACK=1`` or ``anomalib-cgad --verbose`` gives the traceback back;
- the hook itself: errors raised by anomalib, by torch inside our code, or bugs (``IndexError``) keep the
  normal traceback;
- two ``anomalib predict`` runs into one results root write two version folders; the first is unchanged.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from anomalib.engine import Engine
from test_input_policy import _refs, save_as, truncate

from anomalib_cgad import MetaAD
from anomalib_cgad.errors import HINT, _make_hook, is_ours, one_line
from anomalib_cgad.models.base import ReferenceError

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}
    env.pop("ANOMALIB_CGAD_TRACEBACK", None)
    return {**env, **extra}


@pytest.fixture
def broken_folder(synthetic_root, tmp_path) -> tuple[Path, Path]:
    """(a folder of 3 test images, one truncated; a folder of 2 references)."""
    folder = tmp_path / "line"
    for i, path in enumerate(sorted((synthetic_root / "waves" / "test" / "good").glob("*.png"))[:3]):
        save_as(path, folder / f"{i}.png", "rgb")
    truncate(folder / "1.png")
    return folder, _refs(synthetic_root, tmp_path)


def _predict_command(folder: Path, refs: Path, root: Path) -> list[str]:
    anomalib = Path(sys.executable).with_name("anomalib")
    return [
        str(anomalib), "predict", "--model", "MetaAD", "--model.k_shot", "2", "--model.few_shot_source", str(refs),
        "--data", str(folder), "--default_root_dir", str(root),
        "--trainer.accelerator", "cpu",
    ]  # fmt: skip


def test_our_error_is_one_line_in_anomalib_cli_and_traceback_on_request(broken_folder, tmp_path) -> None:
    folder, refs = broken_folder
    command = _predict_command(folder, refs, tmp_path / "results")
    run = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=600, check=False)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert lines[-2].startswith("error: ImageInputError: the images to predict: 1 image file(s) cannot be read: "), (
        run.stderr[-3000:]
    )
    assert "1.png' (image file is truncated)" in lines[-2]
    assert lines[-1] == HINT
    verbose = subprocess.run(
        command, capture_output=True, text=True, env=_env(ANOMALIB_CGAD_TRACEBACK="1"), timeout=600, check=False
    )
    assert verbose.returncode == 1
    assert "Traceback (most recent call last)" in verbose.stderr
    assert "ImageInputError: the images to predict: 1 image file(s) cannot be read" in verbose.stderr


def test_anomalib_cgad_verbose_gives_the_traceback(broken_folder, tmp_path) -> None:
    folder, refs = broken_folder
    command = [sys.executable, "-m", "anomalib_cgad.cli", *_predict_command(folder, refs, tmp_path / "r")[1:]]
    run = subprocess.run([*command, "--verbose"], capture_output=True, text=True, env=_env(), timeout=600, check=False)
    assert run.returncode == 1
    assert "Traceback (most recent call last)" in run.stderr, run.stderr[-3000:]


def _raise(error: BaseException) -> BaseException:
    try:
        raise error
    except BaseException as caught:  # the test needs the exception with its traceback
        return caught


def test_only_our_deliberate_errors_are_shortened(capsys) -> None:
    from anomalib.models import get_model

    ours = _raise_in_plugin()
    assert is_ours(ours)
    assert one_line(ours) == f"error: ReferenceError: No reference images given (an empty list): pass k normal " \
        f"images of the class.\n{HINT}"  # fmt: skip
    try:
        get_model("no_such_model")
    except Exception as exc:  # anomalib's own error, whatever its class
        anomalib_error = exc
    assert not is_ours(anomalib_error)
    assert not is_ours(_raise(ValueError("raised in a test, not in the plugin")))
    assert not is_ours(_raise(IndexError("not one of the kinds we raise on purpose")))
    seen = []
    hook = _make_hook(lambda kind, exc, tb: seen.append(exc))
    hook(type(ours), ours, ours.__traceback__)
    assert capsys.readouterr().err.splitlines()[0].startswith("error: ReferenceError: No reference images given")
    hook(type(anomalib_error), anomalib_error, anomalib_error.__traceback__)
    assert seen == [anomalib_error]


def _raise_in_plugin() -> BaseException:
    from anomalib_cgad.models.base import reference_tensor

    try:
        reference_tensor([], (8, 8))
    except ReferenceError as exc:
        return exc
    raise AssertionError


def test_predict_runs_never_replace_earlier_results(synthetic_root, tmp_path) -> None:
    refs = _refs(synthetic_root, tmp_path)
    folder = tmp_path / "line"
    for i, path in enumerate(sorted((synthetic_root / "waves" / "test" / "good").glob("*.png"))[:2]):
        save_as(path, folder / f"{i}.png", "rgb")

    def predict() -> None:
        model = MetaAD(pre_processor=MetaAD.configure_pre_processor((64, 64)), k_shot=2, few_shot_source=str(refs))
        engine = Engine(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path / "results")  # fmt: skip
        engine.predict(model=model, data_path=folder)

    predict()
    first = sorted(p for p in (tmp_path / "results").rglob("*.png"))
    assert first and all("/predict/v0/" in str(p) for p in first)
    before = {p: p.read_bytes() for p in first}
    (folder / "0.png").write_bytes((folder / "1.png").read_bytes())  # the line changed: different pictures
    predict()
    second = sorted(p for p in (tmp_path / "results").rglob("*.png") if "/predict/v1/" in str(p))
    assert len(second) == len(first)
    assert {p: p.read_bytes() for p in first} == before
