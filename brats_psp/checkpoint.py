"""Checkpoints: everything needed to resume training or to run inference, written atomically.

A checkpoint is a plain dict of tensors and primitive values, loaded with
``torch.load(weights_only=True)``: a file that carries any other pickled object is refused.

Keys: ``model`` (state dict), ``optimizer``, ``scheduler``, ``scaler``, ``epoch`` (last
completed, 0-based), ``best_metric``, ``best_epoch``, ``rng``, ``config`` (the resolved
config as a dict), ``preprocessing`` (what inference must repeat), ``run_id`` (MLflow),
``history`` (per-epoch metrics), ``format_version``.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from brats_psp.config import Config, config_from_dict
from brats_psp.io import atomic_path

__all__ = ["FORMAT_VERSION", "CheckpointError", "save_checkpoint", "load_checkpoint", "config_of", "build_model_from_checkpoint"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unreadable, unsafe or not a brats_psp checkpoint."""


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
            tensors and plain containers, or is not a brats_psp checkpoint.
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
    return state


def config_of(state: dict[str, Any]) -> Config:
    """The resolved config a checkpoint was trained with."""
    return config_from_dict(state["config"])


def build_model_from_checkpoint(state: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the network of a checkpoint and load its weights (eval mode, on CPU)."""
    from brats_psp.config import config_to_dict
    from brats_psp.networks import build_network

    cfg = config_of(state)
    model = build_network(config_to_dict(cfg)["model"], cfg.data.in_channels)
    model.load_state_dict(state["model"])
    return model.eval()
