"""The training stage end to end on tiny cases: MLflow run, checkpoints, artifacts, resume."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from brats_psp.checkpoint import CheckpointError, config_of, load_checkpoint, save_checkpoint
from brats_psp.config import Config, apply_overrides, config_to_dict, load_config
from brats_psp.checkpoint import resolve_checkpoint
from brats_psp.runtime import setup_runtime
from brats_psp.training import CALIBRATION_GRID, TrainResult, finish_run, log_run_setup, prepare_data, run_epoch, start_run, train
from tests.conftest import REPO, write_case


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "raw"
    for i in range(4):
        write_case(root, "brats2021", f"BraTS2021_{i:05d}", shape=(48, 52, 28), seed=i)
    return root


def smoke_config(tmp: Path, *overrides: str) -> Config:
    return load_config(
        REPO / "configs" / "smoke.yaml",
        [
            f"data.cache_dir={tmp / 'cache'}",
            "data.spacing=[2.0,2.0,2.0]",
            "data.slice_size=[32,32]",
            "infer.roi_size=[32,32]",
            "train.slices_per_epoch=16",
            f"train.output_dir={tmp / 'outputs'}",
            f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
            *overrides,
        ],
    )


def test_train_logs_a_complete_mlflow_run(tiny_data: Path, tmp_path: Path) -> None:
    cfg = smoke_config(tmp_path)
    result = train(cfg, data=tiny_data, progress=False)
    assert result.best_checkpoint.is_file() and result.last_checkpoint.is_file()

    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.epochs"] == "2" and params["model.bins"] == "[1, 2, 3, 6]"
    assert params["dataset.train_cases"] == "2" and params["dataset.val_cases"] == "2"
    assert "git_commit" in params and params["device"].startswith("cpu")
    for key in ("train/loss", "train/class_loss", "val/dice_WT", "val/dice_TC", "val/dice_ET", "val/dice_mean", "train/lr", "train/slices_per_s"):
        steps = [m.step for m in client.get_metric_history(result.run_id, key)]
        assert steps == [0, 1], key
    # val/dice_mean is the mean of the three regions' Dice, and best/dice_mean the best of them
    history = {key: [m.value for m in client.get_metric_history(result.run_id, f"val/dice_{key}")] for key in ("WT", "TC", "ET", "mean")}
    for epoch in range(2):
        regions = [history[r][epoch] for r in ("WT", "TC", "ET")]
        assert history["mean"][epoch] == pytest.approx(sum(regions) / 3)
        assert result.history[epoch]["val/dice_WT"] == pytest.approx(regions[0])  # history.json agrees
    assert run.data.metrics["best/dice_mean"] == pytest.approx(max(history["mean"])) == pytest.approx(result.best_metric)
    # the case sets as MLflow inputs: the UI shows them with their digests
    inputs = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation"} and inputs["training"].digest != inputs["validation"].digest
    assert json.loads(inputs["training"].profile)["cases"] == 2 and len(json.loads(inputs["validation"].schema)["case_ids"]) == 2
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "learning_curves.png", "val_overlay.png", "history.json", "checkpoints"} <= artifacts

    # the logged model takes any slice size and returns region probabilities
    mlflow.set_tracking_uri(cfg.tracking.uri)
    model = mlflow.pytorch.load_model(f"runs:/{result.run_id}/model")
    with torch.inference_mode():
        probs = model(torch.randn(2, 4, 40, 36))
    assert probs.shape == (2, 3, 40, 36) and float(probs.min()) >= 0 and float(probs.max()) <= 1
    # its environment names what loading it needs, pinned to what trained it
    from importlib.metadata import version

    requirements = Path(mlflow.artifacts.download_artifacts(f"runs:/{result.run_id}/model/requirements.txt")).read_text().split()
    assert f"torch=={version('torch').split('+')[0]}" in requirements and f"brats-psp=={version('brats-psp')}" in requirements

    state = load_checkpoint(result.best_checkpoint)
    assert config_of(state).train.epochs == 2
    assert state["preprocessing"]["spacing"] == [2.0, 2.0, 2.0] and state["run_id"] == result.run_id
    assert (result.run_dir / "config.yaml").is_file()
    # the best checkpoint carries thresholds calibrated on the validation cases, logged to the run
    thresholds = config_of(state).infer.region_thresholds
    assert thresholds is not None and len(thresholds) == 3 and set(thresholds) <= set(CALIBRATION_GRID)
    logged = [run.data.metrics.get(f"calibration/threshold_{r}") for r in ("WT", "TC", "ET")]
    assert logged == thresholds
    assert config_of(load_checkpoint(result.last_checkpoint)).infer.region_thresholds is None


def test_without_calibration_the_logged_model_is_the_best_checkpoint(tiny_data: Path, tmp_path: Path) -> None:
    """With ``train.calibrate_threshold`` off, nothing is calibrated and the MLflow model is
    built from best.pt as training wrote it: the same weights, no thresholds."""
    cfg = smoke_config(tmp_path, "train.calibrate_threshold=false")
    result = train(cfg, data=tiny_data, progress=False)
    state = load_checkpoint(result.best_checkpoint)
    assert config_of(state).infer.region_thresholds is None
    run = MlflowClient(tracking_uri=cfg.tracking.uri).get_run(result.run_id)
    assert not any(key.startswith("calibration/") for key in run.data.metrics)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    logged = mlflow.pytorch.load_model(f"runs:/{result.run_id}/model")
    torch.testing.assert_close(logged.net.state_dict(), state["model"])


def test_calibrate_stage_recalibrates_a_trained_model(tiny_data: Path, tmp_path: Path) -> None:
    """`calibrate` on a model trained without calibration: the thresholds calibrate_thresholds
    picks on the model's own validation cases, with the infer overrides, stored in the
    checkpoint written; other overrides are refused."""
    from brats_psp.checkpoint import build_model_from_checkpoint
    from brats_psp.training import calibrate_thresholds, recalibrate
    from tests.conftest import run_cli

    cfg = smoke_config(tmp_path, "train.calibrate_threshold=false", "tracking.enabled=false")
    best = train(cfg, data=tiny_data, progress=False).best_checkpoint
    assert config_of(load_checkpoint(best)).infer.region_thresholds is None
    out = tmp_path / "recalibrated.pt"
    result = recalibrate(best, out, tiny_data, ["infer.class_gate=0.3"])
    state = load_checkpoint(out)
    stored = config_of(state)
    assert stored.infer.region_thresholds == result.thresholds and set(result.thresholds) <= set(CALIBRATION_GRID)
    assert stored.infer.class_gate == 0.3 and result.previous is None and result.val_cases == 2
    assert stored.model == cfg.model and stored.data.spacing == cfg.data.spacing  # the model's own settings travel unchanged
    torch.testing.assert_close(state["model"], load_checkpoint(best)["model"])  # the weights too
    runtime = setup_runtime(cfg.train.device, cfg.train.precision, cfg.train.threads)
    expected, _ = calibrate_thresholds(build_model_from_checkpoint(state), prepare_data(stored, tiny_data, runtime, False).val_dirs, stored, runtime)
    assert expected == result.thresholds
    # the command line: in place by default; an override of the model's own settings is refused
    assert run_cli("calibrate", "--model", str(best), "--data", str(tiny_data)) == 0
    assert config_of(load_checkpoint(best)).infer.region_thresholds is not None
    before = best.read_bytes()
    assert run_cli("calibrate", "--model", str(best), "--data", str(tiny_data), "model.width=8") == 2
    assert best.read_bytes() == before


def test_calibration_picks_the_threshold_of_the_best_validation_dice() -> None:
    from brats_psp.training import pick_thresholds

    grid = (0.3, 0.4, 0.5, 0.6)
    means = np.array([[0.7, 0.8, 0.6, 0.5], [0.5, 0.5, 0.5, 0.5], [0.2, 0.9, 0.9, 0.9]])
    # WT: the best Dice; TC: all equal, so 0.5 (the usual cut) stays; ET: a tie, the one nearest 0.5
    assert pick_thresholds(grid, means) == [0.4, 0.5, 0.5]


def test_calibration_scores_et_after_the_small_et_rule() -> None:
    """A false enhancing speck (under infer.small_et_voxels) in a case without enhancing tumour
    costs nothing at calibration, as infer removes it; a large false region still counts."""
    import torch

    from brats_psp.training import calibration_dice, pick_thresholds

    grid = (0.2, 0.3, 0.4)
    probs = torch.zeros(3, 20, 20, 20)
    ref = np.zeros((3, 20, 20, 20), bool)
    ref[:2, 5:15, 5:15, 5:15] = True  # a core without enhancing tumour
    probs[:2, 5:15, 5:15, 5:15] = 0.9
    probs[2, 8:10, 8:10, 8:10] = 0.35  # an 8-voxel speck of "enhancing tumour", above 0.2 and 0.3
    plain = calibration_dice(probs, ref, grid)
    assert plain[2].tolist() == [0.0, 0.0, 1.0] and plain[0].tolist() == [1.0, 1.0, 1.0]
    ruled = calibration_dice(probs, ref, grid, small_et=10)
    assert ruled[2].tolist() == [1.0, 1.0, 1.0] and np.array_equal(ruled[:2], plain[:2])
    assert pick_thresholds(grid, plain)[2] == 0.4 and pick_thresholds(grid, ruled)[2] == 0.4  # all equal: nearest 0.5
    probs[2, 4:16, 4:16, 4:16].clamp_(min=0.25)  # a large false region: not a speck
    assert calibration_dice(probs, ref, grid, small_et=10)[2].tolist() == [0.0, 1.0, 1.0]


class Crash(RuntimeError):
    pass


def crash_after_first_epoch_then_resume(cfg: Config, data: Path) -> TrainResult:
    """Train with ``cfg`` until a crash after the first epoch (the MLflow run then FAILED), and
    resume that run by its ID to the end."""

    def crash_after_first_epoch(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == 0:
            raise Crash("simulated crash")

    with pytest.raises(Crash):
        train(cfg, data=data, progress=False, on_epoch_end=crash_after_first_epoch)
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    crashed = [r for r in client.search_runs([client.get_experiment_by_name("brats_psp").experiment_id]) if r.info.status == "FAILED"]
    assert len(crashed) == 1
    resumed = train(cfg, resume=crashed[0].info.run_id, progress=False)
    assert resumed.run_id == crashed[0].info.run_id  # the same MLflow run goes on
    return resumed


def test_resume_after_a_crash_ends_where_an_uninterrupted_run_does(tiny_data: Path, tmp_path: Path) -> None:
    cfg = smoke_config(tmp_path, "train.epochs=3", "train.deterministic=true", "train.val_every=2")
    full = train(cfg, data=tiny_data, progress=False)
    resumed = crash_after_first_epoch_then_resume(cfg, tiny_data)
    run_id = resumed.run_id
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [0, 1, 2]
    a = load_checkpoint(full.last_checkpoint)["model"]
    b = load_checkpoint(resumed.last_checkpoint)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


def test_resume_backfills_epochs_missing_from_mlflow(tiny_data: Path, tmp_path: Path) -> None:
    """A kill between writing last.pt and logging the epoch's metrics loses no MLflow step."""
    cfg = smoke_config(tmp_path, "train.epochs=2")

    def crash(epoch: int, metrics: dict[str, float]) -> None:
        raise Crash("after the checkpoint")

    with pytest.raises(Crash):
        train(cfg, data=tiny_data, progress=False, on_epoch_end=crash)
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    last = next((tmp_path / "outputs").glob("*/checkpoints/last.pt"))
    # MLflow cannot delete a metric step, so point the checkpoint at a run that never saw epoch 0:
    # the state a kill between save_checkpoint and log_metrics leaves behind
    fresh = client.create_run(client.get_experiment_by_name("brats_psp").experiment_id)
    save_checkpoint(last, {**load_checkpoint(last), "run_id": fresh.info.run_id})
    train(cfg, resume=str(last), progress=False)
    assert [m.step for m in client.get_metric_history(fresh.info.run_id, "train/loss")] == [0, 1]


def test_tri_planar_training_and_validation(tiny_data: Path, tmp_path: Path) -> None:
    planes = "[axial,coronal,sagittal]"
    cfg = smoke_config(tmp_path, "train.epochs=1", f"data.planes={planes}", f"infer.planes={planes}")
    result = train(cfg, data=tiny_data, progress=False)
    (entry,) = result.history
    # validation ran over the three planes' fused prediction: its mean is that of the regions
    assert entry["val/dice_mean"] == pytest.approx((entry["val/dice_WT"] + entry["val/dice_TC"] + entry["val/dice_ET"]) / 3)
    assert entry["train/loss"] > 0
    assert config_of(load_checkpoint(result.best_checkpoint)).data.planes == ["axial", "coronal", "sagittal"]


def test_checkpoint_with_a_pickled_payload_is_refused(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (print, ("this would run on load",))

    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    (tmp_path / "truncated.pt").write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "truncated.pt")


def test_a_checkpoint_of_another_version_names_the_key_it_does_not_know(tmp_path: Path) -> None:
    from brats_psp.config import Config, config_to_dict

    saved = config_to_dict(Config())
    saved["data"]["a_newer_option"] = 0.5  # a key a later (or earlier) brats_psp wrote
    state = {"model": {}, "config": saved, "run_id": "abc123", "format_version": 9}
    with pytest.raises(CheckpointError, match=r"run abc123, format 9.*another version of brats_psp.*data\.a_newer_option"):
        config_of(state)
    torch.save(state, tmp_path / "other.pt")  # loaded from a file, the error names the file too
    with pytest.raises(CheckpointError, match=r"other\.pt: the checkpoint \(run abc123, format 9\).*data\.a_newer_option"):
        load_checkpoint(tmp_path / "other.pt")
    saved["data"].pop("a_newer_option")
    assert config_of(state) == Config().validate()


def test_the_stage_steps_run_one_by_one_and_checkpoints_resolve_from_every_name(tiny_data: Path, tmp_path: Path) -> None:
    """train() is prepare_data -> start_run -> run_epoch per epoch -> finish_run; each is callable on its own,
    and resolve_checkpoint finds the run's checkpoints from a file, the run folder's name and the MLflow run ID."""
    cfg = smoke_config(tmp_path, "tracking.log_model=false", "train.val_every=2")
    runtime = setup_runtime("cpu", "fp32")
    data = prepare_data(cfg, tiny_data, runtime, progress=False)
    assert data.source == tiny_data.resolve() and (data.cache / "datalist.json").is_file()
    assert len(data.train_dirs) == 2 and len(data.val_dirs) == 2 and not set(data.train_dirs) & set(data.val_dirs)
    run = start_run(cfg, runtime, data)
    status = "FAILED"
    try:
        log_run_setup(run)
        first = run_epoch(run, 0, progress=False)
        assert "val/dice_mean" not in first and run.best == -1.0  # validation is due every 2 epochs
        assert load_checkpoint(run.last_path)["epoch"] == 0 and not run.best_path.exists()
        second = run_epoch(run, 1, progress=False)
        assert run.best == second["val/dice_mean"] and run.best_epoch == 1
        result = finish_run(run)
        status = "FINISHED"
    finally:
        run.tracker.end(status)
    assert [h["epoch"] for h in result.history] == [0, 1] and result.best_checkpoint == run.best_path
    assert (run.run_dir / "learning_curves.png").is_file() and (run.run_dir / "config.yaml").is_file()

    assert resolve_checkpoint(run.last_path) == run.last_path
    assert resolve_checkpoint(run.run_id, "last", cfg.train.output_dir) == run.last_path  # the run folder
    assert resolve_checkpoint(run.run_id, "best", tracking_uri=cfg.tracking.uri) == run.best_path  # its run_dir tag
    assert resolve_checkpoint(f"runs:/{run.run_id}/model", tracking_uri=cfg.tracking.uri) == run.best_path
    # without the run's folder on this machine, best.pt comes from the run's artifacts
    moved = run.run_dir.rename(tmp_path / "elsewhere")
    downloaded = resolve_checkpoint(run.run_id, "best", tracking_uri=cfg.tracking.uri)
    assert downloaded != run.best_path and load_checkpoint(downloaded)["epoch"] == 1
    with pytest.raises(CheckpointError, match="no checkpoints/last.pt"):  # training logs best.pt only
        resolve_checkpoint(run.run_id, "last", cfg.train.output_dir, cfg.tracking.uri)
    with pytest.raises(CheckpointError, match="not a checkpoint file"):
        resolve_checkpoint("no-such-run", tracking_uri=cfg.tracking.uri)
    assert moved.is_dir()


def test_training_without_mlflow_writes_no_store_and_resumes_in_its_folder(tiny_data: Path, tmp_path: Path) -> None:
    cfg = smoke_config(tmp_path, "tracking.enabled=false", "train.epochs=1")
    result = train(cfg, data=tiny_data, progress=False)
    assert result.run_id is None and result.run_dir.name.startswith("offline-")
    assert result.best_checkpoint.is_file() and not (tmp_path / "mlflow.db").exists()
    more = apply_overrides(config_of(load_checkpoint(result.last_checkpoint)), ["train.epochs=2"])
    save_checkpoint(result.last_checkpoint, {**load_checkpoint(result.last_checkpoint), "config": config_to_dict(more)})
    resumed = train(cfg, resume=result.run_dir.name, progress=False)  # the run folder's name
    assert resumed.run_dir == result.run_dir and [h["epoch"] for h in resumed.history] == [0, 1]
    assert not (tmp_path / "mlflow.db").exists()


def test_system_metrics_are_logged_when_asked(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("psutil")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    assert load_config(None).tracking.system_metrics is False  # off by default
    on = train(smoke_config(tmp_path, "train.epochs=1", "tracking.system_metrics=true"), data=tiny_data, progress=False)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = set(client.get_run(on.run_id).data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= logged


def test_validation_uses_flip_tta_only_when_asked(tiny_data: Path, tmp_path: Path) -> None:
    """``train.val_tta`` false (the default): validation's Dice is that of plain passes even
    when ``infer.tta`` is on; true: that of the flipped passes, as ``infer`` segments."""
    from brats_psp.data.preprocess import preprocess_dataset
    from brats_psp.data.cache import split_cases
    from brats_psp.networks import build_network
    from brats_psp.training import validate

    cfg = smoke_config(tmp_path, "infer.tta=true", "infer.threshold=0.45")
    preprocess_dataset(tiny_data, tmp_path / "cache", cfg.data, progress=False)
    _, val_dirs = split_cases(tmp_path / "cache", 0)
    runtime = setup_runtime("cpu", "fp32", 1)
    torch.manual_seed(0)
    net = build_network(cfg.model, cfg.data.in_channels)
    plain, _ = validate(net, val_dirs, apply_overrides(copy.deepcopy(cfg), ["infer.tta=false"]), runtime)
    flipped, _ = validate(net, val_dirs, apply_overrides(copy.deepcopy(cfg), ["train.val_tta=true"]), runtime)
    default, _ = validate(net, val_dirs, cfg, runtime)
    assert cfg.train.val_tta is False and cfg.infer.tta is True
    assert default == plain
    assert flipped != plain  # random weights are not flip-symmetric: TTA changes the Dice
