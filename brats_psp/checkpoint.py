"""Checkpoints: everything needed to resume training or to run inference, written atomically.

A checkpoint is a plain dict of tensors and primitive values, loaded with
``torch.load(weights_only=True)``: a file that carries any other pickled object is refused.

Keys: ``model`` (state dict), ``optimizer``, ``scheduler``, ``scaler``, ``epoch`` (last
completed, 0-based), ``best_metric``, ``best_epoch``, ``rng``, ``config`` (the resolved
config as a dict), ``preprocessing`` (what inference must repeat), ``run_id`` (MLflow),
``history`` (per-epoch metrics), ``format_version``. With ``train.ema_decay`` set, ``model``
is the moving average of the weights (what validation scored and inference uses) and
``train_model`` / ``ema_updates`` are the training network's weights and the average's count,
for resuming.

:func:`resolve_checkpoint` is the one way from what a user names (a file, a run folder, an
MLflow run ID or model URI) to a checkpoint file: ``train --resume`` asks it for ``last.pt``,
``infer`` and ``export`` for ``best.pt`` (:func:`load_model`).
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from brats_psp.config import Config, ConfigError, config_from_dict
from brats_psp.errors import CheckpointError
from brats_psp.io import atomic_path

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "LoadedModel",
    "save_checkpoint",
    "load_checkpoint",
    "config_of",
    "build_model_from_checkpoint",
    "resolve_checkpoint",
    "load_model",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (a kill mid-write leaves the previous file intact)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({**state, "format_version": FORMAT_VERSION}, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``.

    Raises:
        CheckpointError: the file is missing, truncated, carries pickled objects other than
            tensors and plain containers, is not a brats_psp checkpoint, or holds a config
            this version of brats_psp does not know (:func:`config_of`).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refused, the checkpoint carries a pickled object that is not plain data ({err})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not a brats_psp checkpoint (no 'model' and 'config' entries)")
    try:
        config_of(state)  # its saved config fits this version: refused here, where the file is known
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    return state


def config_of(state: dict[str, Any]) -> Config:
    """The resolved config a checkpoint was trained with.

    Raises:
        CheckpointError: the saved config does not fit this version of brats_psp (a key it
            does not know or a value it refuses: a checkpoint of another version).
    """
    try:
        return config_from_dict(state["config"])
    except ConfigError as err:
        run = f"run {state['run_id']}, " if state.get("run_id") else ""
        raise CheckpointError(
            f"the checkpoint ({run}format {state.get('format_version', '?')}) was saved by another version of brats_psp: {err}; "
            "load it with the brats_psp that trained it"
        ) from None


def build_model_from_checkpoint(state: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the network of a checkpoint and load its weights (eval mode, on CPU)."""
    from brats_psp.networks import build_network

    cfg = config_of(state)
    model = build_network(cfg.model, cfg.data.in_channels)
    model.load_state_dict(state["model"])
    return model.eval()


def resolve_checkpoint(
    model: str | os.PathLike,
    which: Literal["best", "last"] = "best",
    output_dir: str | os.PathLike | None = None,
    tracking_uri: str | None = None,
) -> Path:
    """The local checkpoint file that ``model`` names, tried in this order:

    1. a checkpoint file;
    2. a run folder ``<output_dir>/<model>/checkpoints/<which>.pt`` (``model`` is the run's name);
    3. an MLflow run ID, ``runs:/<run id>``, ``models:/<name>/<version>`` or ``models:/<name>@<alias>``
       (a registered model's version or alias, see ``promote``): the run's folder on
       this machine (its ``brats_psp.run_dir`` tag), else the run's logged artifact
       ``checkpoints/<which>.pt`` (downloaded; training logs ``best.pt`` only).

    Raises:
        CheckpointError: nothing of these exists, naming what was tried.
    """
    path = Path(model)
    if path.is_file():
        return path
    name = f"{which}.pt"
    model = str(model)
    if output_dir is not None and (Path(output_dir) / model / "checkpoints" / name).is_file():
        return Path(output_dir) / model / "checkpoints" / name
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient()
    try:
        if model.startswith("runs:/"):
            run_id = model[len("runs:/") :].split("/")[0]
        elif model.startswith("models:/"):
            run_id = _registered_run(client, model)
        else:
            run_id = model
        run_dir = client.get_run(run_id).data.tags.get("brats_psp.run_dir")
    except CheckpointError:
        raise
    except Exception as err:  # not a run ID, or the tracking server is down
        raise CheckpointError(f"{model}: not a checkpoint file, nor a run folder or MLflow run with checkpoints/{name} ({err})") from None
    if run_dir and (Path(run_dir) / "checkpoints" / name).is_file():
        return Path(run_dir) / "checkpoints" / name
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"checkpoints/{name}"))
    except Exception as err:
        raise CheckpointError(f"{model}: MLflow run {run_id} has no checkpoints/{name} on this machine or in its artifacts ({err})") from None


def _registered_run(client: Any, uri: str) -> str:
    """The run behind ``models:/<name>/<version>`` or ``models:/<name>@<alias>``."""
    body = uri[len("models:/") :]
    if "@" in body:
        name, _, alias = body.partition("@")
        return client.get_model_version_by_alias(name, alias).run_id
    name, _, version = body.partition("/")
    if not version:
        raise CheckpointError(f"{uri}: expected models:/<name>/<version> or models:/<name>@<alias>")
    return client.get_model_version(name, version).run_id


@dataclass
class LoadedModel:
    """A network ready for inference with the config and preprocessing it was trained with."""

    network: torch.nn.Module
    config: Config
    checkpoint: Path
    run_id: str | None


def load_model(model: str | os.PathLike, tracking_uri: str | None = None) -> LoadedModel:
    """Resolve ``model`` to its best checkpoint (:func:`resolve_checkpoint`) and build its
    network (eval mode, CPU)."""
    path = resolve_checkpoint(model, "best", tracking_uri=tracking_uri)
    state = load_checkpoint(path)
    return LoadedModel(build_model_from_checkpoint(state), config_of(state), path, state.get("run_id"))
