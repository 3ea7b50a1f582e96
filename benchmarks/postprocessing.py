"""What happens after the network: thresholds, hysteresis and postprocessing, compared on the same
probabilities, over several models, on real scans and synthetic sets at once.

    python benchmarks/postprocessing.py --model A/best.pt --model B/best.pt \\
        --real ../shared/data/real --real /tmp/real2 --synthetic v7=/tmp/eval/v7 \\
        --variant default --variant grow infer.hysteresis=0.5 --variant no-hull infer.rim_hull=false \\
        --out /tmp/postprocessing

Each model segments every case once (its own ``infer`` settings: TTA, scales, planes; a case is
read, preprocessed and its reference loaded once for all the models); the region
probabilities, back on the case's grid, are kept in memory while every ``--variant`` (a name and
``infer`` overrides that act after the network: ``region_thresholds``, ``hysteresis``,
``small_et_voxels``, ``min_component_fraction``, ``core_component_fraction``, ``fill_core``, ``rim_hull``...) turns them into
labels as ``infer`` would (:func:`~brats_psp.inference.probabilities_to_tissue` and
:func:`~brats_psp.segment.postprocess`), scored against the case's reference (a real folder's
``references/``, a synthetic case's own label). Variants differ only in these steps, so their
differences are not blurred by the seed of the network. Overrides that change the network's
pass (``infer.tta``, ``infer.scales``, ``infer.class_gate``...) are refused: use ``trials.py score`` for those.

Writes ``OUT/postprocessing.json`` (Dice per model, variant and case) and
``OUT/postprocessing.md``: per variant, mean Dice WT / TC / ET over the models, per real case and
per synthetic set (mean over its cases), and the mean over the real cases. With ``--hd95`` the
real cases' HD95 per region too (mm, :func:`~brats_psp.metrics.hd95`, as ``evaluate`` scores it),
in the JSON and in a second table. Accuracy, not speed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from brats_psp.io import voxel_size, write_json, write_text  # noqa: E402

log = logging.getLogger("postprocessing")

#: ``infer`` keys that act after the network's probabilities (the ones a variant may change).
AFTER_NETWORK = frozenset({
    "threshold", "region_thresholds", "hysteresis", "small_et_voxels", "min_component_voxels", "min_component_fraction", "core_component_fraction",
    "core_neck_mm",
    "fill_core", "rim_hull",
})


def _check_overrides(name: str, overrides: list[str]) -> None:
    for text in overrides:
        key = text.partition("=")[0]
        section, _, field = key.partition(".")
        if section != "infer" or field not in AFTER_NETWORK:
            raise SystemExit(f"variant {name}: {key} does not act after the network (allowed: infer.{', infer.'.join(sorted(AFTER_NETWORK))})")


def _canonical_spacing(zooms: tuple[float, ...], affine: np.ndarray) -> tuple[float, ...]:
    """The voxel size along the axes of :func:`_canonical`'s array (its axes may be permuted)."""
    import nibabel as nib

    out = [1.0] * 3
    for axis, (target, _) in enumerate(nib.orientations.io_orientation(affine)):
        out[int(target)] = float(zooms[axis])
    return tuple(out)


def _canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``array`` (spatial axes first) reoriented to the closest canonical (RAS) axes."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    return nib.orientations.apply_orientation(array, ornt)


def _reference(case: Any, refs: Path | None) -> Path | None:
    if refs is None:
        return case.label
    from benchmarks.real_scans import find_reference

    return find_reference(refs, case.case_id)


def score_models(
    models: list[str], folders: dict[str, tuple[Path, bool]], variants: dict[str, list[str]], with_hd95: bool = False
) -> dict[str, Any]:
    """Dice per model, variant, folder and case (and, ``with_hd95``, the real cases' HD95 in mm).
    ``folders``: name -> (folder, is_real)."""
    import nibabel as nib

    from brats_psp.checkpoint import load_model
    from brats_psp.config import apply_overrides
    from brats_psp.data.discovery import discover_cases
    from brats_psp.data.transforms import volume_transforms
    from brats_psp.errors import CaseError
    from brats_psp.inference import probabilities_to_tissue
    from brats_psp.labels import REGION_NAMES, release_to_regions, tissue_to_regions
    from brats_psp.metrics import dice, hd95
    from brats_psp.runtime import setup_runtime
    from brats_psp.segment import postprocess, predict_case, prepare_case, probabilities_on_input_grid

    loaded = {model: load_model(model) for model in models}
    cfgs = {  # apply_overrides works in place: a copy of the model's config per variant
        model: {name: apply_overrides(copy.deepcopy(m.config), overrides).infer for name, overrides in variants.items()}
        for model, m in loaded.items()
    }
    first = next(iter(loaded.values())).config.train
    runtime = setup_runtime(first.device, first.precision, 0)
    per_model: dict[str, dict[str, Any]] = {model: {name: {} for name in variants} for model in models}
    per_model_hd95: dict[str, dict[str, Any]] = {model: {name: {} for name in variants} for model in models}
    for folder_name, (folder, real) in folders.items():
        for case in discover_cases(folder).cases:
            ref_path = _reference(case, folder / "references" if real else None)
            if ref_path is None:
                continue
            ref_img = nib.load(str(ref_path))  # read once per case, for every model
            ref = release_to_regions(_canonical(np.asanyarray(ref_img.dataobj), ref_img.affine), case.labels)
            first_image = nib.load(str(case.images[0]))
            affine, zooms = first_image.affine, voxel_size(first_image)
            ref_spacing = _canonical_spacing(zooms, affine)  # the voxel size along ref's (and pred's) axes
            prepared: dict[tuple[Any, ...], Any] = {}  # preprocessed once per (spacing, percentiles), as infer does for an ensemble
            for model, m in loaded.items():
                spacing, percentiles = m.config.data.spacing, m.config.data.intensity_percentiles
                key = (tuple(spacing), tuple(percentiles) if percentiles else None)
                if key not in prepared:
                    prepared[key] = (prepare_case(case, spacing, percentiles), volume_transforms(spacing, with_label=False))
                    if isinstance(prepared[key][0], CaseError):
                        raise prepared[key][0]
                ready, chain = prepared[key]
                probs = probabilities_on_input_grid(predict_case(m, ready, m.config.infer, runtime), ready.image, chain)
                for name, cfg in cfgs[model].items():
                    tissue = postprocess(probabilities_to_tissue(probs, cfg.thresholds, cfg.low_thresholds), cfg, zooms)
                    pred = tissue_to_regions(_canonical(tissue, affine))
                    if pred.shape != ref.shape:
                        raise ValueError(f"{case.case_id}: prediction {pred.shape[1:]} and reference {ref.shape[1:]} differ in shape")
                    per_model[model][name].setdefault(folder_name, {})[case.case_id] = [round(dice(pred[r], ref[r]), 4) for r in range(len(REGION_NAMES))]
                    if with_hd95 and real:
                        per_model_hd95[model][name].setdefault(folder_name, {})[case.case_id] = [
                            round(hd95(pred[r], ref[r], ref_spacing), 2) for r in range(len(REGION_NAMES))
                        ]
                log.info("%s: %s scored", Path(model).parent.parent.name, case.case_id)
    return {
        model: {"thresholds": list(m.config.infer.thresholds), "variants": per_model[model],
                **({"hd95": per_model_hd95[model]} if with_hd95 else {}),
                "infer": {name: dataclasses.asdict(cfg) for name, cfg in cfgs[model].items()}}
        for model, m in loaded.items()
    }


def table(result: dict[str, Any], folders: dict[str, tuple[Path, bool]], key: str = "variants") -> str:
    """Markdown: a row per variant, mean Dice WT / TC / ET over the models per real case, per
    synthetic set (mean over its cases) and over all real cases; ``key="hd95"``: the same of the
    HD95 (mm), where it was computed (the real cases)."""
    fmt = " / ".join(["{:.3f}" if key == "variants" else "{:.1f}"] * 3)
    models = [{"variants": m[key]} for m in result.values() if key in m]
    variants = list(models[0]["variants"]) if models else []
    columns: list[tuple[str, str | None]] = []  # (folder, case or None for a whole set)
    for name, (_, real) in folders.items():
        cases = sorted({c for m in models for c in m["variants"][variants[0]].get(name, {})}) if variants else []
        columns += [(name, c) for c in cases] if real else [(name, None)]
    head = [c or f for f, c in columns] + ["real mean"]
    what = "Dice WT / TC / ET" if key == "variants" else "HD95 WT / TC / ET (mm)"
    lines = [f"| variant (mean of {len(models)} models), {what} | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for v in variants:
        cells, real_rows = [], []
        for folder, case in columns:
            if case is None:
                rows = [list(m["variants"][v][folder].values()) for m in models if folder in m["variants"][v]]
                values = [np.mean(r, axis=0) for r in rows if r]
            else:
                values = [m["variants"][v][folder][case] for m in models if case in m["variants"][v].get(folder, {})]
                real_rows += values
            cells.append(fmt.format(*np.mean(values, axis=0)) if values else "")
        cells.append(fmt.format(*np.mean(real_rows, axis=0)) if real_rows else "")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="checkpoint, run id or model URI (repeat)")
    ap.add_argument("--real", type=Path, action="append", default=[], help="folder of real cases with references/ (repeat)")
    ap.add_argument("--synthetic", action="append", default=[], metavar="NAME=DIR", help="a labelled set (repeat)")
    ap.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME [infer.KEY=VALUE ...]",
                    help="a variant: a name and infer overrides that act after the network (repeat)")
    ap.add_argument("--hd95", action="store_true", help="also the HD95 of every region on the real cases (mm; slower)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "postprocessing")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    variants = {v[0]: v[1:] for v in args.variant}
    for name, overrides in variants.items():
        _check_overrides(name, overrides)
    folders: dict[str, tuple[Path, bool]] = {f"real:{p.name}": (p, True) for p in args.real}
    for text in args.synthetic:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--synthetic takes NAME=DIR, got {text!r}")
        folders[name] = (Path(path), False)
    result = score_models(args.model, folders, variants, with_hd95=args.hd95)
    md = table(result, folders)
    if args.hd95:
        md += "\n" + table(result, {k: v for k, v in folders.items() if v[1]}, key="hd95")
    write_json(args.out / "postprocessing.json", {"folders": {k: str(p) for k, (p, _) in folders.items()}, "models": result})
    write_text(args.out / "postprocessing.md", md)
    print(md)
    print(f"wrote {args.out / 'postprocessing.json'} and {args.out / 'postprocessing.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
