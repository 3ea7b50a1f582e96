"""The real-scan check (benchmarks/real_scans.py) runs on the scans in ../shared/data/real.

Skipped where ../shared is absent (a fresh clone elsewhere). The model is an untrained
smoke-sized network: this checks the plumbing (segment, score against the reference, draw),
not accuracy; the accuracy of the default model is in the README, from the same script.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from brats_psp.checkpoint import save_checkpoint
from brats_psp.config import config_to_dict, load_config
from brats_psp.data.transforms import preprocessing_params
from brats_psp.networks import build_network
from tests.conftest import REAL_CASE, REPO

REAL = REAL_CASE.parent
REFERENCE = REAL / "references" / f"{REAL_CASE.name}-seg.nii.gz"

pytestmark = pytest.mark.skipif(not REFERENCE.is_file(), reason="shared/data/real is not present")


def _untrained_checkpoint(folder: Path) -> Path:
    cfg = load_config(REPO / "configs" / "smoke.yaml", ["data.spacing=[3.0,3.0,3.0]", "infer.roi_size=[96,96]"])
    torch.manual_seed(0)
    model = build_network(cfg.model, cfg.data.in_channels)
    path = folder / "model.pt"
    save_checkpoint(
        path,
        {"model": model.state_dict(), "config": config_to_dict(cfg), "preprocessing": preprocessing_params(cfg.data.spacing), "run_id": None},
    )
    return path


def test_real_scan_check_segments_scores_and_draws(tmp_path: Path) -> None:
    model = _untrained_checkpoint(tmp_path)
    out = tmp_path / "real"
    proc = subprocess.run(
        [sys.executable, "benchmarks/real_scans.py", "--model", str(model), "--real", str(REAL), "--out", str(out),
         "--no-contrast-check", "infer.min_component_fraction=0.1"],  # the check itself: tests/test_benchmarks.py, on a small case
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((out / "real_scans.json").read_text())
    cases = sorted(p.name for p in REAL.iterdir() if p.is_dir() and p.name != "references")
    assert sorted(result["cases"]) == cases  # every real scan is segmented ...
    for cid in cases:
        pred = nib.load(out / "predictions" / f"{cid}.nii.gz")
        assert pred.shape == nib.load(next((REAL / cid).glob("*t1n.nii.gz"))).shape
    assert list(result["scored"]) == [REAL_CASE.name]  # ... and the one with a reference is scored
    assert result["infer"]["min_component_fraction"] == 0.1  # the override reached inference
    ref = np.asarray(nib.load(REFERENCE).dataobj)
    scores = result["scored"][REAL_CASE.name]
    # Reference volumes in the BraTS 2023 convention: WT = 1|2|3, TC = 1|3, ET = 3 (1 mm voxels).
    for region, labels in (("WT", [1, 2, 3]), ("TC", [1, 3]), ("ET", [3])):
        assert scores[region]["ref_ml"] == pytest.approx(np.isin(ref, labels).sum() / 1000.0)
        assert 0.0 <= scores[region]["dice"] <= 1.0 and scores[region]["hd95"] >= 0.0
    assert result["mean"]["WT"]["dice"] == scores["WT"]["dice"]
    assert (out / "real_scans.png").stat().st_size > 10_000
    # the slices across the tumour: a figure, and every slice with reference core counted
    assert (out / f"{REAL_CASE.name}_slices.png").stat().st_size > 10_000
    by_slice = result["tc_by_slice"][REAL_CASE.name]
    assert sum(s["ref"] for s in by_slice) == np.isin(ref, [1, 3]).sum()
    assert all(s["both"] <= min(s["ref"], s["pred"]) for s in by_slice)
    # by distance from the brain's edge: a fifth of this glioma's core lies within 10 mm of it
    depth = result["by_depth"][REAL_CASE.name]
    assert sum(depth["TC"]["share"]) == pytest.approx(1.0)
    assert 0.1 < sum(depth["TC"]["share"][:2]) < 0.3
    assert "segmented without a reference" in proc.stdout


def test_real_scan_check_without_the_folder_says_so(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "benchmarks/real_scans.py", "--model", "unused.pt", "--real", str(tmp_path / "absent")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0 and "no real scans" in proc.stdout
