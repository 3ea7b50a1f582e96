"""The live tracker of a training run, and its do-nothing twin.

:class:`RunTracker` talks to MLflow for rank 0 of a run. When the tracking server cannot be
reached, training goes on: the first failed call is logged as a warning and every failed call
is appended to ``<run dir>/mlflow_pending.jsonl`` (its format: :mod:`brats_psp.tracking.replay`)
so nothing is lost; the run ends with a warning that says how many calls are kept there. Once
the server is back, ``python pipelines/run.py sync-mlflow <run dir>`` sends them.

:class:`NullTracker` has the same methods and does nothing: processes of rank > 0, and runs with
``tracking.enabled: false``. :func:`make_tracker` picks one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from brats_psp.config import Config, config_to_dict, flatten
from brats_psp.tracking.store import PENDING_FILE, configure_tracking, log_case_set, log_pytorch_model, model_signature, param_value

__all__ = ["RunTracker", "NullTracker", "make_tracker"]

log = logging.getLogger(__name__)


class RunTracker:
    """Thin wrapper over one MLflow run that never stops training: a call that fails is kept
    in ``<fallback_dir>/mlflow_pending.jsonl`` for :func:`~brats_psp.tracking.replay.replay_pending`."""

    def __init__(self, cfg: Config, fallback_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.run_id: str | None = None
        self.fallback_dir = fallback_dir
        self.warned = False
        self.pending_calls = 0  # failed calls recorded for replay
        self._unwritten: list[dict[str, Any]] = []  # records made before fallback_dir was known
        self._uri: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, run_id: str | None = None, run_name: str | None = None, tags: Mapping[str, str] | None = None) -> str | None:
        """Start a new run, or reopen ``run_id`` (resume)."""
        import mlflow

        uri = self._uri = configure_tracking(self.cfg)
        system = _system_metrics(self.cfg.tracking.system_metrics)
        try:
            if run_id is None:
                mlflow.set_experiment(self.cfg.tracking.experiment)
                run = mlflow.start_run(run_name=run_name or self.cfg.tracking.run_name, tags=dict(tags or {}), log_system_metrics=system)
            else:
                run = mlflow.start_run(run_id=run_id, log_system_metrics=system)
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
        import mlflow

        params = {k: param_value(v) for k, v in {**flatten(config_to_dict(cfg)), **extra}.items()}

        def log_new_params() -> None:
            existing = mlflow.get_run(self.run_id).data.params  # a resumed run keeps its params
            fresh = {k: v for k, v in params.items() if k not in existing}
            if fresh:
                mlflow.log_params(fresh)

        self._call("log_params", log_new_params, {"params": params})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import mlflow

        values = {k: float(v) for k, v in metrics.items()}
        self._call("log_metrics", lambda: mlflow.log_metrics(values, step=step), {"metrics": values, "step": step})

    def backfill(self, history: list[dict[str, float]]) -> None:
        """Log the epochs of ``history`` that the run lacks (a kill between checkpoint and logging)."""
        if self.run_id is None:
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

    def log_case_set(self, record: Mapping[str, Any], context: str) -> None:
        """A set of cases (:func:`~brats_psp.tracking.store.case_set`) as an MLflow input of the run."""
        from mlflow.tracking import MlflowClient

        self._call("log_input", lambda: log_case_set(MlflowClient(), self.run_id, dict(record), context), {"dataset": dict(record), "context": context})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        import mlflow

        self._call(
            "log_artifact",
            lambda: mlflow.log_artifact(os.fspath(path), artifact_path),
            {"path": os.fspath(Path(path).resolve()), "artifact_path": artifact_path},
        )

    def set_tags(self, tags: Mapping[str, str]) -> None:
        import mlflow

        self._call("set_tags", lambda: mlflow.set_tags(dict(tags)), {"tags": dict(tags)})

    def log_model(
        self, model: Any, input_example: Any, registered_name: str | None = None, checkpoint: str | os.PathLike | None = None
    ) -> None:
        """Log ``model`` with ``mlflow.pytorch`` (pickle serialisation, any input size, with a signature).

        ``checkpoint`` is the file the model was built from: when the call fails, a replay rebuilds the
        model from it.
        """
        signature = model_signature(model, input_example)  # outside _call: a model that fails is not an MLflow outage
        self._call(
            "log_model",
            lambda: log_pytorch_model(model, signature, registered_name),
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


def _system_metrics(requested: bool) -> bool:
    """``tracking.system_metrics``, when MLflow can honour it (psutil installed); else a warning."""
    if not requested:
        return False
    import importlib.util

    if importlib.util.find_spec("psutil") is None:
        log.warning('tracking.system_metrics=true needs psutil (pip install -e ".[system]"); training goes on without system metrics')
        return False
    return True


class NullTracker:
    """A tracker that records nothing (ranks > 0, or ``tracking.enabled: false``): a new run is
    offline, its folder ``offline-<time>``, and there is nothing to replay."""

    run_id: str | None = None
    pending_calls = 0
    fallback_dir: Path | None = None

    def start(self, run_id: str | None = None, run_name: str | None = None, tags: Mapping[str, str] | None = None) -> str | None:
        """``run_id`` as given: a resumed run keeps its folder."""
        return run_id

    def end(self, status: str) -> None:
        pass

    def log_config(self, cfg: Config, extra: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def backfill(self, history: list[dict[str, float]]) -> None:
        pass

    def log_case_set(self, record: Mapping[str, Any], context: str) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_model(
        self, model: Any, input_example: Any, registered_name: str | None = None, checkpoint: str | os.PathLike | None = None
    ) -> None:
        pass


def make_tracker(cfg: Config, is_main: bool = True) -> RunTracker | NullTracker:
    """:class:`RunTracker` for the main process of a run with ``tracking.enabled``, else :class:`NullTracker`."""
    return RunTracker(cfg) if is_main and cfg.tracking.enabled else NullTracker()
