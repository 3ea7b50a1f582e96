"""kill -9 in the middle of training: --resume finishes the run from the last checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from brats_psp.checkpoint import load_checkpoint
from tests.conftest import REPO
from tests.test_training import tiny_data  # noqa: F401  (fixture)


@pytest.mark.slow
def test_kill_9_then_resume(tiny_data: Path, tmp_path: Path) -> None:  # noqa: F811
    args = [
        sys.executable, str(REPO / "pipelines" / "run.py"), "train", "--config", str(REPO / "configs" / "smoke.yaml"),
        "--data", str(tiny_data), f"data.cache_dir={tmp_path / 'cache'}", "data.spacing=[2.0,2.0,2.0]",
        "data.slice_size=[32,32]", "infer.roi_size=[32,32]", "train.epochs=6", "train.slices_per_epoch=64",
        f"train.output_dir={tmp_path / 'outputs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 300
    last = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((tmp_path / "outputs").glob("*/checkpoints/last.pt"))
        if found:
            last = found[0]
            break
        time.sleep(0.2)
    assert last is not None and proc.poll() is None, "training ended before a checkpoint appeared"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    epoch_at_kill = load_checkpoint(last)["epoch"]
    assert epoch_at_kill < 5

    done = subprocess.run([*args[:3], "--resume", str(last), *args[3:]], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    state = load_checkpoint(last)
    assert state["epoch"] == 5
    run_id = state["run_id"]
    assert f"run_id: {run_id}" in done.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(6))
