"""MLflow tracking: one run per training job, written by rank 0 only.

The tracking store is MLflow's own default (``sqlite:///mlflow.db`` in the working
directory) unless ``MLFLOW_TRACKING_URI`` or ``tracking.uri`` names another one; a remote
``mlflow server`` works the same way.

When the tracking server cannot be reached, training goes on: the first failed call is logged as
a warning and every failed call is appended to ``<run dir>/mlflow_pending.jsonl`` so nothing is
lost; the run ends with a warning that says how many calls are kept there. Once the server is
back, :func:`replay_pending` (``python pipelines/run.py sync-mlflow <run dir>``) sends them.

``mlflow_pending.jsonl`` holds one JSON object per failed call, in the order they were made::

    {"call": "log_metrics", "run_id": "<id or null>", "uri": "<tracking URI>", "experiment": "<name>",
     "time": <ms since the epoch>, "metrics": {...}, "step": 3}

with, per ``call``: ``start_run`` (``run_name``, ``tags``: the run could not be created),
``log_params`` (``params``), ``log_metrics`` (``metrics``, ``step``), ``set_tags`` (``tags``),
``log_artifact`` (``path``, ``artifact_path``), ``log_model`` (``checkpoint``, ``registered_name``:
the model is rebuilt from that checkpoint) and ``end_run`` (``status``). ``run_id`` is null when
the run was never created on the server.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from brats_psp.config import Config, config_to_dict, flatten
from brats_psp.io import write_text

__all__ = ["configure_tracking", "RunTracker", "git_commit", "resolve_tracking_uri", "replay_pending", "ReplayError", "PENDING_FILE"]

log = logging.getLogger(__name__)

#: MLflow's limit on the length of a param value.
_MAX_PARAM_CHARS = 6000
#: Where a run keeps the MLflow calls that failed, and where they go once replayed.
PENDING_FILE = "mlflow_pending.jsonl"
REPLAYED_FILE = "mlflow_pending.replayed.jsonl"
#: A training run keeps this file in its folder while it runs: its process id and host.
RUNNING_FILE = "training.running"


def mark_running(run_dir: Path) -> None:
    """Record that this process is training ``run_dir`` (see :func:`training_process`)."""
    write_text(Path(run_dir) / RUNNING_FILE, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))


def clear_running(run_dir: Path) -> None:
    (Path(run_dir) / RUNNING_FILE).unlink(missing_ok=True)


def training_process(run_dir: Path) -> str | None:
    """Who is still training ``run_dir`` ("process N on HOST"), or ``None``.

    A marker left by a killed run (its process gone) does not count; a marker from another
    host counts, since it cannot be checked from here.
    """
    try:
        info = json.loads((Path(run_dir) / RUNNING_FILE).read_text())
        pid, host = int(info["pid"]), str(info["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, another user's
    return f"process {pid} on {host}"


def resolve_tracking_uri(cfg: Config) -> str | None:
    """``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else ``None`` (MLflow's default store)."""
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def configure_tracking(cfg: Config) -> str:
    """Point MLflow at the configured store; return the URI in use."""
    import mlflow

    uri = resolve_tracking_uri(cfg)
    if uri:
        mlflow.set_tracking_uri(uri)
    return mlflow.get_tracking_uri()


def git_commit() -> str:
    """The commit of the checkout brats_psp runs from, or ``unknown``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunTracker:
    """Thin wrapper over one MLflow run; every method is a no-op on ranks other than 0."""

    def __init__(self, cfg: Config, enabled: bool = True, fallback_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self.run_id: str | None = None
        self.fallback_dir = fallback_dir
        self.warned = False
        self.pending_calls = 0  # failed calls recorded for replay
        self._unwritten: list[dict[str, Any]] = []  # records made before fallback_dir was known
        self._uri: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, run_id: str | None = None, run_name: str | None = None, tags: Mapping[str, str] | None = None) -> str | None:
        """Start a new run, or reopen ``run_id`` (resume)."""
        if not self.enabled:
            return None
        import mlflow

        uri = self._uri = configure_tracking(self.cfg)
        try:
            if run_id is None:
                mlflow.set_experiment(self.cfg.tracking.experiment)
                run = mlflow.start_run(run_name=run_name or self.cfg.tracking.run_name, tags=dict(tags or {}))
            else:
                run = mlflow.start_run(run_id=run_id)
        except Exception as err:  # tracking server down: train anyway, keep tracking data locally
            log.warning("cannot reach the MLflow tracking store %s (%s); training goes on without it", uri, err)
            self.warned = True
            self.run_id = run_id
            self._record("start_run", {"run_name": run_name or self.cfg.tracking.run_name, "tags": dict(tags or {})})
            return run_id
        self.run_id = run.info.run_id
        return self.run_id

    def end(self, status: str) -> None:
        """Close the run with ``FINISHED`` or ``FAILED``."""
        if not self.enabled:
            return
        import mlflow

        self._call("end_run", lambda: mlflow.end_run(status=status), {"status": status})
        self._flush()
        if self.pending_calls:
            log.warning(
                "%d MLflow call(s) could not be sent and are kept in %s; once the server is back, send them with "
                "`python pipelines/run.py sync-mlflow %s`",
                self.pending_calls, self.pending_file, self.fallback_dir,
            )

    # ------------------------------------------------------------------ logging
    def log_config(self, cfg: Config, extra: Mapping[str, Any]) -> None:
        """The flattened resolved config plus ``extra`` (commit, dataset, device) as params."""
        if not self.enabled:
            return
        import mlflow

        params = {k: _param_value(v) for k, v in {**flatten(config_to_dict(cfg)), **extra}.items()}

        def log_new_params() -> None:
            existing = mlflow.get_run(self.run_id).data.params  # a resumed run keeps its params
            fresh = {k: v for k, v in params.items() if k not in existing}
            if fresh:
                mlflow.log_params(fresh)

        self._call("log_params", log_new_params, {"params": params})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        import mlflow

        values = {k: float(v) for k, v in metrics.items()}
        self._call("log_metrics", lambda: mlflow.log_metrics(values, step=step), {"metrics": values, "step": step})

    def backfill(self, history: list[dict[str, float]]) -> None:
        """Log the epochs of ``history`` that the run lacks (a kill between checkpoint and logging)."""
        if not self.enabled or self.run_id is None:
            return
        from mlflow.tracking import MlflowClient

        try:
            logged = {m.step for m in MlflowClient().get_metric_history(self.run_id, "train/loss")}
        except Exception as err:
            log.warning("cannot read the run's metric history (%s); not backfilling", err)
            return
        for entry in history:
            if int(entry["epoch"]) not in logged:
                self.log_metrics({k: v for k, v in entry.items() if k != "epoch"}, step=int(entry["epoch"]))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if not self.enabled:
            return
        import mlflow

        self._call(
            "log_artifact",
            lambda: mlflow.log_artifact(os.fspath(path), artifact_path),
            {"path": os.fspath(Path(path).resolve()), "artifact_path": artifact_path},
        )

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if not self.enabled:
            return
        import mlflow

        self._call("set_tags", lambda: mlflow.set_tags(dict(tags)), {"tags": dict(tags)})

    def log_model(
        self, model: Any, input_example: Any, registered_name: str | None = None, checkpoint: str | os.PathLike | None = None
    ) -> None:
        """Log ``model`` with ``mlflow.pytorch`` (pickle serialisation, any input size, with a signature).

        ``checkpoint`` is the file the model was built from: when the call fails, a replay rebuilds the
        model from it.
        """
        if not self.enabled:
            return
        signature = _signature(model, input_example)  # outside _call: a model that fails is not an MLflow outage
        self._call(
            "log_model",
            lambda: _log_pytorch_model(model, signature, registered_name),
            {"checkpoint": None if checkpoint is None else os.fspath(Path(checkpoint).resolve()), "registered_name": registered_name},
        )

    # ------------------------------------------------------------------ failures
    def _call(self, what: str, fn: Any, payload: Mapping[str, Any]) -> None:
        try:
            if self.run_id is None:
                raise ConnectionError("no MLflow run (the tracking store was unreachable at start)")
            fn()
        except Exception as err:  # the tracking server may be down; training must go on
            if not self.warned:
                log.warning("MLflow %s failed (%s); training goes on and tracking data is kept in %s", what, err, self.pending_file)
                self.warned = True
            self._record(what, payload)

    def _record(self, what: str, payload: Mapping[str, Any]) -> None:
        """Keep a failed call for :func:`replay_pending` (in memory until the run folder is known)."""
        self._unwritten.append(
            {"call": what, "run_id": self.run_id, "uri": self._uri, "experiment": self.cfg.tracking.experiment,
             "time": int(time.time() * 1000), **payload}
        )
        self.pending_calls += 1
        self._flush()

    def _flush(self) -> None:
        if self.pending_file is None or not self._unwritten:
            return
        self.pending_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.pending_file, "a") as fh:
            for record in self._unwritten:
                fh.write(json.dumps(record, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._unwritten.clear()

    @property
    def pending_file(self) -> Path | None:
        return None if self.fallback_dir is None else self.fallback_dir / PENDING_FILE


def _signature(model: Any, input_example: Any) -> Any:
    """The MLflow signature of ``model`` from one forward pass on ``input_example``."""
    import torch
    from mlflow.models import infer_signature

    with torch.inference_mode():
        output = model(input_example)
    return infer_signature(input_example.numpy(), output.float().numpy())


def _log_pytorch_model(model: Any, signature: Any, registered_name: str | None) -> None:
    """``mlflow.pytorch.log_model`` into the active run as ``model``."""
    import mlflow

    mlflow.pytorch.log_model(
        model, name="model", serialization_format="pickle", signature=signature, registered_model_name=registered_name
    )


# --------------------------------------------------------------------------- replay


class ReplayError(RuntimeError):
    """Pending MLflow calls could not all be sent (the calls not sent stay in the pending file)."""


def _pending_path(run_dir_or_file: str | os.PathLike) -> Path:
    path = Path(run_dir_or_file)
    if path.is_dir():
        return path / PENDING_FILE
    if path.is_file() or path.name == PENDING_FILE:
        return path
    raise FileNotFoundError(f"{path}: no such run folder or {PENDING_FILE}")


def _read_pending(path: Path) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:  # a kill in the middle of an append leaves a partial last line
            log.warning("%s line %d is not a complete record (a kill while it was written?); skipped", path, number)
    return records


def replay_pending(run_dir_or_file: str | os.PathLike, tracking_uri: str | None = None, force: bool = False) -> int:
    """Send the MLflow calls kept in ``<run dir>/mlflow_pending.jsonl``; return how many were sent.

    Calls go to the run they were made for when the server has it (the server went down during
    the run); a run that the server never saw (down from the start) is created in the recorded
    experiment, with the recorded name and tags, and every call for it goes there. Metrics keep
    the steps and times at which they were recorded; params the run already has are not sent
    again; artifacts are uploaded from their files; a model is rebuilt from its checkpoint.

    On success the file is renamed to ``mlflow_pending.replayed.jsonl`` (appended to, if one exists),
    so a second replay sends nothing, and the run's checkpoints that were written without a run
    id get the id of the run created for them. When a call fails, the calls not sent yet stay in
    the pending file, with the run created for them filled in, and :class:`ReplayError` says
    which call failed. A run that is still training is refused (its file is still growing).

    Args:
        run_dir_or_file: a training run folder (``outputs/<run>``) or its pending file.
        tracking_uri: where to send them (default: the URI recorded with the calls).
        force: replay even when the run's folder says it is still being trained (a marker
            from another host, or a process id reused after the trainer died).
    """
    from mlflow.tracking import MlflowClient

    path = _pending_path(run_dir_or_file)
    trainer = training_process(path.parent)
    if trainer and not force:
        raise ReplayError(f"{path.parent} is still being trained by {trainer}; replay its MLflow calls once it has ended (or force it)")
    if not path.is_file():
        done = path.with_name(REPLAYED_FILE)
        log.info("%s: no pending MLflow calls%s", path, f" (those replayed before are in {done})" if done.exists() else "")
        return 0
    records = _read_pending(path)
    uri = tracking_uri or next((r["uri"] for r in records if r.get("uri")), None)
    client = MlflowClient(tracking_uri=uri)
    runs: dict[str | None, str] = {}  # recorded run id (None: never created) -> run id on the server
    for index, record in enumerate(records):
        try:
            run_id = _target_run(client, record, runs)
            _send(client, uri, run_id, record)
        except Exception as err:
            rest = [{**r, "run_id": runs.get(r.get("run_id"), r.get("run_id"))} for r in records[index:]]
            write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rest))
            raise ReplayError(
                f"{path}: sending call {index + 1} of {len(records)} ({record.get('call')}) to {uri or 'the default tracking store'} "
                f"failed ({type(err).__name__}: {err}); {index} sent, {len(rest)} kept in the file for the next try"
            ) from err
    done = path.with_name(REPLAYED_FILE)
    if done.exists():
        with open(done, "a") as fh:
            fh.write(path.read_text())
        path.unlink()
    else:
        os.replace(path, done)
    log.info("sent %d pending MLflow call(s) to run(s) %s at %s; kept as %s", len(records), sorted(set(runs.values())), uri, done)
    if None in runs:
        _fill_checkpoint_run_ids(path.parent / "checkpoints", runs[None])
    return len(records)


def _fill_checkpoint_run_ids(ckpt_dir: Path, run_id: str) -> None:
    """Give the checkpoints an offline run wrote (``run_id: None``) the run created on replay."""
    from brats_psp.checkpoint import load_checkpoint, save_checkpoint

    for ckpt in sorted(ckpt_dir.glob("*.pt")):
        state = load_checkpoint(ckpt)
        if state.get("run_id") is None:
            state["run_id"] = run_id
            save_checkpoint(ckpt, state)
            log.info("%s now names MLflow run %s", ckpt, run_id)


def _target_run(client: Any, record: Mapping[str, Any], runs: dict[str | None, str]) -> str:
    """The server's run for a record: the recorded run when the server has it, else one created for it."""
    from mlflow.exceptions import MlflowException

    recorded = record.get("run_id")
    if recorded in runs:
        return runs[recorded]
    if recorded is not None:
        try:
            client.get_run(recorded)
            runs[recorded] = recorded
            return recorded
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("run %s is not on the server; the pending calls go to a new run", recorded)
    name = record.get("experiment") or "Default"
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(name)
    tags = dict(record.get("tags") or {}) if record.get("call") == "start_run" else {}
    if recorded is not None:
        tags["brats_psp.replayed_from_run"] = recorded
    run = client.create_run(
        experiment_id, start_time=record.get("time"), tags=tags, run_name=record.get("run_name") if record.get("call") == "start_run" else None
    )
    runs[recorded] = run.info.run_id
    return run.info.run_id


def _send(client: Any, uri: str | None, run_id: str, record: Mapping[str, Any]) -> None:
    from mlflow.entities import Metric, Param, RunTag

    call = record["call"]
    if call == "start_run":
        return
    if call == "log_params":
        existing = client.get_run(run_id).data.params
        fresh = [Param(k, str(v)) for k, v in record["params"].items() if k not in existing]
        if fresh:
            client.log_batch(run_id, params=fresh)
    elif call == "log_metrics":
        stamp = int(record.get("time") or time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, int(record["step"])) for k, v in record["metrics"].items()])
    elif call == "set_tags":
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in record["tags"].items()])
    elif call == "log_artifact":
        if not Path(record["path"]).exists():
            log.warning("pending artifact %s no longer exists; not sent", record["path"])
            return
        client.log_artifact(run_id, record["path"], record.get("artifact_path"))
    elif call == "log_model":
        _replay_model(client, uri, run_id, record)
    elif call == "end_run":
        client.set_terminated(run_id, record["status"], end_time=record.get("time"))
    else:
        log.warning("unknown pending call %r; skipped", call)


def _replay_model(client: Any, uri: str | None, run_id: str, record: Mapping[str, Any]) -> None:
    """Rebuild the model from the recorded checkpoint and log it to ``run_id`` as training would have."""
    checkpoint = record.get("checkpoint")
    if not checkpoint or not Path(checkpoint).is_file():
        log.warning("pending model of run %s has no checkpoint to rebuild it from (%s); not sent", run_id, checkpoint)
        return
    import mlflow
    import torch

    from brats_psp.checkpoint import build_model_from_checkpoint, config_of, load_checkpoint
    from brats_psp.inference import RegionProbabilities

    state = load_checkpoint(checkpoint)
    cfg = config_of(state)
    model = RegionProbabilities(build_model_from_checkpoint(state), cfg.model.output)
    example = torch.zeros(1, cfg.data.in_channels, *cfg.infer.roi_size)
    from mlflow.tracking import fluent

    info = client.get_run(run_id).info
    status = info.status
    # log_model logs into the active run, which takes MLflow's process-wide URI and experiment; put them back after
    saved = (mlflow.get_tracking_uri(), fluent._active_experiment_id, os.environ.get("MLFLOW_EXPERIMENT_ID"))
    if uri:
        mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment(experiment_id=info.experiment_id)
        with mlflow.start_run(run_id=run_id):
            _log_pytorch_model(model, _signature(model, example), record.get("registered_name"))
    finally:
        mlflow.set_tracking_uri(saved[0])
        fluent._active_experiment_id = saved[1]
        if saved[2] is None:
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = saved[2]
        # leaving the block marked the run FINISHED; put back the status the server had
        if status == "RUNNING":
            client.update_run(run_id, status="RUNNING")
        else:
            client.set_terminated(run_id, status)


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:_MAX_PARAM_CHARS]
