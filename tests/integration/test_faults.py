"""Fault test: a training run killed mid-epoch and a predict run killed mid-folder (SIGKILL, no clean-up).

For each: a complete run first, then the same command killed part-way, then the same command again. The
rerun must succeed, and every file of the first run must be byte-for-byte unchanged (each run writes its
own version folder: anomalib's ``v<N>`` for training, the plugin's ``predict/v<N>`` for predictions).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import sys, time
from pathlib import Path

import lightning
from anomalib.engine import Engine

from anomalib_cgad import MetaAD
from anomalib_cgad.data import CrossClass

stage, data, out, marker = sys.argv[1:5]


class Marker(lightning.Callback):
    """Writes a file once a batch is done, then slows down, so the test can kill the run mid-epoch/folder."""

    def _mark(self, trainer):
        Path(marker).write_text(str(trainer.global_step))
        time.sleep(1.0)

    def on_train_batch_end(self, trainer, *args):
        self._mark(trainer)

    def on_predict_batch_end(self, trainer, *args):
        self._mark(trainer)


lightning.seed_everything(0)
engine = Engine(max_epochs=2, default_root_dir=out, accelerator="cpu", devices=1, logger=False,
                enable_progress_bar=False, callbacks=[Marker()])
if stage == "train":
    datamodule = CrossClass(source_root=data, source_categories=["stripes", "dots"], target_categories=["waves"],
                            k_shot=2, train_batch_size=4, eval_batch_size=8)
    engine.train(model=MetaAD(pre_processor=MetaAD.configure_pre_processor((64, 64))), datamodule=datamodule)
else:
    refs = str(Path(data) / "waves" / "train" / "good")
    model = MetaAD(pre_processor=MetaAD.configure_pre_processor((64, 64)), k_shot=2, few_shot_source=refs)
    engine.predict(model=model, data_path=str(Path(data) / "waves" / "test" / "good"))
print("finished")
'''


def _files(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _command(tmp_path: Path, stage: str, data: Path) -> list[str]:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    return [sys.executable, str(script), stage, str(data), str(tmp_path / "results"), str(tmp_path / "marker")]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _complete(command: list[str]) -> None:
    run = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=900, check=False)
    assert run.returncode == 0 and "finished" in run.stdout, run.stderr[-3000:]


def _kill_part_way(command: list[str], marker: Path) -> None:
    marker.unlink(missing_ok=True)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.monotonic() + 600
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists() and process.poll() is None, "the run ended before its first batch"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


@pytest.mark.parametrize("stage", ["train", "predict"])
def test_a_killed_run_damages_nothing_and_the_same_command_runs_again(stage, synthetic_root, tmp_path) -> None:
    command = _command(tmp_path, stage, synthetic_root)
    results = tmp_path / "results"
    _complete(command)
    first = _files(results)
    assert first
    if stage == "train":
        assert any(name.endswith(".ckpt") for name in first)
    else:
        assert len([name for name in first if "/predict/v0/" in f"/{name}"]) == 6  # the 6 good test images
    _kill_part_way(command, tmp_path / "marker")
    _complete(command)
    after = _files(results)
    assert {name: after.get(name) for name in first} == first  # every file of the first run, unchanged
    folders = sorted(p for p in results.rglob("v*") if p.is_dir() and p.name[1:].isdigit())
    assert [p.name for p in folders] == ["v0", "v1", "v2"]  # the killed run kept its own folder, v1
    versions = [p.name for p in folders]
    newest = [name for name in after if f"/{versions[-1]}/" in f"/{name}"]
    if stage == "train":
        assert any(name.endswith(".ckpt") for name in newest)
    else:
        assert len(newest) == 6
