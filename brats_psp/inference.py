"""Slice-wise sliding-window prediction of whole volumes, shared by validation and the infer stage.

:func:`predict_volume` takes a preprocessed volume (C × X × Y × Z, axial slices along Z),
runs the 2D network over every slice of ``infer.planes`` (axial by default), slices batched
``infer.batch_size`` at a time in channels-last layout, and returns region probabilities
(3 × X × Y × Z, WT/TC/ET). Slices that fit in one window of ``infer.roi_size`` (the usual
case: the volume is cropped to the brain) are padded and batched directly; larger ones go
through MONAI's :class:`~monai.inferers.SliceInferer` (``infer.overlap``, ``infer.blend``).
Both give the same result where both apply (tested). Only slices inside the brain's box are
computed: the volume arrives cropped to it.
:func:`probabilities_to_tissue` thresholds them into a tissue map with the BraTS nesting (optionally by
hysteresis, :func:`hysteresis_masks`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from brats_psp import _monai  # noqa: F401, I001  (MONAI without the optional packages it probes: see there)
from monai.inferers import SliceInferer
from torch import nn

from brats_psp.config import InferConfig
from brats_psp.data.geometry import PLANE_AXES, centre_pad
from brats_psp.labels import REGION_NAMES, regions_to_tissue
from brats_psp.networks import region_probabilities
from brats_psp.runtime import Runtime, autocast

__all__ = [
    "PLANE_AXES", "RegionProbabilities", "above_threshold", "add_context", "hysteresis_masks", "is_out_of_memory", "predict_volume", "probabilities_to_tissue",
    "zoom_in_plane",
]

log = logging.getLogger(__name__)


class RegionProbabilities(nn.Module):
    """Wrap a network so it returns only region probabilities (B × 3 × H × W), for inferers and MLflow.

    ``class_gate`` > 0 (``infer.class_gate``): a region's probabilities are set to zero in every
    slice (window) where the network's tumour-class head gives that region a probability below
    it: the head sees the whole slice and says which regions it contains.
    """

    def __init__(self, net: nn.Module, output: str, class_gate: float = 0.0) -> None:
        super().__init__()
        self.net = net
        self.output = output
        self.class_gate = float(class_gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)  # the layout oneDNN and cuDNN convolve fastest
        out = self.net(x)
        probs = region_probabilities(out.masks.float(), self.output)
        if self.class_gate > 0:
            present = torch.sigmoid(out.class_logits.float()) >= self.class_gate  # B × 3
            probs = probs * present[:, :, None, None].to(probs.dtype)
        return probs


def is_out_of_memory(err: BaseException) -> bool:
    """True for a CUDA or CPU allocation failure (PyTorch raises both as RuntimeError subclasses)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def add_context(image: torch.Tensor, context: int, axis: int = 2) -> torch.Tensor:
    """C × X × Y × Z -> C·(2k+1) × X × Y × Z: each slice along spatial ``axis`` with ``k`` neighbours each side.

    The channel order matches :meth:`brats_psp.data.cache.CachedVolume.slab` (neighbour-major,
    edges repeated).
    """
    if context == 0:
        return image
    dim = axis + 1
    n = image.shape[dim]
    shifted = [image.index_select(dim, torch.clamp(torch.arange(n) + o, 0, n - 1).to(image.device)) for o in range(-context, context + 1)]
    return torch.cat(shifted, dim=0)


def predict_volume(
    model: nn.Module,
    image: torch.Tensor,
    cfg: InferConfig,
    runtime: Runtime,
    output: str = "sigmoid",
    context: int = 0,
) -> torch.Tensor:
    """Region probabilities of a preprocessed volume, averaged over ``cfg.planes`` and flips.

    ``infer.planes=[axial, coronal, sagittal]`` is the tri-planar ensemble: the same 2D network
    slides over the slices of each plane; it helps a model trained on all three planes
    (``data.planes``), not one trained on axial slices only.

    Args:
        model: a network returning :class:`~brats_psp.networks.PSPNetOutput` (in eval mode).
        image: float C × X × Y × Z (C = 4 contrasts), z-scored, RAS, axial slices along Z.
        cfg: window size, overlap, blending, batch size, flip TTA, planes and the class-head gate
            (``class_gate``, :class:`RegionProbabilities`). When a batch runs
            out of memory, the batch is halved and retried (down to one slice), with a warning.
        runtime: device and autocast dtype.
        output: the network's output mode.
        context: 2.5D neighbours the network was trained with.

    Returns:
        float32 3 × X × Y × Z probabilities of WT, TC, ET (on CPU).
    """
    wrapper = RegionProbabilities(model.to(memory_format=torch.channels_last), output, cfg.class_gate).eval()
    total, count = None, 0
    batch_size = cfg.batch_size
    with torch.inference_mode(), autocast(runtime):
        for plane in cfg.planes:
            axis = PLANE_AXES[plane]
            x = add_context(image.float(), context, axis)[None].to(runtime.device)
            in_plane = [d + 2 for d in range(3) if d != axis]  # the two axes of each 2D slice
            flips: Sequence[tuple[int, ...]] = [()] + ([(in_plane[0],), (in_plane[1],), tuple(in_plane)] if cfg.tta else [])
            for scale in cfg.scales:
                xs = zoom_in_plane(x, axis, scale)  # once per scale; its flips are summed at this size
                at_scale = None
                for dims in flips:
                    xi = torch.flip(xs, dims) if dims else xs
                    while True:
                        try:
                            probs = _predict_plane(xi, wrapper, cfg, axis, batch_size)
                            break
                        except RuntimeError as err:  # out of memory: fall back to smaller batches, down to one slice
                            if not is_out_of_memory(err) or batch_size == 1:
                                raise
                            batch_size = max(1, batch_size // 2)
                            log.warning("out of memory at inference (%s); retrying with %d slices per batch", str(err).splitlines()[0], batch_size)
                            if runtime.device.type == "cuda":
                                torch.cuda.empty_cache()
                    probs = torch.flip(probs, dims) if dims else probs
                    at_scale = probs if at_scale is None else at_scale + probs
                    count += 1
                assert at_scale is not None
                back = zoom_in_plane(at_scale, axis, size=x.shape[2:])  # linear: the sum zoomed back once
                total = back if total is None else total + back
    assert total is not None
    return (total / count)[0].cpu()


def zoom_in_plane(x: torch.Tensor, axis: int, scale: float = 1.0, size: Sequence[int] | None = None) -> torch.Tensor:
    """Resize 1 × C × X × Y × Z across the slices of spatial ``axis`` (linear), keeping the slice count.

    ``scale`` multiplies the two in-plane sizes (rounded); ``size``, when given, is the spatial
    size to return to instead (the slice axis must keep its length). ``x`` itself is returned
    when its size is already the one asked for (scale 1).
    """
    if size is None:
        size = [n if d == axis else max(1, round(n * scale)) for d, n in enumerate(x.shape[2:])]
    size = [int(n) for n in size]
    if size[axis] != x.shape[axis + 2]:
        raise ValueError(f"zoom_in_plane keeps the {x.shape[axis + 2]} slices along axis {axis}, got size {size}")
    if size == list(x.shape[2:]):
        return x
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


def _predict_plane(x: torch.Tensor, net: nn.Module, cfg: InferConfig, axis: int, batch_size: int) -> torch.Tensor:
    """1 × C × X × Y × Z -> 1 × 3 × X × Y × Z over the slices along spatial ``axis``.

    When every slice fits in one window (the usual case after cropping to the brain) the
    slices go straight to the network in batches, padded to the window as MONAI pads them:
    the same result as :class:`~monai.inferers.SliceInferer`, without its per-window
    bookkeeping (a third of the time outside the network). Otherwise SliceInferer slides
    overlapping, blended windows over each slice.
    """
    size = [x.shape[d + 2] for d in range(3) if d != axis]
    if any(s > r for s, r in zip(size, cfg.roi_size)):
        return _slice_inferer(cfg, axis, batch_size)(x, net).float()
    h, w = size
    pad = centre_pad(size, cfg.roi_size)  # (W before, W after, H before, H after), as SliceInferer pads
    left, top = pad[0], pad[2]
    slices = x[0].movedim(axis + 1, 0)  # S × C × H × W
    out = [
        net(F.pad(slices[i : i + batch_size], pad, value=0.0))[..., top : top + h, left : left + w].float()
        for i in range(0, slices.shape[0], batch_size)
    ]
    return torch.cat(out).movedim(0, axis + 1)[None]


def _slice_inferer(cfg: InferConfig, axis: int, batch_size: int) -> SliceInferer:
    return SliceInferer(
        roi_size=tuple(cfg.roi_size),
        sw_batch_size=batch_size,
        spatial_dim=axis,
        overlap=cfg.overlap,
        mode=cfg.blend,
        padding_mode="constant",
        cval=0.0,
        progress=False,
    )


def above_threshold(probs: torch.Tensor | np.ndarray, threshold: float | Sequence[float] = 0.5) -> torch.Tensor | np.ndarray:
    """3 × ... region probabilities -> boolean masks: above ``threshold``, one value for every
    region or one per region (WT, TC, ET, as ``infer.region_thresholds``)."""
    if probs.shape[0] != len(REGION_NAMES):
        raise ValueError(f"expected {len(REGION_NAMES)} region channels, got shape {tuple(probs.shape)}")
    if np.ndim(threshold) == 0:
        return probs > float(threshold)  # type: ignore[arg-type]
    shape = (len(REGION_NAMES),) + (1,) * (probs.ndim - 1)
    values = np.asarray(threshold, dtype=np.float32).reshape(shape)
    return probs > (torch.from_numpy(values).to(probs.device) if isinstance(probs, torch.Tensor) else values)


def hysteresis_masks(probs: np.ndarray, threshold: float | Sequence[float], low: float | Sequence[float]) -> np.ndarray:
    """3 × ... region probabilities -> boolean masks by hysteresis thresholding, per region.

    A region is its voxels above ``threshold`` (as :func:`above_threshold`) and, with them, the
    voxels above ``low`` that are connected to one of those (26-connected through voxels above
    ``low``): a confident region grows over its uncertain edge, and nothing of that edge that
    touches no confident voxel is added. ``low`` at or above ``threshold`` changes nothing.
    """
    from scipy import ndimage

    high = np.asarray(above_threshold(probs, threshold))
    weak = np.asarray(above_threshold(probs, low)) | high
    masks = high.copy()
    for r in range(len(REGION_NAMES)):
        if not high[r].any() or (weak[r] == high[r]).all():
            continue
        labelled, _ = ndimage.label(weak[r], structure=np.ones((3,) * weak[r].ndim, bool))
        seeds = np.unique(labelled[high[r]])
        masks[r] = np.isin(labelled, seeds[seeds > 0])
    return masks


def probabilities_to_tissue(
    probs: torch.Tensor | np.ndarray, threshold: float | Sequence[float] = 0.5, low: float | Sequence[float] | None = None
) -> np.ndarray:
    """3 × ... region probabilities -> uint8 tissue map (ET > TC > WT nesting, see :mod:`brats_psp.labels`);
    with ``low`` (one value or one per region), hysteresis thresholding (:func:`hysteresis_masks`)."""
    probs = probs.numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    masks = above_threshold(probs, threshold) if low is None else hysteresis_masks(probs, threshold, low)
    return regions_to_tissue(masks).astype(np.uint8)
