"""Where tracking data goes: the MLflow store, the files a run keeps in its folder, how a model is logged.

Shared by the live tracker (:mod:`brats_psp.tracking.live`) and the replay of calls that could
not be sent (:mod:`brats_psp.tracking.replay`). Public MLflow API only.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

from brats_psp.config import Config
from brats_psp.io import write_text

__all__ = [
    "PENDING_FILE",
    "REPLAYED_FILE",
    "RUNNING_FILE",
    "mark_running",
    "clear_running",
    "training_process",
    "resolve_tracking_uri",
    "configure_tracking",
    "ensure_store",
    "git_commit",
    "param_value",
    "case_set",
    "log_case_set",
    "model_signature",
    "model_requirements",
    "log_pytorch_model",
]

log = logging.getLogger(__name__)

#: MLflow's limit on the length of a param value.
MAX_PARAM_CHARS = 6000
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
    """Point MLflow at the configured store (created safely, :func:`ensure_store`); return the URI in use."""
    import mlflow

    uri = resolve_tracking_uri(cfg)
    if uri:
        mlflow.set_tracking_uri(uri)
    uri = mlflow.get_tracking_uri()
    ensure_store(uri, cfg.tracking.experiment)
    return uri


def ensure_store(uri: str, experiment: str | None = None) -> None:
    """Create a SQLite tracking store's tables (and ``experiment``) under a file lock (``<db>.lock``).

    MLflow creates and migrates a new SQLite store on the first connection; two runs that start
    together on a new store both try, and one of them fails (a duplicate column, an alembic
    migration row not found) and goes offline; so may two that create the same experiment. With
    the lock, the first process creates the tables and the experiment while the others wait,
    then find them made. Other stores (a server, PostgreSQL) are
    left to their own locking. A store that cannot be reached is reported by the first call
    that needs it, as before.
    """
    if not uri.startswith("sqlite:///"):
        return
    import fcntl

    from mlflow.tracking import MlflowClient

    db = Path(uri[len("sqlite:///") :])
    if not db.parent.is_dir():
        return
    with open(f"{db}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)
            if experiment and client.get_experiment_by_name(experiment) is None:
                client.create_experiment(experiment)
        except Exception as err:  # reported again, with context, by the call that needs the store
            log.debug("tracking store %s not ready: %s", uri, err)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def git_commit() -> str:
    """The commit of the checkout brats_psp runs from, or ``unknown``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def model_signature(model: Any, input_example: Any) -> Any:
    """The MLflow signature of ``model`` from one forward pass on ``input_example``."""
    import torch
    from mlflow.models import infer_signature

    with torch.inference_mode():
        output = model(input_example)
    return infer_signature(input_example.numpy(), output.float().numpy())


#: What loading the logged model needs: the pickled network's classes (this package), torch, and
#: what unpickling uses. Named, so that MLflow does not infer them: its inference imports the model
#: in a subprocess, 4.9 of the 5.6 s that logging a model took.
MODEL_PACKAGES = ("brats-psp", "torch", "numpy", "cloudpickle")


def model_requirements() -> list[str]:
    """Pinned pip requirements of the logged model: :data:`MODEL_PACKAGES` at their installed
    versions, without local labels (``2.13.0+cpu`` -> ``2.13.0``, as MLflow itself writes them)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in MODEL_PACKAGES:
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:  # brats_psp run from a checkout without installing it
            pins.append(name)
    return pins


def log_pytorch_model(model: Any, signature: Any, registered_name: str | None) -> None:
    """``mlflow.pytorch.log_model`` into the active run as ``model``, with :func:`model_requirements`."""
    import mlflow

    mlflow.pytorch.log_model(
        model,
        name="model",
        serialization_format="pickle",
        signature=signature,
        registered_model_name=registered_name,
        pip_requirements=model_requirements(),
    )


def param_value(value: Any) -> str:
    """A config value as an MLflow param (lists and dicts as JSON, cut to MLflow's limit)."""
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:MAX_PARAM_CHARS]


def case_set(name: str, case_ids: list[str], source: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A set of cases as an MLflow dataset record: ``name``, a digest of the case ids (and
    ``extra``: layout, cache fingerprints), the source folder and a profile (the case count).

    The digest is what tells two runs' case sets apart: the same cases with the same
    preprocessing give the same digest, whatever their order.
    """
    import hashlib

    body = json.dumps({"cases": sorted(case_ids), **(extra or {})}, sort_keys=True)
    digest = hashlib.sha1(body.encode()).hexdigest()[:10]
    return {
        "name": name,
        "digest": digest,
        "source": json.dumps({"uri": source}),
        "schema": json.dumps({"case_ids": sorted(case_ids)}),
        "profile": json.dumps({"cases": len(case_ids), **(extra or {})}, sort_keys=True)[:MAX_PARAM_CHARS],
    }


def log_case_set(client: Any, run_id: str, record: dict[str, Any], context: str) -> None:
    """``mlflow.log_input`` of a :func:`case_set` record on ``run_id`` (tagged with its context:
    training, validation, evaluation), so the MLflow UI shows the set and its digest."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(record["name"], record["digest"], "local", record["source"], record.get("schema"), record.get("profile"))
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])

