"""Data-parallel training with torchrun: two CPU processes (gloo), one MLflow run (about 35 s)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.conftest import REPO
from tests.test_training import tiny_data  # noqa: F401  (fixture)


def test_torchrun_two_processes(tiny_data: Path, tmp_path: Path) -> None:  # noqa: F811
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun), "--standalone", "--nproc_per_node", "2",
        str(REPO / "pipelines" / "run.py"), "train", "--config", str(REPO / "configs" / "smoke.yaml"), "--data", str(tiny_data),
        f"data.cache_dir={tmp_path / 'cache'}", "data.spacing=[2.0,2.0,2.0]", "data.slice_size=[32,32]",
        "infer.roi_size=[32,32]", "train.slices_per_epoch=32", f"train.output_dir={tmp_path / 'outputs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "train.threads=1",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_ids = re.findall(r"^run_id: (\w+)$", proc.stdout, flags=re.M)
    assert len(set(run_ids)) == 1, proc.stdout  # both ranks report the one run of the job
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("brats_psp").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "2 process(es)" in runs[0].data.params["device"]
    history = client.get_metric_history(run_ids[0], "train/loss")
    assert [m.step for m in history] == [0, 1]
    assert (tmp_path / "outputs" / run_ids[0] / "checkpoints" / "best.pt").is_file()
