"""How a model does on real MRI: segment every scan in a folder of real cases, score those with a reference.

    python benchmarks/real_scans.py --model outputs/<run id>/checkpoints/best.pt
    python benchmarks/real_scans.py --model <run id> --real ../shared/data/real --out benchmarks/results/real_scans infer.tta=true
    python benchmarks/real_scans.py --model <run A> --model <run B>   # an ensemble, as `infer` segments with one
    python benchmarks/real_scans.py --model M --real ../shared/data/real --real /tmp/real2   # several folders (brainles_cases.py)

``--real`` (default ``../shared/data/real``) holds case folders in any BraTS layout; a
reference segmentation of case ``<id>`` is looked for in ``--refs`` (default
``<real>/references``) as ``<id>-seg.nii.gz`` or ``<id>_seg.nii.gz``, in the case's label
convention. Cases without one are segmented and drawn, not scored. Writes to ``--out``:

* ``predictions/<id>.nii.gz`` (what ``infer`` writes);
* ``real_scans.json``: per scored case Dice, HD95 (mm) and volumes (mL) of WT, TC and ET,
  predicted and reference, the mean over scored cases, the model and the infer settings;
* ``real_scans.png``: one row per case (FLAIR, T1ce, the prediction, the reference) at the
  slice with most reference tumour (else most predicted tumour);
* ``<id>_slices.png`` for every scored case: eight axial slices evenly across the tumour's
  extent (reference or prediction), cropped to it, with T1ce, FLAIR, the prediction and the
  reference, and each slice's tumour-core sensitivity: where along the tumour a model
  loses the core (``tc_by_slice`` in the JSON holds the numbers for every slice), and
  ``by_depth``: the sensitivity of TC and ET, and the share of their reference voxels, per
  band of distance from the brain's edge (``benchmarks/depth.py``'s bands);
* ``without_contrast``: every case segmented again with its T1ce replaced by its T1, as if no
  contrast agent had been given (``--no-contrast-check`` skips it). Nothing enhances there, so
  the enhancing tumour predicted (``without_contrast`` in the JSON, in mL, beside the volumes
  predicted with T1ce) is drawn from T2/FLAIR/T1 patterns alone: a check that needs no reference.

Accuracy, not speed: nothing here is timed. Exits 0 with a message when ``--real`` is absent.
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
if str(ROOT) not in sys.path:  # run as `python benchmarks/real_scans.py` from anywhere
    sys.path.insert(0, str(ROOT))

from brats_psp.config import apply_overrides  # noqa: E402
from brats_psp.data.discovery import discover_cases  # noqa: E402
from brats_psp.io import voxel_size  # noqa: E402
from brats_psp.labels import REGION_NAMES, REGIONS, release_to_regions, release_to_tissue  # noqa: E402
from brats_psp.metrics import region_metrics  # noqa: E402
from brats_psp.checkpoint import LoadedModel  # noqa: E402
from brats_psp.segment import Models, ensemble_config, load_models, segment_cases  # noqa: E402
from benchmarks.depth import band_masks, band_names, brain_depth, count_by_depth  # noqa: E402

log = logging.getLogger("real_scans")

DEFAULT_REAL = ROOT.parent / "shared" / "data" / "real"


def present_folders(reals: list[Path]) -> list[Path]:
    """The folders of ``reals`` that exist; each absent one is named on stdout."""
    present = [r for r in reals if r.is_dir()]
    for absent in sorted(set(reals) - set(present)):
        print(f"no real scans at {absent}: nothing to do there")
    return present


def find_reference(refs: Path, case_id: str) -> Path | None:
    """The reference segmentation of ``case_id`` in ``refs``, if there is one."""
    for name in (f"{case_id}-seg.nii.gz", f"{case_id}_seg.nii.gz", f"{case_id}-seg.nii", f"{case_id}_seg.nii"):
        if (refs / name).is_file():
            return refs / name
    return None


def _ras(path: Path) -> tuple[np.ndarray, Any]:
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(path)))
    return np.asanyarray(img.dataobj), img


def score_case(pred_path: Path, ref_path: Path, release: str) -> dict[str, Any]:
    """Dice, HD95 and volumes of WT, TC, ET of one prediction against its reference (both in ``release`` labels)."""
    pred, pred_img = _ras(pred_path)
    ref, _ = _ras(ref_path)
    if pred.shape != ref.shape:
        raise ValueError(f"{pred_path.name}: prediction {pred.shape} and reference {ref.shape} differ in shape")
    spacing = voxel_size(pred_img)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    p_reg, r_reg = release_to_regions(pred, release), release_to_regions(ref, release)
    out: dict[str, Any] = {}
    for k, region in enumerate(REGION_NAMES):
        m = region_metrics(p_reg[k], r_reg[k], spacing)
        out[region] = {
            "dice": float(m["dice"]),
            "hd95": float(m["hd95"]),
            "pred_ml": float(p_reg[k].sum()) * voxel_ml,
            "ref_ml": float(r_reg[k].sum()) * voxel_ml,
        }
    return out


def plot(rows: list[dict[str, Any]], out: Path) -> Path:
    """One row per case: FLAIR, T1ce, prediction on T1ce, reference on T1ce (RAS, anterior up);
    each row's ``arrays`` are :func:`_oriented_case`'s arrays."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brats_psp.plots import save_figure, show_slice

    fig, axes = plt.subplots(len(rows), 4, figsize=(11, 3.4 * len(rows)), squeeze=False)
    for ax_row, row in zip(axes, rows):
        case = row["case"]
        image, pred, ref = row["arrays"]
        focus = ref if ref is not None and ref.any() else pred
        z = int(np.argmax((focus > 0).sum(axis=(0, 1)))) if focus.any() else image.shape[-1] // 2
        flair, t1ce = image[3, :, :, z], image[1, :, :, z]
        show_slice(ax_row[0], flair, title=f"{case.case_id}\nFLAIR, z={z}")
        show_slice(ax_row[1], t1ce, title="T1ce")
        scores = row.get("scores")
        text = "" if not scores else "\nDice " + " / ".join(f"{scores[r]['dice']:.2f}" for r in REGION_NAMES)
        show_slice(ax_row[2], t1ce, pred[:, :, z], title=f"prediction{text}")
        if ref is not None:
            show_slice(ax_row[3], t1ce, ref[:, :, z], title="reference")
        else:
            ax_row[3].axis("off")
            ax_row[3].set_title("no reference", fontsize=9)
    fig.suptitle("real scans: NCR red, ED green, ET yellow (Dice WT / TC / ET)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the suptitle above the first row's two-line titles
    return save_figure(fig, out)


def _oriented_case(row: dict[str, Any]) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray | None], tuple[float, ...]]:
    """The case's four contrasts (4, X, Y, Z), its prediction and reference tissue maps, all RAS,
    and the voxel spacing (mm) of those RAS axes."""
    import nibabel as nib

    from brats_psp.data.transforms import load_case_arrays

    case = row["case"]
    image, _, ref_img = load_case_arrays(case, with_label=False)
    ornt = nib.orientations.ornt_transform(nib.io_orientation(ref_img.affine), nib.orientations.axcodes2ornt("RAS"))
    image = np.stack([nib.orientations.apply_orientation(c, ornt) for c in image])
    pred_labels, pred_img = _ras(row["prediction"])
    pred = release_to_tissue(pred_labels, case.labels)
    ref = release_to_tissue(_ras(row["reference"])[0], case.labels) if row["reference"] else None
    return (image, pred, ref), voxel_size(pred_img)


def tc_by_slice(pred: np.ndarray, ref: np.ndarray) -> list[dict[str, int]]:
    """Per axial slice with tumour core in the prediction or the reference: its voxels in each and in both."""
    p, r = np.isin(pred, list(REGIONS["TC"])), np.isin(ref, list(REGIONS["TC"]))
    rows = []
    for z in np.flatnonzero((p | r).any(axis=(0, 1))):
        rows.append({"z": int(z), "ref": int(r[..., z].sum()), "pred": int(p[..., z].sum()), "both": int((p[..., z] & r[..., z]).sum())})
    return rows


def by_depth(image: np.ndarray, pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> dict[str, Any]:
    """Per band of distance from the brain's edge: the share of the reference's TC and ET voxels
    there and the prediction's sensitivity on them (None where a band has none)."""
    masks = [[np.isin(t, list(REGIONS[r])) for r in REGION_NAMES] for t in (pred, ref)]
    found, total = count_by_depth(masks[0], masks[1], band_masks(brain_depth(image[1], spacing)))  # image[1]: T1ce
    out: dict[str, Any] = {"bands": band_names()}
    for k, region in enumerate(("TC", "ET")):
        out[region] = {
            "sensitivity": [float(f / t) if t else None for f, t in zip(found[k], total[k])],
            "share": [float(t / total[k].sum()) if total[k].sum() else 0.0 for t in total[k]],
        }
    return out


def plot_slices(row: dict[str, Any], out: Path, n: int = 8) -> Path:
    """Columns: ``n`` axial slices evenly across the tumour's extent; rows: T1ce, FLAIR, the
    prediction and the reference on T1ce, cropped to the tumour with a 10-voxel margin (the
    row's ``arrays``, as in :func:`plot`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brats_psp.plots import save_figure, show_slice

    image, pred, ref = row["arrays"]
    tumour = (pred > 0) | (ref > 0)
    xs, ys, zs = (np.flatnonzero(tumour.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
    if not zs.size:
        zs = xs = ys = np.array([0, image.shape[-1] - 1])
    box = (slice(max(xs[0] - 10, 0), xs[-1] + 11), slice(max(ys[0] - 10, 0), ys[-1] + 11))
    core_pred, core_ref = np.isin(pred, list(REGIONS["TC"])), np.isin(ref, list(REGIONS["TC"]))
    picks = np.unique(np.linspace(zs[0], zs[-1], n).round().astype(int))
    fig, axes = plt.subplots(4, len(picks), figsize=(1.9 * len(picks), 8.4), squeeze=False)
    for col, z in enumerate(picks):
        t1ce, flair = image[1][box + (z,)], image[3][box + (z,)]
        in_ref = int(core_ref[box + (z,)].sum())
        sens = f"TC sens. {(core_pred & core_ref)[box + (z,)].sum() / in_ref:.2f}" if in_ref else "no ref. TC"
        show_slice(axes[0, col], t1ce, title=f"z={z}\nT1ce")
        show_slice(axes[1, col], flair, title="FLAIR")
        show_slice(axes[2, col], t1ce, pred[box + (z,)], title=f"prediction\n{sens}")
        show_slice(axes[3, col], t1ce, ref[box + (z,)], title="reference")
    fig.suptitle(f"{row['case'].case_id}: slices across the tumour (NCR red, ED green, ET yellow)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out)


def region_volumes(path: Path, release: str) -> dict[str, float]:
    """Predicted volume (mL) of each region of a label file."""
    labels, img = _ras(path)
    voxel_ml = float(np.prod(voxel_size(img))) / 1000.0
    regions = release_to_regions(labels, release)
    return {region: float(regions[k].sum()) * voxel_ml for k, region in enumerate(REGION_NAMES)}


def without_contrast(models: Any, cases: list[Any], out: Path, cfg: Any) -> dict[str, dict[str, float]]:
    """Segment each case (four files) with its T1ce file replaced by its T1 (symbolic links under
    ``out/input``); the region volumes (mL) predicted per case."""
    folder = out / "input"
    for case in cases:
        if len(case.images) != 4:  # one 4D file (MSD): no contrast to swap by name
            continue
        case_dir = folder / case.case_id
        case_dir.mkdir(parents=True, exist_ok=True)
        for k, image in enumerate(case.images):
            link = case_dir / image.name
            link.unlink(missing_ok=True)
            link.symlink_to((case.images[0] if k == 1 else image).resolve())  # MODALITIES order: T1, T1ce, T2, FLAIR
    if not folder.is_dir():
        return {}
    result = segment_cases(models, folder, out / "predictions", cfg, progress=False)
    labels = {c.case_id: c.labels for c in cases}
    return {cid: region_volumes(path, labels[cid]) for cid, path in result.written.items()}


def run(
    model: Models, real: Path | list[Path], refs: Path | None, out: Path, overrides: list[str], contrast_check: bool = True
) -> dict[str, Any]:
    """Segment (with one model or an ensemble: names, or models already loaded), score and draw
    every case under ``real`` (one folder, or several: each with its own ``references/``; ``refs``
    only goes with one); return (and write) the results."""
    folders = [Path(real)] if isinstance(real, (str, Path)) else [Path(r) for r in real]
    if refs is not None and len(folders) > 1:
        raise ValueError("a references folder goes with one folder of cases; with several, each one's references/ is used")
    models = load_models(model)
    names = [str(m.checkpoint) if isinstance(m, LoadedModel) else str(m) for m in (model if isinstance(model, list) else [model])]
    cfg = apply_overrides(ensemble_config(models), overrides).infer
    pred_dir = out / "predictions"
    cases, failures, per_folder = [], [], []
    for folder in folders:
        found = discover_cases(folder)
        if not found.cases:
            raise SystemExit(f"no cases found under {folder}")
        result = segment_cases(models, folder, pred_dir, cfg, progress=True)
        cases += found.cases
        failures += [str(f) for f in result.failures]
        per_folder.append((found.cases, result.written, refs or folder / "references"))
    rows, scored, predicted_ml, by_slice, depth_bands = [], {}, {}, {}, {}
    for found_cases, written, folder_refs in per_folder:
        for case in found_cases:
            pred = written.get(case.case_id)
            if pred is None:
                continue
            predicted_ml[case.case_id] = region_volumes(pred, case.labels)
            ref = find_reference(folder_refs, case.case_id)
            row: dict[str, Any] = {"case": case, "prediction": pred, "reference": ref}
            row["arrays"], spacing = _oriented_case(row)  # read once, for the numbers below and both figures
            if ref is not None:
                row["scores"] = scored[case.case_id] = score_case(pred, ref, case.labels)
                by_slice[case.case_id] = tc_by_slice(*row["arrays"][1:])
                depth_bands[case.case_id] = by_depth(*row["arrays"], spacing)
            rows.append(row)
    mean = {
        region: {key: float(np.mean([s[region][key] for s in scored.values()])) for key in ("dice", "hd95")}
        for region in REGION_NAMES
    } if scored else {}
    summary = {
        "model": names[0] if len(names) == 1 else names,
        "checkpoint": str(models[0].checkpoint) if len(models) == 1 else [str(m.checkpoint) for m in models],
        "run_id": models[0].run_id if len(models) == 1 else [m.run_id for m in models],
        "infer": dataclasses.asdict(cfg),
        "cases": [c.case_id for c in cases],
        "scored": scored,
        "mean": mean,
        "failed": failures,
        "predicted_ml": predicted_ml,
        "tc_by_slice": by_slice,
        "by_depth": depth_bands,
    }
    if contrast_check:
        summary["without_contrast"] = {}
        for k, (found_cases, _, _) in enumerate(per_folder):  # one folder at a time: each is one layout
            sub = out / "without_contrast" / (str(k) if len(per_folder) > 1 else "")
            summary["without_contrast"].update(without_contrast(models, found_cases, sub, cfg))
    out.mkdir(parents=True, exist_ok=True)
    (out / "real_scans.json").write_text(json.dumps(summary, indent=2))
    plot(rows, out / "real_scans.png")
    for row in rows:
        if row["reference"] is not None:
            plot_slices(row, out / f"{row['case'].case_id}_slices.png")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, action="append", help="checkpoint, MLflow run id or model URI; repeated: an ensemble")
    ap.add_argument("--real", type=Path, action="append", help="folder of real cases (default ../shared/data/real); repeated: all of them, each with its references/")
    ap.add_argument("--refs", type=Path, help="folder of reference segmentations (default <real>/references; with one --real only)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "real_scans")
    ap.add_argument(
        "--contrast-check", action=argparse.BooleanOptionalAction, default=True,
        help="also segment each case with T1ce replaced by T1 and report the enhancing tumour predicted without contrast (default on)",
    )
    ap.add_argument("overrides", nargs="*", help="infer overrides key=value (e.g. infer.tta=true)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    present = present_folders(args.real or [DEFAULT_REAL])
    if not present:
        return 0
    if args.refs is not None and len(present) > 1:
        ap.error("--refs goes with one --real; with several, each folder's references/ is used")
    summary = run(args.model, present, args.refs, args.out, args.overrides, args.contrast_check)
    print(f"{'case':<24} {'region':<4} {'Dice':>6} {'HD95 mm':>8} {'pred mL':>8} {'ref mL':>8}")
    for cid, scores in summary["scored"].items():
        for region in REGION_NAMES:
            s = scores[region]
            print(f"{cid:<24} {region:<4} {s['dice']:6.3f} {s['hd95']:8.1f} {s['pred_ml']:8.1f} {s['ref_ml']:8.1f}")
    for cid, volumes in summary.get("without_contrast", {}).items():
        with_t1ce = summary["predicted_ml"].get(cid, {})
        print(f"{cid:<24} without contrast (T1ce := T1): ET {volumes['ET']:.1f} mL, TC {volumes['TC']:.1f} mL "
              f"(with T1ce: ET {with_t1ce.get('ET', float('nan')):.1f}, TC {with_t1ce.get('TC', float('nan')):.1f})")
    unscored = [c for c in summary["cases"] if c not in summary["scored"]]
    if unscored:
        print(f"segmented without a reference (see the figure): {', '.join(unscored)}")
    print(f"wrote {args.out / 'real_scans.json'}, {args.out / 'real_scans.png'} and a <case>_slices.png per scored case")
    return 0


if __name__ == "__main__":
    sys.exit(main())
