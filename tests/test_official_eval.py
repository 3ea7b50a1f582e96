"""Cross-check of the evaluate stage with the official BraTS evaluation (``brats-evaluation``).

The package (optional: ``pip install brats-evaluation``, built on panoptica, 2023 labels) pins
numpy < 2.3, so it may live in another environment: set ``BRATS_EVAL_PYTHON`` to a Python
that has it. The test skips when neither this interpreter nor that one has it. It compares
whole-volume Dice on cases where both masks are non-empty (the official package returns NaN
when both are empty, and the legacy rules of the evaluate stage give 1 there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from brats_psp.evaluation import evaluate
from brats_psp.io import save_nifti
from brats_psp.labels import Tissue, tissue_to_release
from tests.conftest import BRATS_AFFINE, write_case

SCRIPT = Path(__file__).with_name("official_brats_eval.py")


def _official_python() -> str | None:
    for python in filter(None, [os.environ.get("BRATS_EVAL_PYTHON"), sys.executable]):
        probe = subprocess.run([python, "-c", "import brats_evaluation, panoptica"], capture_output=True)
        if probe.returncode == 0:
            return python
    return None


def _predictions(tissue: np.ndarray) -> dict[str, np.ndarray]:
    """Hand-made predictions of one reference, each non-empty in WT, TC and ET."""
    shifted = np.roll(tissue, 2, axis=0)
    grown = tissue.copy()
    grown[(grown == 0) & ndimage.binary_dilation(tissue > 0, iterations=1)] = Tissue.ED
    et_half = tissue.copy()
    et = np.argwhere(tissue == Tissue.ET)
    drop = et[et[:, 2] < np.median(et[:, 2])]
    et_half[tuple(drop.T)] = Tissue.NCR  # half the enhancing rim called necrosis
    return {"perfect": tissue, "shifted": shifted, "grown": grown, "et_half": et_half}


def test_dice_equals_the_official_brats_evaluation(tmp_path: Path) -> None:
    python = _official_python()
    if python is None:
        pytest.skip("the optional brats-evaluation package is not installed (set BRATS_EVAL_PYTHON to a Python that has it)")
    ref_root, pred_dir = tmp_path / "ref", tmp_path / "pred"
    tissue = write_case(ref_root, "brats2023", "BraTS-GLI-00000-000")["tissue"]
    pairs = []
    for i, (name, pred) in enumerate(_predictions(tissue).items()):
        case_id = f"BraTS-GLI-{i:05d}-000"
        if i:
            write_case(ref_root, "brats2023", case_id)  # the same reference under another id
        path = pred_dir / f"{case_id}.nii.gz"
        save_nifti(path, tissue_to_release(pred, "brats2023"), BRATS_AFFINE, dtype=np.uint8)
        pairs += [str(path), str(ref_root / case_id / f"{case_id}-seg.nii.gz")]
    ours = evaluate(pred_dir, ref_root, tmp_path / "metrics").rows
    proc = subprocess.run([python, str(SCRIPT), *pairs], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    official = json.loads(proc.stdout.strip().splitlines()[-1])
    for i, scores in enumerate(official):
        case_id = f"BraTS-GLI-{i:05d}-000"
        for region in ("WT", "TC", "ET"):
            (row,) = [r for r in ours if r["case"] == case_id and r["region"] == region]
            assert row["dice"] == pytest.approx(scores[region.lower()], abs=1e-6), (case_id, region)
    assert min(r["dice"] for r in ours) < 0.9  # the check covers imperfect predictions, not only perfect ones
