"""MLflow tracking: one run per training job, written by rank 0 only.

The tracking store is MLflow's own default (``sqlite:///mlflow.db`` in the working
directory) unless ``MLFLOW_TRACKING_URI`` or ``tracking.uri`` names another one; a remote
``mlflow server`` works the same way.

When the tracking server cannot be reached, training goes on: the failed call is logged as a
warning and its content is appended to ``<run dir>/mlflow_pending.jsonl`` so nothing is lost.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from brats_psp.config import Config, config_to_dict, flatten

__all__ = ["configure_tracking", "RunTracker", "git_commit", "resolve_tracking_uri"]

log = logging.getLogger(__name__)

#: MLflow's limit on the length of a param value.
_MAX_PARAM_CHARS = 6000


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

    # ------------------------------------------------------------------ lifecycle
    def start(self, run_id: str | None = None, run_name: str | None = None, tags: Mapping[str, str] | None = None) -> str | None:
        """Start a new run, or reopen ``run_id`` (resume)."""
        if not self.enabled:
            return None
        import mlflow

        uri = configure_tracking(self.cfg)
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
            return run_id
        self.run_id = run.info.run_id
        return self.run_id

    def end(self, status: str) -> None:
        """Close the run with ``FINISHED`` or ``FAILED``."""
        if not self.enabled:
            return
        import mlflow

        self._call("end_run", lambda: mlflow.end_run(status=status), {"status": status})

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

        self._call("log_artifact", lambda: mlflow.log_artifact(os.fspath(path), artifact_path), {"path": os.fspath(path)})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if not self.enabled:
            return
        import mlflow

        self._call("set_tags", lambda: mlflow.set_tags(dict(tags)), {"tags": dict(tags)})

    def log_model(self, model: Any, input_example: Any, registered_name: str | None = None) -> None:
        """Log ``model`` with ``mlflow.pytorch`` (pickle serialisation, any input size, with a signature)."""
        if not self.enabled:
            return
        import mlflow
        import torch
        from mlflow.models import infer_signature

        with torch.inference_mode():
            output = model(input_example)
        signature = infer_signature(input_example.numpy(), output.float().numpy())
        self._call(
            "log_model",
            lambda: mlflow.pytorch.log_model(
                model,
                name="model",
                serialization_format="pickle",
                signature=signature,
                registered_model_name=registered_name,
            ),
            {"model": "not logged"},
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
            if self.pending_file is not None:
                self.pending_file.parent.mkdir(parents=True, exist_ok=True)
                with open(self.pending_file, "a") as fh:
                    fh.write(json.dumps({"call": what, "run_id": self.run_id, **payload}, default=str) + "\n")

    @property
    def pending_file(self) -> Path | None:
        return None if self.fallback_dir is None else self.fallback_dir / "mlflow_pending.jsonl"


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:_MAX_PARAM_CHARS]
