"""Zero-flag registration: the real ``anomalib`` console script and ``get_model`` find our models."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODELS = ("ResAD", "MetaAD", "CGAD")


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONWARNINGS"] = "ignore"
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


def _anomalib_script() -> str:
    script = Path(sys.executable).with_name("anomalib")
    return str(script) if script.exists() else shutil.which("anomalib")


@pytest.fixture(scope="module")
def folder_args(tmp_path_factory) -> list[str]:
    from anomalib_cgad.data.synthetic import make_synthetic_mvtec

    root = make_synthetic_mvtec(tmp_path_factory.mktemp("data"), categories=("stripes",), seed=0)
    cat = root / "stripes"
    return [
        "--data", "anomalib.data.Folder", "--data.name", "toy", "--data.root", str(cat),
        "--data.normal_dir", "train/good", "--data.abnormal_dir", "test", "--data.normal_test_dir", "test/good",
    ]  # fmt: skip


@pytest.mark.parametrize("name", [*MODELS, "anomalib_cgad.models.CGAD", "anomalib_cgad.CGAD"])
def test_cli_resolves_model_without_flags(name: str, folder_args: list[str], tmp_path: Path) -> None:
    """``anomalib train --model <name> --print_config`` names our class, in a fresh interpreter."""
    result = _run([_anomalib_script(), "train", "--model", name, *folder_args, "--print_config"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = name if "." in name else f"anomalib_cgad.{name}"
    assert f"class_path: {expected}\n" in result.stdout


@pytest.mark.parametrize("subcommand", ["test", "predict", "export"])
def test_other_subcommands_accept_the_short_name(subcommand: str, folder_args: list[str], tmp_path: Path) -> None:
    extra = ["--export_type", "openvino"] if subcommand == "export" else folder_args
    result = _run([_anomalib_script(), subcommand, "--model", "CGAD", *extra, "--print_config"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "class_path: anomalib_cgad.CGAD" in result.stdout


def test_get_model_finds_every_spelling_in_a_fresh_interpreter(tmp_path: Path) -> None:
    code = (
        "from anomalib.models import get_model, list_models\n"
        "for name in ['resad', 'ResAD', 'res_ad', 'metaad', 'MetaAD', 'cgad', 'CGAD']:\n"
        "    print(name, type(get_model(name)).__module__)\n"
        "from anomalib.models import CGAD\n"
        "print('dict', type(get_model({'class_path': 'CGAD'})).__name__)\n"
    )
    result = _run([sys.executable, "-c", code], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.strip().splitlines())
    assert lines["cgad"] == lines["CGAD"] == "anomalib_cgad.models.cgad.lightning_model"
    assert lines["resad"] == lines["res_ad"] == "anomalib_cgad.models.resad.lightning_model"
    assert lines["metaad"] == "anomalib_cgad.models.metaad.lightning_model"
    assert lines["dict"] == "CGAD"


def test_interpreter_start_imports_neither_torch_nor_anomalib(tmp_path: Path) -> None:
    code = "import sys; print(sorted(m for m in ('torch', 'anomalib', 'anomalib_cgad') if m in sys.modules))"
    result = _run([sys.executable, "-c", code], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_builtin_models_are_not_shadowed() -> None:
    import anomalib.models

    from anomalib_cgad.registry import register

    assert register(anomalib.models.Patchcore) == []
    assert anomalib.models.Patchcore.__module__.startswith("anomalib.")


def test_wheel_ships_the_start_up_hook(tmp_path: Path) -> None:
    """A regular (non-editable) install gets the hook, the .pth and the PEP 829 .start file at the root."""
    pytest.importorskip("hatchling")
    result = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    wheel = next(tmp_path.glob("anomalib_cgad-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"_anomalib_cgad_hook.py", "anomalib_cgad.pth", "anomalib_cgad.start"} <= names
    assert "anomalib_cgad/__init__.py" in names
    pth = zipfile.ZipFile(wheel).read("anomalib_cgad.pth").decode()
    assert pth.strip() == "import _anomalib_cgad_hook; _anomalib_cgad_hook.install()"
