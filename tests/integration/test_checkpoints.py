"""Checkpoints: ``anomalib train`` → ``anomalib test --ckpt_path`` gives the Python API's metrics; safe loading.

The CLI tests run the real ``anomalib`` console script on generated data (1 epoch, small flow) and are marked
``slow`` (about a minute each on 2 CPU cores).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine

from anomalib_cgad import CGAD
from anomalib_cgad.components.flow import FlowOptions
from anomalib_cgad.data import CrossClass
from anomalib_cgad.models.base import CHECKPOINT_FORMAT, CHECKPOINT_KEY
from anomalib_cgad.models.cgad.lightning_model import CGADTraining

REPO = Path(__file__).resolve().parents[2]
SMALL_FLOW = FlowOptions(coupling_blocks=2)
MODEL_ARGS = ["--model.flow.coupling_blocks", "2", "--model.training.synthetic_per_class", "2", "--model.seed", "0"]
ROW = re.compile(r"│\s*(\S+)\s*│\s*([-+0-9.eE]+|nan)\s*│")


def _anomalib() -> str:
    script = Path(sys.executable).with_name("anomalib")
    return str(script) if script.exists() else shutil.which("anomalib")


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", COLUMNS="200")
    return subprocess.run([_anomalib(), *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)


def _data_args(root: Path) -> list[str]:
    return [
        "--data", "anomalib_cgad.data.CrossClass", "--data.source_root", str(root),
        "--data.source_categories", "[stripes, dots]", "--data.target_categories", "[waves]",
        "--data.k_shot", "2", "--data.train_batch_size", "8", "--data.eval_batch_size", "8",
    ]  # fmt: skip


def _metrics(stdout: str) -> dict[str, float]:
    """The metrics of the test table that ``anomalib test`` prints."""
    return {name: float(value) for name, value in ROW.findall(stdout)}


@pytest.fixture(scope="module")
def cli_checkpoint(synthetic_root, tmp_path_factory) -> Path:
    """Train a tiny CGAD with ``anomalib train`` (1 epoch) and return its Lightning checkpoint."""
    work = tmp_path_factory.mktemp("cli")
    args = ["train", "--model", "CGAD", *MODEL_ARGS, *_data_args(synthetic_root), "--trainer.max_epochs", "1",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--seed_everything", "0",
            "--default_root_dir", str(work / "results")]  # fmt: skip
    result = _run(args, cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = sorted((work / "results").rglob("*.ckpt"))
    assert len(checkpoints) == 1, checkpoints
    return checkpoints[0]


@pytest.mark.slow
def test_checkpoint_holds_tag_bank_and_config(cli_checkpoint) -> None:
    from anomalib_cgad import __version__

    checkpoint = torch.load(cli_checkpoint, map_location="cpu", weights_only=True)
    tag = checkpoint[CHECKPOINT_KEY]
    assert tag["version"] == __version__
    assert tag["format"] == CHECKPOINT_FORMAT
    assert tag["model"] == "CGAD"
    assert tag["bank"]["backbone"] == "tf_efficientnet_lite0"
    assert tag["bank"]["image_size"] == [256, 256]
    assert tag["bank"]["k"] == 2
    assert checkpoint["hyper_parameters"]["flow"]["coupling_blocks"] == 2
    assert checkpoint["state_dict"]["model.bank.bank_0"].shape[0] > 0  # the references' patches
    assert "model.scale" in checkpoint["state_dict"]


@pytest.mark.slow
def test_cli_test_from_checkpoint_matches_the_python_api(cli_checkpoint, synthetic_root, tmp_path) -> None:
    result = _run(
        ["test", "--model", "CGAD", *MODEL_ARGS, *_data_args(synthetic_root), "--ckpt_path", str(cli_checkpoint),
         "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
         "--default_root_dir", str(tmp_path / "cli")],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    cli = _metrics(result.stdout)
    assert {"image_AUROC", "image_AUROC/waves", "pixel_AUROC"} <= cli.keys(), result.stdout[-2000:]

    datamodule = CrossClass(
        source_root=str(synthetic_root), source_categories=["stripes", "dots"], target_categories=["waves"],
        k_shot=2, train_batch_size=8, eval_batch_size=8,
    )  # fmt: skip
    engine = Engine(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    model = CGAD(flow=SMALL_FLOW, training=CGADTraining(synthetic_per_class=2), seed=0, visualizer=False)
    python = engine.test(model=model, datamodule=datamodule, ckpt_path=str(cli_checkpoint))[0]
    assert {key: python[key] for key in cli} == cli
    print(f"anomalib test --ckpt_path metrics == Engine.test metrics: {cli}")

    # scores, not only metrics: load_from_checkpoint and the Engine's ckpt_path score identically
    reloaded = CGAD.load_from_checkpoint(cli_checkpoint, visualizer=False)
    scores = [
        torch.cat([batch.pred_score for batch in engine.predict(model=candidate, datamodule=datamodule, **kwargs)])
        for candidate, kwargs in ((CGAD(flow=SMALL_FLOW, visualizer=False), {"ckpt_path": str(cli_checkpoint)}),
                                  (reloaded, {}))
    ]  # fmt: skip
    assert torch.isfinite(scores[0]).all()
    assert torch.equal(scores[0], scores[1])


@pytest.mark.slow
def test_cli_refuses_a_checkpoint_of_another_model(cli_checkpoint, synthetic_root, tmp_path) -> None:
    result = _run(
        ["test", "--model", "ResAD", *_data_args(synthetic_root), "--ckpt_path", str(cli_checkpoint),
         "--trainer.accelerator", "cpu", "--default_root_dir", str(tmp_path)],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0
    assert "CheckpointMismatchError: The checkpoint holds a CGAD model, not ResAD" in result.stderr


def _unsafe_torch_loads(path: Path, root: Path = REPO) -> list[str]:
    """``torch.load(...)`` calls in ``path`` without a literal ``weights_only=True``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "load"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "torch"
        ):
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)  # fmt: skip
            if not safe:
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_every_torch_load_uses_weights_only() -> None:
    files = [p for folder in ("anomalib_cgad", "benchmarks", "tests") for p in (REPO / folder).rglob("*.py")]
    assert len(files) > 20
    assert sum("torch.load(" in p.read_text() for p in files) >= 3  # the check does see the calls
    unsafe = [hit for path in files for hit in _unsafe_torch_loads(path)]
    assert unsafe == [], f"torch.load without weights_only=True: {unsafe}"


def test_the_unsafe_load_check_can_fail(tmp_path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import torch\nstate = torch.load('x.pt')\nsafe = torch.load('x.pt', weights_only=True)\n")
    assert _unsafe_torch_loads(sample, root=tmp_path) == ["sample.py:2"]


IMPORT_PROBE = """
import socket, sys, time
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args)[:200])
    raise OSError("network access refused by the test")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
start = time.perf_counter()
import anomalib_cgad
print(f"IMPORT_SECONDS {time.perf_counter() - start:.2f}")
print(f"NETWORK_ATTEMPTS {attempts}")
"""


def test_import_does_no_network_access_and_reports_its_time(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"}}
    env["PYTHONWARNINGS"] = "ignore"
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith(("IMPORT", "NETWORK")))
    assert lines["NETWORK_ATTEMPTS"] == "[]"
    print(f"import anomalib_cgad took {lines['IMPORT_SECONDS']} s (fresh interpreter, no network)")
