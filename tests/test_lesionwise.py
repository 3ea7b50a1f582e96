"""Lesion-wise metrics in both BraTS definitions, on hand-made cases whose answers are worked out
by hand, and through ``evaluate --lesionwise``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brats_psp.io import save_nifti
from brats_psp.labels import Tissue, tissue_to_release
from brats_psp.lesionwise import (
    LESIONWISE_COLUMNS,
    PENALTY_2023_MM,
    lesionwise_2023,
    lesionwise_panoptica,
)
from tests.conftest import BRATS_AFFINE, run_cli

SHAPE = (48, 48, 40)


def _cube(mask: np.ndarray, corner: tuple[int, int, int], size: int) -> None:
    x, y, z = corner
    mask[x : x + size, y : y + size, z : z + size] = True


def test_a_missed_lesion_and_a_false_positive_speck() -> None:
    ref, pred = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    _cube(ref, (5, 5, 5), 5)  # 125 voxels, found exactly
    _cube(ref, (30, 30, 25), 4)  # 64 voxels, missed
    _cube(pred, (5, 5, 5), 5)
    _cube(pred, (5, 35, 30), 2)  # an 8-voxel false positive far from both
    pan = lesionwise_panoptica(pred, ref)
    assert (pan["tp"], pan["fp"], pan["fn"]) == (1, 1, 1)
    assert pan["f1"] == pytest.approx(0.5)  # 1 / (1 + (1 + 1) / 2)
    assert (pan["dice"], pan["hd95"], pan["nsd"]) == (1.0, 0.0, 1.0)  # the mean over the one matched pair
    old = lesionwise_2023(pred, ref)
    assert (old["tp_2023"], old["fp_2023"], old["fn_2023"]) == (1, 1, 1)
    assert old["dice_2023"] == pytest.approx((1.0 + 0.0) / 3)  # two lesions + one false positive
    assert old["hd95_2023"] == pytest.approx((0.0 + 2 * PENALTY_2023_MM) / 3)


def test_two_close_lesions_merged_by_the_2023_rules_but_not_by_panoptica() -> None:
    ref, pred = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    _cube(ref, (10, 10, 10), 6)  # 216 voxels, x 10-15
    _cube(ref, (20, 10, 10), 4)  # 64 voxels, x 20-23: 4 voxels away
    pred[10:24, 10:16, 10:16] = True  # one blob (504 voxels) over both and the gap
    pan = lesionwise_panoptica(pred, ref)
    # panoptica: two reference lesions, one predicted; the blob goes to the larger (higher Dice)
    assert (pan["tp"], pan["fp"], pan["fn"]) == (1, 0, 1)
    assert pan["dice"] == pytest.approx(2 * 216 / (216 + 504))
    # GLI rules: dilations of 3 voxels touch, one lesion of 280 voxels, all inside the blob
    old = lesionwise_2023(pred, ref)
    assert (old["tp_2023"], old["fp_2023"], old["fn_2023"]) == (1, 0, 0)
    assert old["dice_2023"] == pytest.approx(2 * 280 / (280 + 504))
    # MET rules: dilations of 1 voxel leave two lesions; the blob belongs to both
    met = lesionwise_2023(pred, ref, task="MET")
    assert (met["tp_2023"], met["fp_2023"], met["fn_2023"]) == (2, 0, 0)
    assert met["dice_2023"] == pytest.approx((2 * 216 / (216 + 504) + 2 * 64 / (64 + 504)) / 2)


def test_small_lesions_below_the_2023_threshold_are_dropped_but_false_positives_never_are() -> None:
    ref, pred = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    _cube(ref, (10, 10, 10), 3)  # 27 voxels <= 50: dropped under the GLI rules
    _cube(pred, (30, 30, 30), 1)  # a 1-voxel false positive
    old = lesionwise_2023(pred, ref)
    assert (old["tp_2023"], old["fp_2023"], old["fn_2023"]) == (0, 1, 0)
    assert (old["dice_2023"], old["hd95_2023"]) == (0.0, PENALTY_2023_MM)
    met = lesionwise_2023(pred, ref, task="MET")  # the MET threshold is 2 voxels: the lesion counts, missed
    assert (met["tp_2023"], met["fp_2023"], met["fn_2023"]) == (0, 1, 1)
    pan = lesionwise_panoptica(pred, ref)
    # lesions on both sides but no match: the package's F1 0, Dice 0, NSD 0 and an infinite HD95
    assert (pan["tp"], pan["fp"], pan["fn"], pan["f1"], pan["dice"], pan["nsd"], pan["hd95"]) == (0, 1, 1, 0.0, 0.0, 0.0, math.inf)


def test_empty_masks() -> None:
    empty = np.zeros(SHAPE, bool)
    pan = lesionwise_panoptica(empty, empty)
    assert (pan["tp"], pan["fp"], pan["fn"]) == (0, 0, 0) and all(math.isnan(pan[k]) for k in ("f1", "dice", "hd95", "nsd"))
    old = lesionwise_2023(empty, empty)
    assert (old["dice_2023"], old["hd95_2023"], old["fp_2023"]) == (1.0, 0.0, 0)
    ref = empty.copy()
    _cube(ref, (10, 10, 10), 5)
    missed = lesionwise_2023(empty, ref)
    assert (missed["dice_2023"], missed["hd95_2023"], missed["fn_2023"]) == (0.0, PENALTY_2023_MM, 1)
    assert lesionwise_panoptica(empty, ref)["f1"] == 0.0


def test_each_lesion_is_matched_once() -> None:
    # a predicted lesion overlapping two reference lesions pairs with one of them only
    ref, pred = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    ref[5:11, 5:11, 5:11] = True  # y 5-10
    ref[5:11, 12:18, 5:11] = True  # y 12-17
    pred[5:11, 8:14, 5:11] = True  # y 8-13: 3 rows on the first, 2 on the second
    pred[5:11, 15:21, 5:11] = True  # y 15-20: 3 rows on the second
    pan = lesionwise_panoptica(pred, ref)
    assert (pan["tp"], pan["fp"], pan["fn"]) == (2, 0, 0)
    assert pan["dice"] == pytest.approx(0.5)  # both pairs share 3 of 6 rows


def _write(path: Path, tissue: np.ndarray) -> None:
    save_nifti(path, tissue_to_release(tissue, "brats2023"), BRATS_AFFINE, dtype=np.uint8)


def test_evaluate_lesionwise_writes_both_definitions(tmp_path: Path) -> None:
    ref, pred = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    ref[5:15, 5:15, 5:15] = Tissue.ED
    ref[7:13, 7:13, 7:13] = Tissue.ET
    ref[30:36, 30:36, 20:26] = Tissue.ET  # a second lesion (ET, in TC and WT), missed
    pred[5:15, 5:15, 5:15] = Tissue.ED
    pred[7:13, 7:13, 7:13] = Tissue.ET
    pred[40:42, 5:7, 30:32] = Tissue.NCR  # a false positive in TC and WT
    cid = "BraTS-MET-00001-000"
    _write(tmp_path / "ref" / f"{cid}-seg.nii.gz", ref)
    _write(tmp_path / "pred" / f"{cid}.nii.gz", pred)
    assert run_cli("evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "--out", str(tmp_path / "out"), "--lesionwise") == 0
    with open(tmp_path / "out" / "lesionwise.csv") as fh:
        rows = {r["region"]: r for r in csv.DictReader(fh)}
    assert list(rows["WT"]) == list(LESIONWISE_COLUMNS)
    for region in ("WT", "TC", "ET"):
        fp = 0 if region == "ET" else 1
        assert (int(rows[region]["tp"]), int(rows[region]["fp"]), int(rows[region]["fn"])) == (1, fp, 1), region
        assert (int(rows[region]["tp_2023"]), int(rows[region]["fp_2023"]), int(rows[region]["fn_2023"])) == (1, fp, 1), region
    # MET rules: ET = 216 + 216 voxels, one found exactly, one missed: (1 + 0) / 2
    assert float(rows["ET"]["dice_2023"]) == pytest.approx(0.5)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["lesionwise"]["ET"]["dice"] == pytest.approx(1.0)  # panoptica: the one matched pair
    assert summary["lesionwise"]["WT"]["fp_2023"] == 1
    assert nib.load(str(tmp_path / "ref" / f"{cid}-seg.nii.gz")).shape == SHAPE
