"""The export stage: a trained network to ONNX at a fixed tile size with a dynamic batch.

PSPNet's adaptive pooling bins are frozen at the export size (``shared/REFERENCE.md``), so the
graph takes ``B × C × H × W`` tiles of one size (default: the model's ``infer.roi_size``) and any
batch; run it over slices with sliding windows, as the infer stage does. The exported graph
returns region probabilities ``B × 3 × H × W`` (WT, TC, ET), like the MLflow model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from brats_psp.inference import RegionProbabilities
from brats_psp.io import atomic_path
from brats_psp.checkpoint import LoadedModel, load_model

__all__ = ["export_onnx", "check_onnx"]

log = logging.getLogger(__name__)


def export_onnx(
    model: str | LoadedModel, out: str | os.PathLike, tile: Sequence[int] | None = None, tracking_uri: str | None = None
) -> Path:
    """Export ``model`` (checkpoint, run ID or MLflow model URI) to ``out`` (.onnx), atomically."""
    loaded = model if isinstance(model, LoadedModel) else load_model(str(model), tracking_uri)
    cfg = loaded.config
    h, w = tuple(tile or cfg.infer.roi_size)
    wrapper = RegionProbabilities(loaded.network.eval(), cfg.model.output).eval()
    example = torch.zeros(2, cfg.data.in_channels, h, w)
    batch = torch.export.Dim("batch", min=1, max=4096)
    out = Path(out)
    with atomic_path(out) as tmp:
        torch.onnx.export(
            wrapper, (example,), str(tmp), input_names=["image"], output_names=["probabilities"],
            dynamic_shapes=({0: batch},), dynamo=True, verbose=False, external_data=False,
        )
    log.info("exported %s (tile %d x %d, %d input channels, dynamic batch)", out, h, w, cfg.data.in_channels)
    return out


def check_onnx(model: str | LoadedModel, onnx_path: str | os.PathLike, batch: int = 3, seed: int = 0) -> float:
    """Largest absolute difference between onnxruntime and PyTorch on one random batch."""
    import onnxruntime as ort

    loaded = model if isinstance(model, LoadedModel) else load_model(str(model))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    x = torch.randn(batch, *shape[1:], generator=torch.Generator().manual_seed(seed))
    ours = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.inference_mode():
        ref = RegionProbabilities(loaded.network.eval(), loaded.config.model.output)(x).numpy()
    return float(np.abs(ours - ref).max())
