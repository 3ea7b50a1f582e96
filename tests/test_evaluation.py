"""Evaluate's numbers on hand-made volumes, and HD95 against an independent implementation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial import cKDTree

from brats_psp.evaluation import evaluate
from brats_psp.io import save_nifti
from brats_psp.labels import Tissue, tissue_to_release
from brats_psp.metrics import EMPTY_HD95_MM, dice, hd95
from tests.conftest import BRATS_AFFINE

SHAPE = (40, 40, 30)


def _tumour(shift: int = 0, et: bool = True) -> np.ndarray:
    t = np.zeros(SHAPE, np.uint8)
    t[10 + shift : 30 + shift, 10:30, 8:22] = Tissue.ED
    t[14 + shift : 26 + shift, 14:26, 11:19] = Tissue.NCR
    if et:
        t[16 + shift : 24 + shift, 16:24, 12:18] = Tissue.ET
    return t


def _write(root: Path, case_id: str, ref: np.ndarray, pred: np.ndarray | None, pred_dir: Path) -> None:
    folder = root / case_id
    for m in ("t1", "t1ce", "t2", "flair"):
        save_nifti(folder / f"{case_id}_{m}.nii.gz", np.ones(SHAPE, np.int16), BRATS_AFFINE)
    save_nifti(folder / f"{case_id}_seg.nii.gz", tissue_to_release(ref, "brats2021"), BRATS_AFFINE, dtype=np.uint8)
    if pred is not None:
        save_nifti(pred_dir / f"{case_id}.nii.gz", tissue_to_release(pred, "brats2021"), BRATS_AFFINE, dtype=np.uint8)


def _surface_points(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it, found by explicit neighbour checks."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1, 1:-1]
    outside_neighbour = np.zeros_like(inner)
    for axis in range(3):
        for step in (-1, 1):
            outside_neighbour |= ~np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return np.argwhere(inner & outside_neighbour).astype(float)


def brute_force_hd95(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """95th percentile of the pooled symmetric surface distances (MedPy's hd95), by nearest-neighbour search."""
    pa, pb = _surface_points(a) * spacing, _surface_points(b) * spacing
    d_ab = cKDTree(pb).query(pa)[0]
    d_ba = cKDTree(pa).query(pb)[0]
    return float(np.percentile(np.concatenate([d_ab, d_ba]), 95))


@pytest.mark.parametrize("shift", [1, 3])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 1.2, 2.5)])
def test_hd95_matches_an_independent_implementation(shift: int, spacing: tuple[float, float, float]) -> None:
    rng = np.random.default_rng(shift)
    a = _tumour() > 0
    b = np.roll(_tumour(), shift, axis=1) > 0
    b[rng.random(SHAPE) < 0.002] = True  # scattered false positives make the tail matter
    assert hd95(a, b, spacing) == pytest.approx(brute_force_hd95(a, b, spacing), abs=1e-6)
    assert hd95(a, b, spacing) == pytest.approx(hd95(b, a, spacing))


def test_hd95_is_the_95th_percentile_not_another_one() -> None:
    # a far false-positive slab holds 7.4 % of the pooled surface distances: above the 90th
    # percentile (0 mm, the rest of the surface matches) and below the 95th (6.7 mm)
    a = _tumour() > 0
    b = a.copy()
    b[2:12, 2:12, 24:28] = True
    pa, pb = _surface_points(a), _surface_points(b)
    pooled = np.concatenate([cKDTree(pb).query(pa)[0], cKDTree(pa).query(pb)[0]])
    assert 0.05 < float((pooled > 0).mean()) < 0.10
    assert np.percentile(pooled, 90) == 0.0
    assert hd95(a, b) == pytest.approx(np.sqrt(6**2 + 3**2), abs=1e-6)  # 6.708 mm
    assert hd95(a, b) == pytest.approx(float(np.percentile(pooled, 95)), abs=1e-6)


def test_empty_mask_conventions() -> None:
    empty, full = np.zeros(SHAPE, bool), _tumour() > 0
    assert (dice(empty, empty), hd95(empty, empty)) == (1.0, 0.0)
    assert (dice(full, empty), hd95(full, empty)) == (0.0, EMPTY_HD95_MM)
    assert (dice(empty, full), hd95(empty, full)) == (0.0, EMPTY_HD95_MM)
    assert EMPTY_HD95_MM == pytest.approx(373.13, abs=0.01)


def test_evaluate_hand_made_cases(tmp_path: Path) -> None:
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    empty = np.zeros(SHAPE, np.uint8)
    _write(ref_dir, "BraTS2021_00000", _tumour(), _tumour(), pred_dir)  # perfect
    _write(ref_dir, "BraTS2021_00001", _tumour(), _tumour(shift=2), pred_dir)  # shifted by 2 voxels
    _write(ref_dir, "BraTS2021_00002", _tumour(), _tumour(et=False), pred_dir)  # ET missed (became NCR)
    _write(ref_dir, "BraTS2021_00003", _tumour(), empty, pred_dir)  # empty prediction
    _write(ref_dir, "BraTS2021_00004", empty, _tumour(), pred_dir)  # empty reference
    _write(ref_dir, "BraTS2021_00005", empty, empty, pred_dir)  # both empty
    _write(ref_dir, "BraTS2021_00006", _tumour(), None, pred_dir)  # no prediction file
    result = evaluate(pred_dir, ref_dir, tmp_path / "eval")

    got = {(r["case"], r["region"]): (r["dice"], r["hd95"]) for r in result.rows}
    for region in ("WT", "TC", "ET"):
        assert got[("BraTS2021_00000", region)] == (1.0, 0.0)
        assert got[("BraTS2021_00003", region)] == (0.0, EMPTY_HD95_MM)
        assert got[("BraTS2021_00004", region)] == (0.0, EMPTY_HD95_MM)
        assert got[("BraTS2021_00005", region)] == (1.0, 0.0)
    # shift of 2 voxels along x: WT box 20 long -> overlap 18/20
    assert got[("BraTS2021_00001", "WT")][0] == pytest.approx(0.9)
    assert got[("BraTS2021_00001", "WT")][1] == pytest.approx(2.0)
    # ET missed: ET scores 0 / 373.13, TC and WT stay perfect
    assert got[("BraTS2021_00002", "ET")] == (0.0, EMPTY_HD95_MM)
    assert got[("BraTS2021_00002", "TC")] == (1.0, 0.0) and got[("BraTS2021_00002", "WT")] == (1.0, 0.0)
    assert [f.case_id for f in result.failures] == ["BraTS2021_00006"]
    assert "prediction file not found" in str(result.failures[0])

    with open(tmp_path / "eval" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 * 3 and {"case", "region", "dice", "hd95"} <= set(rows[0])
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["cases"] == 6
    wt = summary["WT"]["dice"]
    assert wt["mean"] == pytest.approx(np.mean([1, 0.9, 1, 0, 0, 1])) and {"std", "median", "q25", "q75"} <= set(wt)


def test_prediction_in_another_geometry_is_refused(tmp_path: Path) -> None:
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    _write(ref_dir, "BraTS2021_00000", _tumour(), None, pred_dir)
    save_nifti(pred_dir / "BraTS2021_00000.nii.gz", np.zeros((40, 40, 29), np.uint8), BRATS_AFFINE)
    result = evaluate(pred_dir, ref_dir)
    assert "prediction shape" in str(result.failures[0]) and "BraTS2021_00000" in str(result.failures[0])


def test_predictions_from_a_run_of_another_store_are_scored_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # infer recorded the model's MLflow run; this store (a new SQLite file) does not hold it.
    from tests.conftest import run_cli

    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    _write(ref_dir, "BraTS2021_00000", _tumour(), _tumour(), pred_dir)
    (pred_dir / "inference.json").write_text(json.dumps({"run_id": "0123456789abcdef0123456789abcdef"}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert run_cli("evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--out", str(tmp_path / "eval")) == 0
    assert (tmp_path / "eval" / "metrics.csv").is_file()
    assert "was not logged" in caplog.text and "0123456789abcdef" in caplog.text


@pytest.mark.parametrize("layout, case_id, seg", [("brats2021", "BraTS2021_00000", "_seg"), ("brats2023", "BraTS-GLI-00000-000", "-seg")])
def test_evaluate_against_a_folder_of_label_files_alone(tmp_path: Path, layout: str, case_id: str, seg: str) -> None:
    # the challenge's tools take reference labels without the images: the same metrics as with complete case folders
    import shutil

    from brats_psp.data.discovery import label_files
    from tests.conftest import write_case

    cases, labels_only, pred_dir = tmp_path / "cases", tmp_path / "labels", tmp_path / "pred"
    for i in range(2):
        cid = case_id.replace("0000", f"000{i}")
        paths = write_case(cases, layout, cid, shape=SHAPE, seed=i)["paths"]
        labels_only.mkdir(exist_ok=True)
        shutil.copy(paths["seg"], labels_only / f"{cid}{seg}.nii.gz")
        pred = np.asarray(nib.load(paths["seg"]).dataobj)
        save_nifti(pred_dir / f"{cid}.nii.gz", np.roll(pred, i + 1, axis=0), nib.load(paths["seg"]).affine, dtype=np.uint8)
    assert sorted(label_files(labels_only)) == sorted(c.name for c in cases.iterdir())
    assert label_files(cases) is None  # complete case folders are not "labels alone"
    full = evaluate(pred_dir, cases, tmp_path / "e1")
    alone = evaluate(pred_dir, labels_only, tmp_path / "e2")
    assert not full.failures and not alone.failures and len(alone.rows) == 6
    assert alone.rows == full.rows
