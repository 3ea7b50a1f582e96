"""Training against a real MLflow tracking server on a loopback port, and the fallback when it is down."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from brats_psp.training import train
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


def test_server_down_training_finishes_and_keeps_the_metrics(tiny_data: Path, tmp_path: Path) -> None:  # noqa: F811
    port = free_port()  # nothing listens here
    cfg = smoke_config(tmp_path, f"tracking.uri=http://127.0.0.1:{port}", "train.epochs=1")
    import os

    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "2"
    try:
        result = train(cfg, data=tiny_data, progress=False)
    finally:
        del os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"], os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]
    assert result.best_checkpoint.is_file()
    pending = [json.loads(line) for line in (result.run_dir / "mlflow_pending.jsonl").read_text().splitlines()]
    logged = [p for p in pending if p["call"] == "log_metrics"]
    assert any("val/dice_mean" in p["metrics"] for p in logged)
