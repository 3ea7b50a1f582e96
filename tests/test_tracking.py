"""Training against a real MLflow tracking server on a loopback port, and the fallback when it is down."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from brats_psp.checkpoint import load_checkpoint
from brats_psp.tracking import PENDING_FILE, RUNNING_FILE, ReplayError, RunTracker, replay_pending, training_process
from brats_psp.training import train
from tests.conftest import run_cli
from tests.mlflow_server import MlflowServer, free_port
from tests.test_training import smoke_config, tiny_data  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow_server")).start()
    yield srv
    srv.stop()


def test_training_against_a_tracking_server(server: MlflowServer, tiny_data: Path, tmp_path: Path) -> None:  # noqa: F811
    cfg = smoke_config(
        tmp_path, f"tracking.uri={server.uri}", "tracking.experiment=server_test", "train.epochs=1", "tracking.register_name=psp_smoke"
    )
    result = train(cfg, data=tiny_data, progress=False)
    client = MlflowClient(tracking_uri=server.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(result.run_id, "val/dice_mean")] == [0]
    names = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "checkpoints", "learning_curves.png"} <= names
    mlflow.set_tracking_uri(server.uri)
    model = mlflow.pytorch.load_model(f"runs:/{result.run_id}/model")
    assert model(torch.zeros(1, 4, 32, 32)).shape == (1, 3, 32, 32)
    (version,) = client.search_model_versions("name='psp_smoke'")
    assert version.run_id == result.run_id
    registered = mlflow.pytorch.load_model(f"models:/psp_smoke/{version.version}")
    assert registered(torch.zeros(1, 4, 24, 40)).shape == (1, 3, 24, 40)
    # artifacts went through the server into its own folder
    assert any((server.root / "artifacts").rglob("best.pt"))


def _fail_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """A down server fails each MLflow call at once instead of after minutes of retries."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")


def _pending(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / PENDING_FILE).read_text().splitlines()]


def test_server_down_training_finishes_and_keeps_the_metrics_then_replays(
    server: MlflowServer, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    """Down from the start: the run never exists on the server. sync-mlflow creates it and sends everything."""
    _fail_fast(monkeypatch)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    cfg = smoke_config(tmp_path, f"tracking.uri={dead}", "train.epochs=1", "tracking.experiment=down_test", "tracking.run_name=offline-run")
    markers: list[str | None] = []
    with caplog.at_level(logging.WARNING, logger="brats_psp"):
        result = train(cfg, data=tiny_data, progress=False, on_epoch_end=lambda e, m: markers.extend(
            training_process(d) for d in Path(cfg.train.output_dir).iterdir()))
    assert result.best_checkpoint.is_file() and result.run_id is None and result.run_dir.name.startswith("offline-")
    assert markers == [f"process {os.getpid()} on {socket.gethostname()}"]  # while it trained
    assert not (result.run_dir / RUNNING_FILE).exists() and training_process(result.run_dir) is None
    assert load_checkpoint(result.best_checkpoint)["run_id"] is None
    pending = _pending(result.run_dir)
    assert pending[0]["call"] == "start_run" and pending[0]["run_name"] == "offline-run"
    logged = [p for p in pending if p["call"] == "log_metrics"]
    assert any("val/dice_mean" in p["metrics"] for p in logged)
    assert {p["call"] for p in pending} >= {"log_params", "set_tags", "log_artifact", "log_model", "end_run"}
    assert f"{len(pending)} MLflow call(s) could not be sent" in caplog.text and f"sync-mlflow {result.run_dir}" in caplog.text

    # still down: nothing is lost and the file is untouched
    with pytest.raises(ReplayError, match=r"call 1 of \d+ \(start_run\)"):
        replay_pending(result.run_dir)
    assert _pending(result.run_dir) == pending

    # back (a server on another address): the CLI sends everything, once
    assert run_cli("sync-mlflow", str(result.run_dir), "--tracking-uri", server.uri) == 0
    client = MlflowClient(tracking_uri=server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("down_test").experiment_id])
    assert run.info.run_name == "offline-run" and run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "1" and run.data.tags["brats_psp.run_dir"] == str(result.run_dir.resolve())
    history = client.get_metric_history(run.info.run_id, "val/dice_mean")
    assert [(m.step, m.value) for m in history] == [(0, pytest.approx(result.history[0]["val/dice_mean"]))]
    assert {"config.yaml", "checkpoints", "learning_curves.png", "history.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    mlflow.set_tracking_uri(server.uri)
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")  # rebuilt from best.pt and logged
    assert model(torch.zeros(1, 4, 24, 40)).shape == (1, 3, 24, 40)
    assert not (result.run_dir / PENDING_FILE).exists() and (result.run_dir / "mlflow_pending.replayed.jsonl").is_file()
    for ckpt in (result.best_checkpoint, result.last_checkpoint):  # the offline checkpoints now name the run
        assert load_checkpoint(ckpt)["run_id"] == run.info.run_id
    assert replay_pending(result.run_dir, server.uri) == 0
    assert len(client.search_runs([client.get_experiment_by_name("down_test").experiment_id])) == 1


def test_server_stopped_mid_run_then_replayed_into_the_same_run(
    server: MlflowServer, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    """The server dies after epoch 1 of 2: training finishes, checkpoints are written, the user is warned,
    the missed calls are kept; once the server is back on the same store they land in the same run."""
    _fail_fast(monkeypatch)
    cfg = smoke_config(tmp_path, f"tracking.uri={server.uri}", "train.epochs=2", "tracking.experiment=stop_test", "tracking.log_model=false")

    def stop_the_server(epoch: int, metrics: dict) -> None:
        if epoch == 0:
            server.stop()

    try:
        with caplog.at_level(logging.WARNING, logger="brats_psp"):
            result = train(cfg, data=tiny_data, progress=False, on_epoch_end=stop_the_server)
    finally:
        if server.proc is None:
            server.start()  # same port, same SQLite store and artifact folder
    assert load_checkpoint(result.last_checkpoint)["epoch"] == 1 and result.best_checkpoint.is_file()
    assert "MLflow log_metrics failed" in caplog.text and "sync-mlflow" in caplog.text
    pending = _pending(result.run_dir)
    assert {p["run_id"] for p in pending} == {result.run_id}
    assert [p["step"] for p in pending if p["call"] == "log_metrics" and "train/loss" in p["metrics"]] == [1]
    assert pending[-1]["call"] == "end_run" and pending[-1]["status"] == "FINISHED"

    client = MlflowClient(tracking_uri=server.uri)
    assert client.get_run(result.run_id).info.status == "RUNNING"  # what the server saw before it died
    assert [m.step for m in client.get_metric_history(result.run_id, "train/loss")] == [0]
    assert replay_pending(result.run_dir) == len(pending)  # the URI recorded with the calls
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    for key in ("train/loss", "val/dice_mean"):
        history = client.get_metric_history(result.run_id, key)
        assert [(m.step, m.value) for m in history] == [(e["epoch"], pytest.approx(e[key])) for e in result.history], key
    assert {"checkpoints", "learning_curves.png", "history.json"} <= {a.path for a in client.list_artifacts(result.run_id)}
    assert [a.path for a in client.list_artifacts(result.run_id, "checkpoints")] == ["checkpoints/best.pt"]
    assert replay_pending(result.run_dir) == 0
    assert len(client.search_runs([client.get_experiment_by_name("stop_test").experiment_id])) == 1


def test_a_replay_that_fails_half_way_resumes_without_a_second_run(
    server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_fast(monkeypatch)
    cfg = smoke_config(tmp_path, f"tracking.uri=http://127.0.0.1:{free_port()}", "tracking.experiment=resume_replay")
    tracker = RunTracker(cfg, fallback_dir=tmp_path / "run")
    tracker.start(run_name="half")
    tracker.log_metrics({"a": 1.0}, step=0)
    with open(tracker.pending_file, "a") as fh:  # a record the server refuses: replay stops there
        fh.write(json.dumps({"call": "log_metrics", "run_id": None, "experiment": "resume_replay", "metrics": {"b": "oops"}, "step": 1}) + "\n")
    tracker.log_metrics({"a": 2.0}, step=1)
    tracker.end("FINISHED")
    with pytest.raises(ReplayError, match=r"call 3 of 5 \(log_metrics\).*2 sent, 3 kept"):
        replay_pending(tmp_path / "run", server.uri)
    kept = _pending(tmp_path / "run")
    (run,) = MlflowClient(tracking_uri=server.uri).search_runs([MlflowClient(tracking_uri=server.uri).get_experiment_by_name("resume_replay").experiment_id])
    assert len(kept) == 3 and {k["run_id"] for k in kept} == {run.info.run_id}  # the run made for them is remembered
    (tmp_path / "run" / PENDING_FILE).write_text("".join(json.dumps(k) + "\n" for k in kept[1:]))  # drop the bad record
    assert replay_pending(tmp_path / "run", server.uri) == 2
    client = MlflowClient(tracking_uri=server.uri)
    assert len(client.search_runs([client.get_experiment_by_name("resume_replay").experiment_id])) == 1
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "a")] == [(0, 1.0), (1, 2.0)]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    replayed = (tmp_path / "run" / "mlflow_pending.replayed.jsonl").read_text().splitlines()
    assert len(replayed) == 2


def test_sync_mlflow_waits_for_a_run_that_is_still_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A live trainer's marker stops the replay; a killed trainer's marker does not; --force overrides."""
    _fail_fast(monkeypatch)
    cfg = smoke_config(tmp_path, f"tracking.uri=http://127.0.0.1:{free_port()}", "tracking.experiment=busy")
    run_dir = tmp_path / "run"
    tracker = RunTracker(cfg, fallback_dir=run_dir)
    tracker.start(run_name="busy")
    tracker.log_metrics({"a": 1.0}, step=0)
    tracker.end("FINISHED")
    store = f"sqlite:///{tmp_path / 'store.db'}"

    (run_dir / RUNNING_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with pytest.raises(ReplayError, match=f"still being trained by process {os.getpid()}"):
        replay_pending(run_dir, store)
    assert run_cli("sync-mlflow", str(run_dir), "--tracking-uri", store) == 1
    assert (run_dir / PENDING_FILE).is_file()

    gone = subprocess.Popen(["true"])
    gone.wait()  # a trainer killed with -9 leaves its marker behind
    (run_dir / RUNNING_FILE).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
    assert training_process(run_dir) is None
    (run_dir / RUNNING_FILE).write_text(json.dumps({"pid": 1, "host": "another-host"}))
    assert training_process(run_dir) == "process 1 on another-host"
    assert run_cli("sync-mlflow", str(run_dir), "--tracking-uri", store, "--force") == 0
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("busy").experiment_id])
    assert [m.value for m in client.get_metric_history(run.info.run_id, "a")] == [1.0]


def _start_log_end(uri: str, barrier, results) -> None:  # a spawned process: one short tracked run
    from brats_psp.config import load_config
    from brats_psp.tracking import RunTracker

    tracker = RunTracker(load_config(None, [f"tracking.uri={uri}"]))
    barrier.wait()  # every process reaches the new store at the same moment
    run_id = tracker.start(run_name="together")
    tracker.log_metrics({"train/loss": 1.0}, step=0)
    tracker.end("FINISHED")
    results.put((run_id, tracker.pending_calls))


def test_runs_started_together_on_a_new_sqlite_store_all_track(tmp_path: Path) -> None:
    """Without the store lock, four processes starting on a new mlflow.db all went offline
    (alembic migrations racing); with it every run is created and logs its metric."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_start_log_end, args=(uri, barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    outcomes = [results.get(timeout=10) for _ in procs]
    assert all(run_id is not None and pending == 0 for run_id, pending in outcomes), outcomes
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("brats_psp").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(run_id for run_id, _ in outcomes)
    assert all(r.info.status == "FINISHED" and r.data.metrics["train/loss"] == 1.0 for r in runs)
