"""The deployment path runs without torch, anomalib or Lightning; the package's lazy names still work.

Each check runs in a fresh interpreter with ``PYTHONPATH`` set to this checkout, so what is imported is this
tree's code and nothing a previous test imported. Heavy modules are *blocked* (``sys.modules[name] = None``
makes any import of them raise ``ImportError``), not only looked for afterwards: a command that needed torch
would fail, not merely be noticed.

- ``import anomalib_cgad.deploy.inferencer`` / ``anomalib_cgad.coreset`` / the deploy package's light names;
- ``anomalib-cgad bank --help`` and ``predict-ov --help``;
- ``anomalib-cgad bank`` and ``predict-ov --out`` on a real OpenVINO export: the bank written and the scores
  printed without torch equal those of :class:`BankInferencer` in this (torch) process, and the overlays are
  written;
- ``anomalib_cgad.CGAD`` and ``from anomalib_cgad import ...`` still give the model classes, registered with
  anomalib.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "anomalib", "lightning", "torchvision", "timm")
BLOCK = f"import sys\nfor name in {HEAVY!r}:\n    sys.modules[name] = None\n"
REPORT = f"\nprint('HEAVY', sorted(n for n in {HEAVY!r} if sys.modules.get(n) is not None))\n"


def _python(code: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def _heavy(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("HEAVY "))


@pytest.mark.parametrize(
    "statement",
    [
        "import anomalib_cgad.deploy.inferencer",
        "import anomalib_cgad",
        "from anomalib_cgad.coreset import coreset_indices",
        "from anomalib_cgad.deploy import F32_CONFIG, Bank, BankError, BankInferencer",
        "from anomalib_cgad.versioning import next_version_folder",
    ],
)
def test_import_needs_no_torch(statement: str) -> None:
    # Without the block first: nothing heavy is imported (the start-up hook only waits for anomalib).
    result = _python(f"import sys\n{statement}{REPORT}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _heavy(result.stdout) == "HEAVY []"
    blocked = _python(f"{BLOCK}{statement}{REPORT}")
    assert blocked.returncode == 0, blocked.stderr[-3000:]


@pytest.mark.parametrize("command", ["bank", "predict-ov"])
def test_deploy_command_help_needs_no_torch(command: str) -> None:
    code = (
        f"{BLOCK}from anomalib_cgad.cli import main\n"
        "try:\n"
        f"    main([{command!r}, '--help'])\n"
        "except SystemExit as exc:\n"
        "    print('EXIT', exc.code)\n"
        f"{REPORT}"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "EXIT 0" in result.stdout
    assert f"usage: anomalib-cgad {command}" in result.stdout
    assert "--images" in result.stdout and "--model" in result.stdout
    assert _heavy(result.stdout) == "HEAVY []"


def test_heavy_deploy_names_still_resolve() -> None:
    """The deploy package's torch names load on first use (and are the objects of their modules)."""
    import anomalib_cgad.deploy as deploy
    from anomalib_cgad.components.reference_bank import load_model_bank
    from anomalib_cgad.deploy.export_mixin import BankExportMixin

    assert deploy.BankExportMixin is BankExportMixin
    assert deploy.load_model_bank is load_model_bank
    assert set(deploy.__all__) <= set(dir(deploy))
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        _ = deploy.nothing_here


def test_lazy_model_names_are_the_registered_classes() -> None:
    code = (
        "import sys, anomalib_cgad\n"
        "print('BEFORE', 'anomalib_cgad.models' in sys.modules)\n"
        "from anomalib_cgad import CGAD, MetaAD, ResAD, __version__\n"
        "import anomalib.models as am\n"
        "from anomalib_cgad.models import CGAD as C2\n"
        "print('SAME', CGAD is C2 and anomalib_cgad.CGAD is C2 and am.CGAD is C2 and am.ResAD is ResAD)\n"
        "print('GET', type(am.get_model('cgad')).__name__, type(am.get_model('metaad')).__name__)\n"
        "print('VERSION', __version__, sorted(set(anomalib_cgad.__all__) - set(dir(anomalib_cgad))))\n"
        "try:\n"
        "    anomalib_cgad.nothing_here\n"
        "except AttributeError as exc:\n"
        "    print('MISSING', exc)\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    assert lines["BEFORE"] == "False"  # the models were not imported by ``import anomalib_cgad``
    assert lines["SAME"] == "True"
    assert lines["GET"] == "CGAD MetaAD"
    assert lines["VERSION"] == "0.1.0 []"
    assert lines["MISSING"] == "module 'anomalib_cgad' has no attribute 'nothing_here'"


def test_old_coreset_and_error_names_still_work() -> None:
    from anomalib_cgad.components import reference_bank
    from anomalib_cgad.coreset import coreset_indices
    from anomalib_cgad.deploy import inferencer
    from anomalib_cgad.errors import BankError

    assert inferencer.coreset_indices is coreset_indices
    assert reference_bank.coreset_indices is coreset_indices
    assert reference_bank.BankMismatchError is BankError is inferencer.BankError


@pytest.fixture(scope="module")
def export(synthetic_root, tmp_path_factory) -> Path:
    """An OpenVINO swappable-bank export of a small MetaAD (calibrated on the three source classes, not fitted).

    Fitting is not needed: the test compares the torch-free CLI with the inferencer on the same export.
    """
    import torch

    from anomalib_cgad import MetaAD
    from anomalib_cgad.data import CrossClass
    from anomalib_cgad.deploy import export_swappable_bank

    torch.manual_seed(0)
    datamodule = CrossClass(
        source_dataset="MVTecAD", source_root=str(synthetic_root), source_categories=["stripes", "dots", "checker"],
        target_categories=["waves"], k_shot=2, train_batch_size=8, eval_batch_size=8,
    )  # fmt: skip
    datamodule.setup()
    model = MetaAD(pre_processor=MetaAD.configure_pre_processor((64, 64)), visualizer=False, k_shot=2)
    model.eval()
    model.calibrate_operating_point(datamodule)
    model.set_references(datamodule.reference_images("test", 0))
    return export_swappable_bank(model, tmp_path_factory.mktemp("export"))


@pytest.mark.slow
def test_bank_and_predict_ov_run_without_torch(export, synthetic_root, tmp_path) -> None:
    from anomalib_cgad.deploy import Bank, BankInferencer

    references = synthetic_root / "waves" / "train" / "good"
    queries = sorted(str(folder) for folder in (synthetic_root / "waves" / "test").iterdir())  # good + defects
    out = tmp_path / "waves.npz"
    bank_args = ["bank", "--images", str(references), "--model", str(export), "--k", "2", "--out", str(out)]
    maps = tmp_path / "maps"
    predict_args = ["predict-ov", "--images", *queries, "--model", str(export), "--bank", str(out), "--out", str(maps)]
    code = f"{BLOCK}from anomalib_cgad.cli import main\nmain({bank_args!r})\nmain({predict_args!r})\n{REPORT}"
    result = _python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _heavy(result.stdout) == "HEAVY []"
    assert "Wrote the bank of 2 image(s) (MetaAD" in result.stdout
    overlays = sorted(maps.rglob("*.png"))  # --out writes one heat-map overlay per image, torch-free too
    assert len(overlays) == len(list((synthetic_root / "waves" / "test").rglob("*.png")))
    printed = {
        line.split()[-1]: (float(line.split()[0]), line.split()[1])
        for line in result.stdout.splitlines()
        if line.strip().endswith(".png") and line.split()[0] != "score"
    }

    inferencer = BankInferencer(export)
    paths = sorted(Path(path) for path in printed)
    bank = inferencer.compute_bank(sorted(references.glob("*.png"))[:2])
    assert all(np.array_equal(a, b) for a, b in zip(Bank.load(out).tensors, bank.tensors, strict=True))
    expected = inferencer.predict(paths, bank)
    assert len(paths) == len(list((synthetic_root / "waves" / "test").rglob("*.png"))) > 0
    for path, score, label in zip(
        paths, expected["pred_score"].reshape(-1), expected["pred_label"].reshape(-1), strict=True
    ):
        assert printed[str(path)] == (pytest.approx(float(score), abs=1e-4), "anomalous" if label else "normal")


@pytest.mark.parametrize(
    "statement", ["import anomalib_cgad.deploy.export_mixin", "from anomalib_cgad.components import reference_bank"]
)
def test_models_register_when_a_plugin_module_imports_anomalib_first(statement: str) -> None:
    """The start-up hook imports the models after the plugin module that pulled in ``anomalib.models``."""
    code = (
        f"import warnings\nwarnings.filterwarnings('error', message='anomalib-cgad')\n{statement}\n"
        "import sys, anomalib.models as am\n"
        "print('REGISTERED', 'anomalib_cgad.models' in sys.modules and am.CGAD.__name__)\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REGISTERED CGAD" in result.stdout
    assert "could not register" not in result.stderr
