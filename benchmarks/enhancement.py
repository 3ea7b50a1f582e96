"""How bright must an enhancing wall be for a model to see it: real cases segmented again with their T1ce scaled inside the reference's enhancing tumour.

    python benchmarks/enhancement.py --model outputs/<run id>/checkpoints/best.pt
    python benchmarks/enhancement.py --model M --real ../shared/data/real --real /tmp/real2 --factors 0.9 1.0 1.15 1.3 1.5

For every case with a reference (found as ``real_scans.py`` finds it, in ``<real>/references``;
a case stored as one 4D file is skipped), the T1ce voxels inside the reference's enhancing
tumour are multiplied by each factor; the rest of T1ce and the other three contrasts are the
scan's own (symbolic links). Each version is segmented as ``infer`` segments (``infer.*``
overrides as arguments) and scored against the reference: Dice of WT, TC and ET, and the share
of the reference's TC and ET found (sensitivity). Factor 1 is the scan as it is.

It tells what a model asks of enhancement: a model that finds a glioma's core only once its
wall is made 1.3 times brighter misses it for want of contrast, not for what lies around it
(docs/experiments.md, "Round of 2026-12-07"). Writes to ``--out``: ``enhancement.json`` (per
case and factor) and ``enhancement.png`` (TC and ET Dice and sensitivity against the factor,
a line per case). Accuracy, not speed. Exits 0 with a message when ``--real`` is absent.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/enhancement.py` from anywhere
    sys.path.insert(0, str(ROOT))

from brats_psp.config import apply_overrides  # noqa: E402
from brats_psp.data.discovery import Case, discover_cases  # noqa: E402
from brats_psp.io import atomic_path, write_json  # noqa: E402
from brats_psp.labels import REGION_NAMES, release_to_regions  # noqa: E402
from brats_psp.metrics import dice, sensitivity  # noqa: E402
from brats_psp.segment import ensemble_config, load_models, segment_cases  # noqa: E402
from benchmarks.real_scans import DEFAULT_REAL, find_reference, present_folders  # noqa: E402

log = logging.getLogger("enhancement")

DEFAULT_FACTORS = (1.0, 1.15, 1.3, 1.5)
T1CE = 1  # index of T1ce in a case's images (MODALITIES order: T1, T1ce, T2, FLAIR)
ET = REGION_NAMES.index("ET")


def scale_inside(data: np.ndarray, mask: np.ndarray, factor: float) -> np.ndarray:
    """``data`` with the voxels of ``mask`` multiplied by ``factor``, in ``data``'s dtype
    (integers rounded and clipped to the dtype's range); the other voxels unchanged."""
    out = data.copy()
    scaled = data[mask].astype(np.float64) * factor
    if np.issubdtype(data.dtype, np.integer):
        info = np.iinfo(data.dtype)
        scaled = np.clip(np.rint(scaled), info.min, info.max)
    out[mask] = scaled.astype(data.dtype)
    return out


def reference_regions(case: Case, reference: Path) -> np.ndarray:
    """The reference's WT, TC and ET masks (bool R x ..., the reference's voxel grid), checked to
    lie on the grid of the case's T1ce (same shape and affine)."""
    import nibabel as nib

    ref, t1ce = nib.load(str(reference)), nib.load(str(case.images[T1CE]))
    if ref.shape != t1ce.shape or not np.allclose(ref.affine, t1ce.affine, atol=1e-3):
        raise ValueError(
            f"{case.case_id}: reference {reference.name} {ref.shape} is not on the grid of {case.images[T1CE].name} {t1ce.shape}"
        )
    labels = np.asanyarray(ref.dataobj)
    return release_to_regions(labels, case.labels).astype(bool)


def write_scaled_case(case: Case, et: np.ndarray, factor: float, folder: Path) -> Path:
    """``folder/<case id>/``: the case's T1ce scaled by ``factor`` inside ``et`` (same file name,
    header and affine) and links to its other three contrasts."""
    import nibabel as nib

    case_dir = folder / case.case_id
    case_dir.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(case.images):
        target = case_dir / image.name
        target.unlink(missing_ok=True)
        if k != T1CE or factor == 1.0:
            target.symlink_to(image.resolve())
            continue
        img = nib.load(str(image))
        data = np.asanyarray(img.dataobj)
        with atomic_path(target) as tmp:
            nib.save(nib.Nifti1Image(scale_inside(data, et, factor), img.affine, img.header), str(tmp))
    return case_dir


def score(pred_path: Path, ref: np.ndarray, release: str) -> dict[str, dict[str, float]]:
    """Dice and sensitivity of WT, TC and ET against ``ref`` (:func:`reference_regions`; no
    reorientation: ``infer`` writes in the input's geometry)."""
    import nibabel as nib

    pred = release_to_regions(np.asanyarray(nib.load(str(pred_path)).dataobj), release)
    return {
        region: {"dice": float(dice(pred[k], ref[k])), "sensitivity": float(sensitivity(pred[k], ref[k]))}
        for k, region in enumerate(REGION_NAMES)
    }


def plot(result: dict[str, Any], out: Path) -> Path:
    """Two panels per region (TC, ET): Dice and sensitivity against the factor, a line per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brats_psp.plots import save_figure

    factors = result["factors"]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4), squeeze=False)
    panels = [(r, key) for r in ("TC", "ET") for key in ("dice", "sensitivity")]
    for ax, (region, key) in zip(axes[0], panels):
        for cid, per_factor in result["cases"].items():
            ax.plot(factors, [per_factor[str(f)][region][key] for f in factors], marker="o", label=cid)
        ax.set_title(f"{region} {key}")
        ax.set_xlabel("T1ce x factor inside the reference's ET")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"how much enhancement the model needs: {Path(str(result['model'])).name}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out)


def run(model: str | list[str], reals: list[Path], factors: list[float], out: Path, overrides: list[str]) -> dict[str, Any]:
    """Segment and score every case with a reference under ``reals`` at every factor; write
    ``enhancement.json`` and ``enhancement.png`` to ``out`` and return the results."""
    models = load_models(model)
    cfg = apply_overrides(ensemble_config(models), overrides).infer
    cases: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for k, folder in enumerate(reals):
        found = discover_cases(folder)
        todo = []
        for case in found.cases:
            ref = find_reference(folder / "references", case.case_id)
            if ref is None:
                continue
            if len(case.images) != 4:
                skipped[case.case_id] = "one 4D file: no T1ce file to scale"
                continue
            try:
                regions = reference_regions(case, ref)
            except ValueError as err:
                skipped[case.case_id] = str(err)
                log.warning("%s", err)
                continue
            if not regions[ET].any():
                skipped[case.case_id] = "no enhancing tumour in the reference: nothing to scale"
                continue
            todo.append((case, regions))
        for factor in factors:
            tag = f"{k}/x{factor:g}"
            for case, regions in todo:
                write_scaled_case(case, regions[ET], factor, out / "input" / tag)
            if not todo:
                continue
            result = segment_cases(models, out / "input" / tag, out / "predictions" / tag, cfg, progress=False)
            for case, regions in todo:
                pred = result.written.get(case.case_id)
                if pred is None:
                    skipped[case.case_id] = f"not segmented at x{factor:g}"
                    continue
                entry = cases.setdefault(case.case_id, {"et_voxels": int(regions[ET].sum())})
                entry[str(factor)] = score(pred, regions, case.labels)
                log.info("%s x%g: TC %.3f ET %.3f", case.case_id, factor, entry[str(factor)]["TC"]["dice"], entry[str(factor)]["ET"]["dice"])
    cases = {cid: c for cid, c in cases.items() if all(str(f) in c for f in factors)}
    summary = {
        "model": model if isinstance(model, str) or len(model) > 1 else model[0],
        "checkpoint": str(models[0].checkpoint) if len(models) == 1 else [str(m.checkpoint) for m in models],
        "infer": dataclasses.asdict(cfg),
        "factors": factors,
        "cases": cases,
        "skipped": skipped,
    }
    write_json(out / "enhancement.json", summary)
    if cases:
        plot(summary, out / "enhancement.png")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, action="append", help="checkpoint, MLflow run id or model URI; repeated: an ensemble")
    ap.add_argument("--real", type=Path, action="append", help="folder of real cases with references/ (default ../shared/data/real); repeat")
    ap.add_argument("--factors", type=float, nargs="+", default=list(DEFAULT_FACTORS), help="T1ce factors inside the reference's ET")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "enhancement")
    ap.add_argument("overrides", nargs="*", help="infer overrides key=value (e.g. infer.tta=false)")
    args = ap.parse_args(argv)
    if any(f <= 0 for f in args.factors):
        ap.error(f"--factors must be positive, got {args.factors}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    present = present_folders(args.real or [DEFAULT_REAL])
    if not present:
        return 0
    summary = run(args.model, present, sorted(set(args.factors)), args.out, args.overrides)
    print(f"{'case':<26} {'factor':>6} {'TC Dice':>8} {'TC sens':>8} {'ET Dice':>8} {'ET sens':>8}")
    for cid, per_factor in summary["cases"].items():
        for f in summary["factors"]:
            s = per_factor[str(f)]
            print(f"{cid:<26} {f:6.2f} {s['TC']['dice']:8.3f} {s['TC']['sensitivity']:8.3f} {s['ET']['dice']:8.3f} {s['ET']['sensitivity']:8.3f}")
    for cid, why in summary["skipped"].items():
        print(f"skipped {cid}: {why}")
    print(f"wrote {args.out / 'enhancement.json'}" + (f" and {args.out / 'enhancement.png'}" if summary["cases"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
