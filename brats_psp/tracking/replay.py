"""Replay: send the MLflow calls a run could not send while the tracking store was down.

``python pipelines/run.py sync-mlflow <run dir>`` calls :func:`replay_pending`. The file it reads,
``<run dir>/mlflow_pending.jsonl``, holds one JSON object per failed call, in the order they
were made (written by :class:`~brats_psp.tracking.live.RunTracker`)::

    {"call": "log_metrics", "run_id": "<id or null>", "uri": "<tracking URI>", "experiment": "<name>",
     "time": <ms since the epoch>, "metrics": {...}, "step": 3}

with, per ``call``: ``start_run`` (``run_name``, ``tags``: the run could not be created),
``log_params`` (``params``), ``log_metrics`` (``metrics``, ``step``), ``set_tags`` (``tags``),
``log_artifact`` (``path``, ``artifact_path``), ``log_input`` (``dataset``, ``context``: a set of
cases), ``log_model`` (``checkpoint``, ``registered_name``:
the model is rebuilt from that checkpoint) and ``end_run`` (``status``). ``run_id`` is null when
the run was never created on the server.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from brats_psp.io import write_text
from brats_psp.tracking.store import PENDING_FILE, REPLAYED_FILE, log_case_set, log_pytorch_model, model_signature, training_process

__all__ = ["ReplayError", "replay_pending"]

log = logging.getLogger(__name__)


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
    elif call == "log_input":
        log_case_set(client, run_id, record["dataset"], record["context"])
    elif call == "end_run":
        client.set_terminated(run_id, record["status"], end_time=record.get("time"))
    else:
        log.warning("unknown pending call %r; skipped", call)


def _replay_model(client: Any, uri: str | None, run_id: str, record: Mapping[str, Any]) -> None:
    """Rebuild the model from the recorded checkpoint and log it to ``run_id`` as training would have.

    ``mlflow.pytorch.log_model`` logs into the active run of MLflow's process-wide state (tracking
    URI, active experiment); it runs in a spawned process of its own, so that this process's state
    is left as it was. The run's status is put back afterwards (leaving the run marks it FINISHED).
    """
    checkpoint = record.get("checkpoint")
    if not checkpoint or not Path(checkpoint).is_file():
        log.warning("pending model of run %s has no checkpoint to rebuild it from (%s); not sent", run_id, checkpoint)
        return
    info = client.get_run(run_id).info
    ctx = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            pool.submit(_log_model_into_run, uri, info.experiment_id, run_id, str(checkpoint), record.get("registered_name")).result()
    finally:
        if info.status == "RUNNING":
            client.update_run(run_id, status="RUNNING")
        else:
            client.set_terminated(run_id, info.status)


def _log_model_into_run(uri: str | None, experiment_id: str, run_id: str, checkpoint: str, registered_name: str | None) -> None:
    """(In a process of its own.) Log the network of ``checkpoint`` as the model of MLflow run ``run_id``."""
    import mlflow
    import torch

    from brats_psp.checkpoint import build_model_from_checkpoint, config_of, load_checkpoint
    from brats_psp.inference import RegionProbabilities

    state = load_checkpoint(checkpoint)
    cfg = config_of(state)
    model = RegionProbabilities(build_model_from_checkpoint(state), cfg.model.output)
    example = torch.zeros(1, cfg.data.in_channels, *cfg.infer.roi_size)
    if uri:
        mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=experiment_id)
    with mlflow.start_run(run_id=run_id):
        log_pytorch_model(model, model_signature(model, example), registered_name)
