"""Where in the brain a model misses tumour: sensitivity by distance from the brain's surface.

    python benchmarks/depth.py --pred /tmp/real/predictions --cases ../shared/data/real --refs ../shared/data/real/references
    python benchmarks/depth.py --pred /tmp/pred/v7 --cases /tmp/eval/v7

For every reference voxel of TC and ET, its distance (mm) to the edge of the brain (the non-zero
voxels of T1ce); per distance band, the share of those voxels the prediction has, and the share
of the region's voxels in the band, pooled over the cases. Then how the reference's tumour looks
per band: the median of the enhancing tumour on T1ce and of the edema (WT without TC) on FLAIR,
relative to the case's normal white matter (the brightest 30 % on T1 of the brain outside the
tumour), and how heterogeneous each case's edema is on T2 and FLAIR (its interquartile range over
its median). ``--refs``: a folder of reference label files (``<id>-seg.nii.gz``), else each case's
own label. Predictions are ``<pred>/<id>.nii.gz``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from brats_psp.data.discovery import discover_cases, label_files  # noqa: E402
from brats_psp.data.layouts import MODALITIES  # noqa: E402
from brats_psp.io import voxel_size  # noqa: E402
from brats_psp.labels import REGION_NAMES, release_to_regions  # noqa: E402

BANDS = (0, 5, 10, 15, 20, 30, 1000)


def band_names() -> list[str]:
    """The distance bands' names: ``0-5 mm`` ... ``>= 30 mm``."""
    return [f"{BANDS[b]}-{BANDS[b + 1]} mm" if BANDS[b + 1] < 1000 else f">= {BANDS[b]} mm" for b in range(len(BANDS) - 1)]


def band_masks(depth: np.ndarray) -> list[np.ndarray]:
    """One boolean mask per band of ``depth`` (each voxel's distance, mm, to the brain's edge)."""
    return [(depth >= BANDS[b]) & (depth < BANDS[b + 1]) for b in range(len(BANDS) - 1)]


def count_by_depth(pred: np.ndarray, ref: np.ndarray, bands: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Reference voxels of TC and ET per distance band (``total``, 2 x bands) and those the
    prediction has (``found``); ``pred`` and ``ref`` are region masks (WT, TC, ET first),
    ``bands`` :func:`band_masks`'s."""
    found = np.zeros((2, len(bands)))
    total = np.zeros((2, len(bands)))
    for b, in_band in enumerate(bands):
        for k, r in enumerate((REGION_NAMES.index("TC"), REGION_NAMES.index("ET"))):
            band = ref[r] & in_band
            total[k, b] += band.sum()
            found[k, b] += (band & pred[r]).sum()
    return found, total


def brain_depth(t1ce: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distance (mm) of every voxel to the edge of the brain (the non-zero voxels of T1ce)."""
    return ndimage.distance_transform_edt(t1ce > 0, sampling=spacing)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pred", type=Path, required=True)
    ap.add_argument("--cases", type=Path, required=True)
    ap.add_argument("--refs", type=Path)
    args = ap.parse_args(argv)
    refs = label_files(args.refs) if args.refs else None
    found = np.zeros((2, len(BANDS) - 1))
    total = np.zeros((2, len(BANDS) - 1))
    looks: dict[str, list[list[np.ndarray]]] = {name: [[] for _ in BANDS[1:]] for name in ("ET on T1ce", "edema on FLAIR")}
    spread: dict[str, list[float]] = {"t2": [], "flair": []}  # per case: the edema's IQR / median
    for case in discover_cases(args.cases).cases:
        label = refs[case.case_id][0] if refs and case.case_id in refs else case.label
        pred_path = args.pred / f"{case.case_id}.nii.gz"
        if label is None or not pred_path.is_file():
            continue
        loaded = {m: nib.load(str(case.images[MODALITIES.index(m)])) for m in ("t1", "t1ce", "t2", "flair")}
        images = {m: np.asarray(img.dataobj, dtype=np.float32) for m, img in loaded.items()}
        depth = brain_depth(images["t1ce"], voxel_size(loaded["t1ce"]))
        ref = release_to_regions(np.asarray(nib.load(str(label)).dataobj), case.labels)
        pred = release_to_regions(np.asarray(nib.load(str(pred_path)).dataobj), case.labels)
        bands = band_masks(depth)
        case_found, case_total = count_by_depth(pred, ref, bands)
        found += case_found
        total += case_total
        # How the reference tumour looks per band, relative to normal white matter.
        wt, tc, et = (ref[REGION_NAMES.index(name)] for name in ("WT", "TC", "ET"))
        edema = wt & ~tc
        healthy = (depth > 0) & ~wt
        wm = healthy & (images["t1"] > np.percentile(images["t1"][healthy], 70))
        for name, modality, part in (("ET on T1ce", "t1ce", et), ("edema on FLAIR", "flair", edema)):
            scale = np.median(images[modality][wm])
            for b, in_band in enumerate(bands):
                looks[name][b].append(images[modality][part & in_band] / scale)
        if edema.sum() >= 100:
            for modality, values in spread.items():
                q1, q2, q3 = np.percentile(images[modality][edema], (25, 50, 75))
                values.append(float((q3 - q1) / q2))
    labels = band_names()
    print(f"{'':<22}" + "".join(f"{x:>11}" for x in labels))
    for k, name in enumerate(("TC", "ET")):
        share = total[k] / max(1.0, total[k].sum())
        sens = np.divide(found[k], total[k], out=np.full_like(found[k], np.nan), where=total[k] > 0)
        print(f"{name + ' sensitivity':<22}" + "".join(f"{v:>11.2f}" for v in sens))
        print(f"{name + ' share of voxels':<22}" + "".join(f"{v:>11.2f}" for v in share))
    print("median, x white matter:")
    for name, per_band in looks.items():
        values = [np.concatenate(v) if v else np.zeros(0) for v in per_band]
        print(f"{name:<22}" + "".join(f"{np.median(v):>11.2f}" if v.size else f"{'-':>11}" for v in values))
    for modality, values in spread.items():
        if values:
            print(f"edema IQR / median on {modality}, per case: median {np.median(values):.2f}, range {min(values):.2f}-{max(values):.2f} ({len(values)} case(s))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
