"""Tissue contrasts of cases with a reference: real scans beside synthetic ones, measured the same way.

    python benchmarks/tissue_contrasts.py --cases real=../shared/data/real --cases real=/tmp/real2 \\
        --cases synthetic=/tmp/eval/v7 --out benchmarks/results/tissue_contrasts

Before changing what the generator draws (``brats_psp/data/synthetic/appearance.py``), check
whether real scans fall outside what it draws. The generator's ranges are the intensities of
pure tissue before blur and partial volume; a real scan only shows medians over labelled
regions, blurred and mixed at their edges. So both are measured with one statistic here, and
compared with each other, never with the generator's constants.

Per case and contrast, relative to white matter's median:

* ``csf``, ``gm``, ``wm``: the normal-appearing brain (at least ``--margin-mm`` from the
  reference's whole tumour and ``--inset-mm`` inside the brain's edge), split into three classes
  by k-means on T1 (dark to bright: CSF, grey matter, white matter); medians of each class;
* ``ncr``, ``ed``, ``et``: the medians of the reference's necrosis / non-enhancing core, edema
  and enhancing tumour (absent parts are left out).

Each ``--cases NAME=DIR`` holds case folders in any BraTS layout with labels, or (as
``real_scans.py`` takes them) a ``references/`` folder of ``<id>_seg.nii.gz`` / ``<id>-seg.nii.gz``;
cases without a reference are skipped. Writes ``tissue_contrasts.json`` (per case, and per group
the minimum and maximum of each ratio) and ``tissue_contrasts.png`` (one panel per contrast, a
point per case and tissue, coloured by group). Exits 0 with a message when no folder is present.
Measures images, not speed: nothing is timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/tissue_contrasts.py` from anywhere
    sys.path.insert(0, str(ROOT))

from brats_psp.data.discovery import discover_cases  # noqa: E402
from brats_psp.data.layouts import MODALITIES  # noqa: E402
from brats_psp.errors import CaseError  # noqa: E402
from brats_psp.io import atomic_path, voxel_size, write_json  # noqa: E402
from brats_psp.labels import Tissue  # noqa: E402
from benchmarks.real_scans import find_reference  # noqa: E402

log = logging.getLogger("tissue_contrasts")

#: The tissues measured, in the order of the figure.
TISSUES = ("csf", "gm", "wm", "ed", "ncr", "et")
_LESION = {"ed": (Tissue.ED,), "ncr": (Tissue.NCR,), "et": (Tissue.ET,)}


def normal_brain_classes(t1: np.ndarray, inside: np.ndarray, iterations: int = 50) -> np.ndarray:
    """Labels 0 (CSF), 1 (grey), 2 (white matter) of the ``inside`` voxels of ``t1``: 1D k-means,
    started at the 10th, 50th and 90th percentiles, centres sorted dark to bright."""
    values = t1[inside].astype(np.float64)
    centres = np.percentile(values, [10.0, 50.0, 90.0])
    labels = np.zeros(values.shape, np.int64)
    for _ in range(iterations):
        labels = np.argmin(np.abs(values[:, None] - centres[None, :]), axis=1)
        new = np.array([values[labels == k].mean() if (labels == k).any() else centres[k] for k in range(3)])
        if np.allclose(new, centres):
            break
        centres = new
    order = np.argsort(centres)  # keep dark-to-bright whatever the start
    return np.argsort(order)[labels]


def case_contrasts(
    image: np.ndarray, tissue: np.ndarray, spacing: tuple[float, ...], margin_mm: float = 15.0, inset_mm: float = 5.0
) -> dict[str, dict[str, float]]:
    """Median intensity of each tissue per contrast, relative to white matter's (see the module docstring).

    Args:
        image: (4, X, Y, Z) in ``MODALITIES`` order, 0 outside the brain.
        tissue: (X, Y, Z) tissue codes of the reference (:class:`brats_psp.labels.Tissue`).
        spacing: voxel size in mm of the three axes.

    Raises:
        ValueError: too little normal-appearing brain to measure (a tumour filling the brain).
    """
    from scipy import ndimage as ndi

    brain = (image != 0).any(0)
    tumour = tissue > 0
    margin = ndi.distance_transform_edt(~tumour, sampling=spacing) if tumour.any() else np.full(tumour.shape, np.inf)
    depth = ndi.distance_transform_edt(brain, sampling=spacing)
    normal = brain & (margin >= margin_mm) & (depth >= inset_mm)
    if normal.sum() < 1000:
        raise ValueError(f"only {int(normal.sum())} voxel(s) of normal-appearing brain (< 1000) at {margin_mm} mm from the tumour")
    classes = normal_brain_classes(image[0], normal)
    out: dict[str, dict[str, float]] = {}
    for channel, modality in enumerate(MODALITIES):
        values = image[channel][normal]
        medians = {name: float(np.median(values[classes == k])) for k, name in enumerate(("csf", "gm", "wm"))}
        for name, codes in _LESION.items():
            part = np.isin(tissue, codes) & brain
            if part.any():
                medians[name] = float(np.median(image[channel][part]))
        wm = medians["wm"]
        out[modality] = {name: round(value / wm, 4) for name, value in medians.items()} if wm > 0 else {}
    return out


def measure(groups: list[tuple[str, Path]], margin_mm: float = 15.0, inset_mm: float = 5.0) -> dict[str, Any]:
    """Measure every case with a reference in each ``(group name, folder)``; a bad case is logged and skipped."""
    from brats_psp.data.transforms import load_case_arrays

    cases: list[dict[str, Any]] = []
    failures: list[str] = []
    for group, folder in groups:
        for case in discover_cases(folder).cases:
            if case.label is None:
                ref = find_reference(folder / "references", case.case_id)
                if ref is None:
                    continue
                case = dataclasses.replace(case, label=ref)
            try:
                image, tissue, ref_img = load_case_arrays(case)
                spacing = voxel_size(ref_img)
                ratios = case_contrasts(image, tissue, spacing, margin_mm, inset_mm)
            except (CaseError, ValueError) as err:
                failures.append(f"{case.case_id}: {err}")
                log.warning("%s: %s", case.case_id, err)
                continue
            cases.append({"group": group, "case": case.case_id, "ratios": ratios})
    ranges: dict[str, dict[str, dict[str, list[float]]]] = {}
    for row in cases:
        for modality, ratios in row["ratios"].items():
            for name, value in ratios.items():
                lo_hi = ranges.setdefault(row["group"], {}).setdefault(modality, {}).setdefault(name, [value, value])
                lo_hi[0], lo_hi[1] = min(lo_hi[0], value), max(lo_hi[1], value)
    return {"margin_mm": margin_mm, "inset_mm": inset_mm, "cases": cases, "ranges": ranges, "failed": failures}


def plot(result: dict[str, Any], out: Path) -> Path:
    """One panel per contrast: each case's ratio per tissue, a colour per group, jittered sideways."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({row["group"] for row in result["cases"]})
    colours = {g: plt.get_cmap("tab10")(k) for k, g in enumerate(groups)}
    fig, axes = plt.subplots(1, len(MODALITIES), figsize=(4.2 * len(MODALITIES), 3.8), sharey=False)
    for ax, modality in zip(axes, MODALITIES):
        for k, group in enumerate(groups):
            offset = (k - (len(groups) - 1) / 2) * 0.18
            for row in (r for r in result["cases"] if r["group"] == group):
                ratios = row["ratios"].get(modality, {})
                xs = [i + offset for i, t in enumerate(TISSUES) if t in ratios]
                ys = [ratios[t] for t in TISSUES if t in ratios]
                ax.scatter(xs, ys, s=14, color=colours[group], alpha=0.8, label=group)
        ax.axhline(1.0, color="0.7", lw=0.8)
        ax.set_xticks(range(len(TISSUES)), TISSUES)
        ax.set_title(f"{modality}: median / white matter")
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    fig.legend(unique.values(), unique.keys(), loc="upper center", ncol=max(len(unique), 1), bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 0.9))
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", action="append", required=True, metavar="NAME=DIR", help="a group of cases with references (repeat; one NAME may take several folders)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tissue_contrasts")
    ap.add_argument("--margin-mm", type=float, default=15.0, help="normal-appearing brain: at least this far from the whole tumour")
    ap.add_argument("--inset-mm", type=float, default=5.0, help="... and this far inside the brain's edge")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    groups = []
    for text in args.cases:
        name, sep, folder = text.partition("=")
        if not sep or not name:
            ap.error(f"--cases takes NAME=DIR, got {text!r}")
        if not Path(folder).is_dir():
            print(f"no cases at {folder}: left out")
            continue
        groups.append((name, Path(folder)))
    if not groups:
        return 0
    result = measure(groups, args.margin_mm, args.inset_mm)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "tissue_contrasts.json", result)
    plot(result, args.out / "tissue_contrasts.png")
    for group, by_modality in result["ranges"].items():
        for modality in MODALITIES:
            cells = "  ".join(f"{t} {lo:.2f}-{hi:.2f}" for t in TISSUES if (lo_hi := by_modality.get(modality, {}).get(t)) for lo, hi in [lo_hi])
            print(f"{group:<10} {modality:<6} {cells}")
    print(f"{len(result['cases'])} case(s) measured; wrote {args.out / 'tissue_contrasts.json'} and {args.out / 'tissue_contrasts.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
