"""Lesion-wise metrics, in both definitions BraTS has ranked with since 2023.

Whole-volume Dice hides what matters with several lesions (metastases, multifocal gliomas):
one large lesion found and three small ones missed still scores well. Lesion-wise metrics
split each region (WT, TC, ET) into connected lesions and score them one by one. BraTS has
used two definitions; they differ widely on the same masks, so every number says which one
it is (``shared/REFERENCE.md``):

**panoptica** -- the current official package ``brats-evaluation`` (repository
BraTS/BraTS_evaluation, built on ``panoptica``), :func:`lesionwise_panoptica`:

1. lesions are the connected components of the reference and of the prediction
   (:data:`PANOPTICA_CONNECTIVITY`);
2. reference and predicted lesions are paired one to one by a maximum bipartite matching on
   Dice (a linear assignment that maximises the summed Dice of the pairs; a pair needs a Dice
   of at least :data:`MATCH_THRESHOLD`, so one shared voxel is enough);
3. ``tp`` = matched pairs, ``fp`` = unmatched predicted lesions, ``fn`` = unmatched reference
   lesions, ``f1`` = ``tp / (tp + (fp + fn) / 2)`` (panoptica's ``rq``);
4. ``dice``, ``hd95`` and ``nsd`` = the mean over the matched pairs of each pair's Dice, HD95
   and normalised surface Dice (panoptica's ``sq_dsc``, ``sq_hd95``, ``sq_nsd``: what
   ``brats-parse-metrics seg`` reports). As the package returns them: with lesions but no
   match, Dice 0, NSD 0, HD95 infinite and F1 0; with no lesion on either side, all NaN.

A pair's HD95 is the 95th percentile (linear interpolation) of the pooled distances between
the two surfaces (surface voxels: a face neighbour outside the mask), its NSD the mean of the
two surfaces' shares within the tolerance (the smallest voxel side), as panoptica computes
them. Difference: the package applies the header's (x, y, z) spacing to its (z, y, x) array,
so on anisotropic voxels its HD95 and NSD are those of the axes swapped; here the spacing goes
to its own axes (counts and Dice are unaffected).

**2023** -- the BraTS 2023 challenge script (repository rachitsaluja/BraTS-2023-Metrics,
``metrics.py``), :func:`lesionwise_2023`:

1. reference lesions are 26-connected components, merged when their dilations touch
   (binary dilation with the 18-connected structuring element, :data:`RULES_2023` iterations
   per task); predicted lesions are 26-connected components;
2. every predicted lesion that overlaps a (dilated) reference lesion belongs to it; the
   reference lesion's Dice and HD95 are those of the union of its predicted lesions (a missed
   one scores Dice 0 and HD95 :data:`PENALTY_2023_MM`);
3. reference lesions of at most the task's size threshold (mm³) are dropped; every predicted
   lesion that touches no reference lesion's reach is a false positive, whatever its size;
4. ``dice_2023`` = sum of the kept lesions' Dice / (kept lesions + false positives),
   ``hd95_2023`` = (sum of their HD95 + 374 per false positive) / the same count; 1 and 0
   when there is neither a lesion nor a false positive.

The 2023 script measures a lesion's HD95 on DeepMind's surface elements (voxel corners,
weighted by area, the larger of the two directed 95th percentiles); here it is the pooled
surface-voxel HD95 of :func:`brats_psp.metrics.hd95`, so a found lesion's HD95 can differ from
the script's by about a voxel, while the counts, the Dice and the 374 mm penalties are the same
(``tests/test_lesionwise.py`` checks both definitions against their reference implementations
where those are installed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from brats_psp.labels import REGION_NAMES
from brats_psp.metrics import dice, hd95, surface_voxels

__all__ = [
    "LESIONWISE_COLUMNS",
    "LESION_METRIC_NAMES",
    "PANOPTICA_CONNECTIVITY",
    "MATCH_THRESHOLD",
    "RULES_2023",
    "PENALTY_2023_MM",
    "lesions",
    "lesionwise_panoptica",
    "lesionwise_2023",
    "lesionwise_rows",
    "summarise_lesionwise",
]

#: Columns of ``lesionwise.csv``: the panoptica definition, then the 2023 challenge's.
LESIONWISE_COLUMNS: tuple[str, ...] = (
    "case", "region", "tp", "fp", "fn", "f1", "dice", "hd95", "nsd",
    "tp_2023", "fp_2023", "fn_2023", "dice_2023", "hd95_2023",
)  # fmt: skip

#: lesionwise.csv column -> the name of its mean over the cases in MLflow (``eval/<name>_<region>``)
#: and in ``compare --paired``.
LESION_METRIC_NAMES: dict[str, str] = {
    "dice": "lesion_dice", "hd95": "lesion_hd95", "f1": "lesion_f1", "dice_2023": "lesion_dice_2023", "hd95_2023": "lesion_hd95_2023",
}

#: Neighbourhood of panoptica's connected components: 26 (faces, edges and corners).
PANOPTICA_CONNECTIVITY = 26

#: A reference and a predicted lesion can be matched only with a Dice of at least this.
MATCH_THRESHOLD = 1e-6

#: BraTS 2023 rules per task: (dilation iterations merging reference lesions, size threshold in
#: mm³: reference lesions at or below it are dropped). GoAT was no 2023 challenge: the GLI rules.
RULES_2023: dict[str, tuple[int, int]] = {
    "GLI": (3, 50),
    "SSA": (3, 50),
    "PED": (3, 50),
    "GoAT": (3, 50),
    "MEN": (1, 50),
    "MET": (1, 2),
}

#: HD95 of a missed lesion and of each false positive in the 2023 rules, in mm.
PENALTY_2023_MM = 374.0

_FULL = ndimage.generate_binary_structure(3, 3)  # 26-connected
_DILATION = ndimage.generate_binary_structure(3, 2)  # 18-connected (the 2023 script's dilation)


def lesions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a boolean mask: (int32 label map, number of lesions)."""
    labelled, n = ndimage.label(np.asarray(mask, bool), structure=_FULL)
    return labelled.astype(np.int32, copy=False), int(n)


def _box(*masks: np.ndarray, margin: int = 2) -> tuple[slice, ...]:
    """Bounding box of the union of ``masks`` (+ ``margin``), clipped to the volume."""
    union = np.zeros(masks[0].shape, bool)
    for m in masks:
        union |= m
    idx = np.argwhere(union)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, union.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def nsd(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """Normalised surface Dice as panoptica computes it: the mean of the share of each surface's
    voxels within the tolerance (the smallest voxel side) of the other surface. The surfaces are
    those of :func:`brats_psp.metrics.hd95`; call it on the pair's box (:func:`_pair_scores`)."""
    sp, sr = surface_voxels(pred), surface_voxels(ref)
    if not sp.any() or not sr.any():
        return 0.0
    tolerance = float(min(spacing))
    to_ref = ndimage.distance_transform_edt(~sr, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return float((np.mean(to_ref[sp] <= tolerance) + np.mean(to_pred[sr] <= tolerance)) / 2.0)


def _pair_scores(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[float, float, float]:
    """(Dice, HD95, NSD) of one matched pair, computed in their bounding box."""
    box = _box(pred, ref)
    p, r = pred[box], ref[box]
    return dice(p, r), hd95(p, r, spacing), nsd(p, r, spacing)


def lesionwise_panoptica(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> dict[str, float]:
    """One region's lesion-wise metrics in the official package's definition (module docs).

    Returns:
        ``tp``, ``fp``, ``fn`` (ints), ``f1``, ``dice``, ``hd95``, ``nsd``: with lesions but
        no match, F1 0, Dice 0, NSD 0 and HD95 infinite; without any lesion, all NaN.
    """
    ref_cc, n_ref = lesions(ref)
    pred_cc, n_pred = lesions(pred)
    pairs: list[tuple[int, int]] = []
    if n_ref and n_pred:
        # Dice of every overlapping (reference, prediction) pair, from the joint histogram.
        both = (ref_cc > 0) & (pred_cc > 0)
        inter = np.zeros((n_ref + 1, n_pred + 1), np.int64)
        np.add.at(inter, (ref_cc[both], pred_cc[both]), 1)
        size_ref = np.bincount(ref_cc.ravel(), minlength=n_ref + 1)
        size_pred = np.bincount(pred_cc.ravel(), minlength=n_pred + 1)
        scores = 2.0 * inter[1:, 1:] / (size_ref[1:, None] + size_pred[None, 1:])
        rows, cols = linear_sum_assignment(scores, maximize=True)
        pairs = [(int(r) + 1, int(c) + 1) for r, c in zip(rows, cols) if scores[r, c] >= MATCH_THRESHOLD]
    tp = len(pairs)
    fp, fn = n_pred - tp, n_ref - tp
    if tp == 0:
        nan = float("nan")
        if fp + fn == 0:
            return {"tp": 0, "fp": 0, "fn": 0, "f1": nan, "dice": nan, "hd95": nan, "nsd": nan}
        return {"tp": 0, "fp": fp, "fn": fn, "f1": 0.0, "dice": 0.0, "hd95": float("inf"), "nsd": 0.0}
    per_pair = np.array([_pair_scores(pred_cc == c, ref_cc == r, spacing) for r, c in pairs])
    dsc, hd, ns = per_pair.mean(axis=0)
    return {"tp": tp, "fp": fp, "fn": fn, "f1": tp / (tp + 0.5 * (fp + fn)), "dice": float(dsc), "hd95": float(hd), "nsd": float(ns)}


def lesionwise_2023(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0), task: str = "GLI"
) -> dict[str, float]:
    """One region's lesion-wise metrics under the BraTS 2023 challenge rules (module docs).

    Returns:
        ``tp_2023``, ``fp_2023``, ``fn_2023`` (ints; TP and FN count only reference lesions
        above the task's size threshold), ``dice_2023``, ``hd95_2023``.
    """
    dilation, min_volume = RULES_2023.get(task, RULES_2023["GLI"])
    voxel_mm3 = float(np.prod(spacing))
    ref, pred = np.asarray(ref, bool), np.asarray(pred, bool)
    pred_cc, _ = lesions(pred)
    grown, _ = lesions(ndimage.binary_dilation(ref, structure=_DILATION, iterations=dilation) if ref.any() else ref)
    merged = np.where(ref, grown, 0)  # reference lesions, merged where their dilations touch
    matched: set[int] = set()
    kept: list[tuple[float, float]] = []  # (Dice, HD95) of the lesions above the size threshold
    tp = fn = 0
    for k in range(1, int(merged.max()) + 1):
        lesion = merged == k
        if not lesion.any():
            continue
        reach = ndimage.binary_dilation(lesion, structure=_DILATION, iterations=dilation)
        hits = np.unique(pred_cc[reach & (pred_cc > 0)])
        matched.update(int(h) for h in hits)
        found = np.isin(pred_cc, hits) if len(hits) else np.zeros_like(lesion)
        if int(lesion.sum()) * voxel_mm3 <= min_volume:
            continue
        if len(hits):
            tp += 1
            box = _box(found, lesion)
            kept.append((dice(found[box], lesion[box]), hd95(found[box], lesion[box], spacing)))
        else:
            fn += 1
            kept.append((0.0, PENALTY_2023_MM))
    fp = len(set(np.unique(pred_cc[pred_cc > 0]).tolist()) - matched)
    count = len(kept) + fp
    if count == 0:
        return {"tp_2023": 0, "fp_2023": 0, "fn_2023": 0, "dice_2023": 1.0, "hd95_2023": 0.0}
    return {
        "tp_2023": tp,
        "fp_2023": fp,
        "fn_2023": fn,
        "dice_2023": sum(d for d, _ in kept) / count,
        "hd95_2023": (sum(h for _, h in kept) + PENALTY_2023_MM * fp) / count,
    }


def lesionwise_rows(
    case_id: str, pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], task: str = "GLI"
) -> list[dict[str, Any]]:
    """Rows of ``lesionwise.csv`` for one case: both definitions per region.

    Args:
        pred, ref: boolean region masks (R, X, Y, Z) in ``REGION_NAMES`` order.
        spacing: voxel size in mm.
        task: the BraTS task of the case (the 2023 rules' dilation and size threshold).
    """
    rows = []
    for i, region in enumerate(REGION_NAMES):
        row: dict[str, Any] = {"case": case_id, "region": region}
        row.update(lesionwise_panoptica(pred[i], ref[i], spacing))
        row.update(lesionwise_2023(pred[i], ref[i], spacing, task))
        rows.append(row)
    return rows


def summarise_lesionwise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per region: the mean of each metric over the cases (cases with NaN left out: no lesion on
    either side; an infinite panoptica HD95, a case with lesions but no match, makes the mean
    infinite, as ``brats-parse-metrics`` reports it), and the summed counts."""
    out: dict[str, Any] = {}
    for region in REGION_NAMES:
        sel = [r for r in rows if r["region"] == region]
        if not sel:
            continue
        entry: dict[str, Any] = {"cases": len(sel)}
        for key in ("tp", "fp", "fn", "tp_2023", "fp_2023", "fn_2023"):
            entry[key] = int(sum(r[key] for r in sel))
        for key in ("f1", "dice", "hd95", "nsd", "dice_2023", "hd95_2023"):
            values = np.array([r[key] for r in sel], float)
            entry[key] = float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")
        out[region] = entry
    return out
