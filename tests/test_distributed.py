"""Data-parallel training and calibration with torchrun: two CPU processes (gloo), one MLflow run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO
from tests.test_training import tiny_data  # noqa: F401  (fixture)


def test_torchrun_two_processes(tiny_data: Path, tmp_path: Path) -> None:  # noqa: F811
    from brats_psp.checkpoint import config_of, load_checkpoint

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
    best = tmp_path / "outputs" / run_ids[0] / "checkpoints" / "best.pt"
    # the calibration after the last epoch: the cases shared out, rank 0 alone writes and logs
    assert config_of(load_checkpoint(best)).infer.region_thresholds is not None
    assert proc.stderr.count("calibrated thresholds on 2 validation case(s)") == 1, proc.stderr[-3000:]
    assert len(client.get_metric_history(run_ids[0], "calibration/threshold_TC")) == 1
    # rank 1 says only what goes wrong: one "preprocessed" line (rank 0's), every line tagged
    assert proc.stderr.count("preprocessed ") == 1 and "[rank 0] INFO" in proc.stderr, proc.stderr[-3000:]
    assert "[rank 1] INFO" not in proc.stderr, proc.stderr[-3000:]


def test_calibrate_under_torchrun_writes_once(tiny_data: Path, tmp_path: Path) -> None:  # noqa: F811
    """`calibrate` launched by torchrun: the ranks share out the validation cases and every rank
    gets the thresholds and Dice of one process scoring them all; rank 0 alone writes the
    checkpoint and logs it, and the ranks leave the process group together."""
    from brats_psp.checkpoint import config_of, load_checkpoint
    from brats_psp.labels import REGION_NAMES
    from brats_psp.training import CALIBRATION_GRID, recalibrate, train
    from tests.test_training import smoke_config

    cfg = smoke_config(tmp_path, "train.epochs=1", "train.calibrate_threshold=false", "tracking.enabled=false")
    best = train(cfg, data=tiny_data, progress=False).best_checkpoint
    out = tmp_path / "calibrated.pt"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun), "--standalone", "--nproc_per_node", "2", str(REPO / "pipelines" / "run.py"), "calibrate",
        "--model", str(best), "--output", str(out), "--data", str(tiny_data), "train.threads=1",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = re.findall(r"thresholds: (WT=[\d.]+ TC=[\d.]+ ET=[\d.]+)", proc.stdout)  # the ranks' lines may interleave
    assert len(printed) == 2 and printed[0] == printed[1], proc.stdout  # both ranks, the same thresholds
    assert proc.stderr.count("calibrated ") == 1, proc.stderr[-3000:]  # one rank wrote and logged
    thresholds = config_of(load_checkpoint(out)).infer.region_thresholds
    assert set(thresholds) <= set(CALIBRATION_GRID)
    assert printed[0] == " ".join(f"{r}={t:.2f}" for r, t in zip(REGION_NAMES, thresholds))
    assert config_of(load_checkpoint(best)).infer.region_thresholds is None  # the input is left as it was
    alone = recalibrate(best, tmp_path / "alone.pt", tiny_data)  # one process, both validation cases
    assert alone.thresholds == thresholds and alone.val_cases == 2
    logged = re.findall(r"(WT|TC|ET) [\d.]+ \(Dice ([\d.]+)\)", proc.stderr)
    assert logged == [(r, f"{alone.dice[r]:.4f}") for r in REGION_NAMES], proc.stderr[-3000:]
    assert not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob(".*calibrated*"))  # nothing half-written


@pytest.mark.slow  # about 45 s: `make test-all`
def test_torchrun_two_nodes_on_one_machine(tiny_data: Path, tmp_path: Path) -> None:  # noqa: F811
    """Multi-node launch with PyTorch's own rendezvous: two torchrun "nodes" (one process each)
    meet at a c10d endpoint on the loopback, as two machines would at the first one's address."""
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    procs = []
    for node in (0, 1):
        cmd = [
            str(torchrun), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "brats_psp_test",
            str(REPO / "pipelines" / "run.py"), "train", "--config", str(REPO / "configs" / "smoke.yaml"), "--data", str(tiny_data),
            f"data.cache_dir={tmp_path / 'cache'}", "data.spacing=[2.0,2.0,2.0]", "data.slice_size=[32,32]",
            "infer.roi_size=[32,32]", "train.slices_per_epoch=32", "train.epochs=1", f"train.output_dir={tmp_path / 'outputs'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "train.threads=1",
        ]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    run_ids = {r for out, _ in outs for r in re.findall(r"^run_id: (\w+)$", out, flags=re.M)}
    assert len(run_ids) == 1, outs  # both nodes report the one run of the job
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("brats_psp").experiment_id])
    assert run.info.status == "FINISHED" and "2 process(es)" in run.data.params["device"]
    assert (tmp_path / "outputs" / run.info.run_id / "checkpoints" / "best.pt").is_file()


def _leave_group(rank: int, port: int, marker: str) -> None:
    """One process of :func:`test_ranks_leave_the_group_together`."""
    import time

    from brats_psp.runtime import setup_runtime, shutdown

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)})
    runtime = setup_runtime("cpu", "fp32", threads=1)
    if runtime.is_main:  # rank 0 still works (as it writes the checkpoint and logs the model)
        time.sleep(1.0)
        Path(marker).write_text("done")
    shutdown(runtime, finished=True)
    if not runtime.is_main and not Path(marker).is_file():
        raise AssertionError("rank 1 left the process group before rank 0 had finished")


def test_ranks_leave_the_group_together(tmp_path: Path) -> None:
    """After a finished run no rank leaves the process group (and exits) while another still
    works in it: rank 1 leaving early died in gloo's teardown once (CI of 6a4e343)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_leave_group, args=(port, str(tmp_path / "rank0_done")), nprocs=2, join=True)
