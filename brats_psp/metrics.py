"""Region metrics the way BraTS scores them (legacy whole-volume convention).

Empty masks, from ``shared/REFERENCE.md`` (the BraTS ranking up to 2021, as nnU-Net reproduces it):

============  ==========  =====  ============
reference     prediction  Dice   HD95 (mm)
============  ==========  =====  ============
empty         empty       1      0
empty         not empty   0      373.13
not empty     empty       0      373.13
============  ==========  =====  ============

373.13 mm = sqrt(240² + 240² + 155²), the diagonal of the BraTS volume.

HD95 here is the 95th percentile of the symmetric surface distances: the distances from
every surface voxel of the prediction to the reference surface, pooled with those from every
reference surface voxel to the prediction surface, in millimetres using the voxel spacing
(the definition of MedPy's ``hd95`` and of the BraTS 2017-2021 evaluation). Surface voxels
are mask voxels with a 6-connected (face) neighbour outside the mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["EMPTY_HD95_MM", "dice", "hd95", "sensitivity", "specificity", "region_metrics", "surface_voxels"]

#: HD95 when exactly one of the masks is empty: the diagonal of the 240 × 240 × 155 mm BraTS volume.
EMPTY_HD95_MM = float(np.sqrt(240.0**2 + 240.0**2 + 155.0**2))


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks; 1 when both are empty, 0 when only one is."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """The voxels of a mask with a face (6-connected) neighbour outside it."""
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1), border_value=0)
    return mask & ~eroded


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float:
    """95th percentile of the symmetric surface distances, in mm (BraTS legacy rules for empty masks)."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return 0.0
    if has_pred != has_ref:
        return EMPTY_HD95_MM
    # crop both to their joint bounding box (plus a margin) so the distance transforms stay small
    both = np.argwhere(pred | ref)
    lo = np.maximum(both.min(0) - 1, 0)
    hi = both.max(0) + 2
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    pred, ref = pred[box], ref[box]
    sp, sr = surface_voxels(pred), surface_voxels(ref)
    dist_to_ref = ndimage.distance_transform_edt(~sr, sampling=spacing)
    dist_to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    distances = np.concatenate([dist_to_ref[sp], dist_to_pred[sr]])
    return float(np.percentile(distances, 95))


def sensitivity(pred: np.ndarray, ref: np.ndarray) -> float:
    """True-positive rate; 1 when the reference is empty (nothing to find)."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    n = int(ref.sum())
    return 1.0 if n == 0 else int((pred & ref).sum()) / n


def specificity(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    """True-negative rate inside ``mask`` (default: the whole volume)."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    neg = ~ref if mask is None else (~ref & np.asarray(mask, bool))
    n = int(neg.sum())
    return 1.0 if n == 0 else int((~pred & neg).sum()) / n


def region_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0), with_hd95: bool = True) -> dict[str, float]:
    """Dice, HD95 (mm), sensitivity, specificity and volumes (mm³) of one region."""
    voxel_mm3 = float(np.prod(spacing))
    out = {
        "dice": dice(pred, ref),
        "sensitivity": sensitivity(pred, ref),
        "specificity": specificity(pred, ref),
        "volume_pred_mm3": float(np.count_nonzero(pred)) * voxel_mm3,
        "volume_ref_mm3": float(np.count_nonzero(ref)) * voxel_mm3,
    }
    if with_hd95:
        out["hd95"] = hd95(pred, ref, spacing)
    return out
