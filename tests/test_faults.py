"""kill -9 in the middle of training (--resume finishes the run) and in the middle of writing a checkpoint."""

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
from brats_psp.io import remove_stale_temporaries
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


_WRITER = """
import io, sys, time
sys.path.insert(0, sys.argv[2])
import torch
from brats_psp.checkpoint import save_checkpoint

path = sys.argv[1]
save_checkpoint(path, {"model": {"w": torch.zeros(8)}, "config": {"train": {}}, "epoch": 0})
print("first saved", flush=True)
real_save = torch.save

def slow_save(obj, f, *args, **kwargs):  # torch.save, dribbled out 4 KiB every 10 ms (about 10 s in all)
    buf = io.BytesIO()
    real_save(obj, buf, *args, **kwargs)
    data = buf.getvalue()
    with open(f, "wb") as fh:
        for i in range(0, len(data), 4096):
            fh.write(data[i : i + 4096])
            fh.flush()
            time.sleep(0.01)

torch.save = slow_save
save_checkpoint(path, {"model": {"w": torch.ones(1_000_000)}, "config": {"train": {}}, "epoch": 1})
print("second saved", flush=True)
"""


def test_kill_9_while_a_checkpoint_is_written_keeps_the_previous_one(tmp_path: Path) -> None:
    """SIGKILL in the middle of writing last.pt: last.pt is still the previous, complete checkpoint, and the
    half-written temporary beside it is neither loadable nor what --resume picks."""
    from brats_psp.checkpoint import CheckpointError
    from brats_psp.config import load_config
    from brats_psp.checkpoint import resolve_checkpoint

    ckpt_dir = tmp_path / "outputs" / "run1" / "checkpoints"
    last = ckpt_dir / "last.pt"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(last), str(REPO)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "first saved"
        deadline = time.monotonic() + 60
        partial: list[Path] = []
        while time.monotonic() < deadline and proc.poll() is None:
            partial = [p for p in ckpt_dir.iterdir() if p.name != "last.pt" and p.stat().st_size > 64 * 1024]
            if partial:
                break
            time.sleep(0.02)
        assert partial and proc.poll() is None, "the second write was not caught in progress"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "second saved" not in proc.stdout.read()
    state = load_checkpoint(last)
    assert state["epoch"] == 0 and state["model"]["w"].shape == (8,)
    (tmp,) = partial
    assert tmp.name.startswith(".last.pt.") and tmp.exists()  # the kill left it: no cleanup code ran
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp)
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'outputs'}"])
    assert resolve_checkpoint("run1", "last", cfg.train.output_dir) == last
    # what train() does with the run's checkpoint folder when it starts or resumes
    assert remove_stale_temporaries(ckpt_dir) == [tmp] and not tmp.exists() and last.exists()
