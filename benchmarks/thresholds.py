"""Mean Dice per region as the probability threshold changes: is 0.5 the right cut for a model?

    python benchmarks/thresholds.py --model outputs/<run id>/checkpoints/best.pt --cases /tmp/eval/v7

Segments every labelled case under ``--cases`` with ``infer`` (its settings from the model,
probabilities saved), then thresholds the probabilities on the input's grid at each value of
``--grid`` and prints the mean Dice over the cases per region (no postprocessing), and the
model's own thresholds (``infer.region_thresholds`` of a calibrated model). Writes
``--out/thresholds.json``. Accuracy, not speed: nothing is timed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from brats_psp.checkpoint import load_model  # noqa: E402
from brats_psp.config import apply_overrides  # noqa: E402
from brats_psp.data.discovery import discover_cases  # noqa: E402
from brats_psp.labels import REGION_NAMES, release_to_regions  # noqa: E402
from brats_psp.metrics import dice  # noqa: E402
from brats_psp.segment import segment_cases  # noqa: E402

GRID = (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)


def sweep(model: str, cases: Path, grid: tuple[float, ...], overrides: list[str]) -> dict:
    loaded = load_model(model)
    cfg = apply_overrides(loaded.config, ["infer.save_probabilities=true", *overrides])
    scores = np.zeros((len(REGION_NAMES), len(grid)))
    labelled = [c for c in discover_cases(cases).cases if c.label is not None]
    with tempfile.TemporaryDirectory() as tmp:
        segment_cases(loaded, cases, tmp, cfg.infer)
        for case in labelled:
            probs = np.asarray(nib.load(str(Path(tmp) / f"{case.case_id}_probabilities.nii.gz")).dataobj)  # X, Y, Z, 3
            ref = release_to_regions(np.asarray(nib.load(str(case.label)).dataobj), case.labels)
            for r in range(len(REGION_NAMES)):
                scores[r] += [dice(probs[..., r] > t, ref[r]) for t in grid]
    scores /= max(1, len(labelled))
    return {
        "model": model, "cases": str(cases), "n": len(labelled), "grid": list(grid),
        "dice": {name: scores[r].round(4).tolist() for r, name in enumerate(REGION_NAMES)},
        "model_thresholds": list(loaded.config.infer.thresholds),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint, MLflow run id or model URI")
    ap.add_argument("--cases", type=Path, required=True, help="labelled cases (any layout)")
    ap.add_argument("--grid", type=float, nargs="+", default=list(GRID))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("overrides", nargs="*", help="infer overrides key=value")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = sweep(args.model, args.cases, tuple(args.grid), args.overrides)
    print(f"{result['n']} cases; the model's thresholds (WT, TC, ET): {result['model_thresholds']}")
    print(f"{'threshold':<10}" + "".join(f"{t:>7.2f}" for t in result["grid"]))
    for name, row in result["dice"].items():
        print(f"{name:<10}" + "".join(f"{d:>7.3f}" for d in row))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "thresholds.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
