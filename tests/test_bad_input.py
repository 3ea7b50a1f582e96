"""Every kind of bad input gets an error that names the case and the file and says what is wrong."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brats_psp.data.discovery import discover_cases
from brats_psp.data.preprocess import preprocess_dataset
from brats_psp.data.transforms import load_case_arrays
from brats_psp.errors import CaseError, DiscoveryError
from brats_psp.io import save_nifti
from tests.conftest import BRATS_AFFINE, write_case

CID = "BraTS2021_00007"


def _only_case(root: Path):
    return discover_cases(root).cases[0]


def _expect(root: Path, file_suffix: str, message: str) -> None:
    with pytest.raises(CaseError) as info:
        load_case_arrays(_only_case(root))
    text = str(info.value)
    assert CID in text and f"{CID}_{file_suffix}" in text and message in text, text


def test_missing_contrast(tmp_path: Path) -> None:
    paths = write_case(tmp_path, "brats2021", CID)["paths"]
    os.remove(paths["t1ce"])
    found = discover_cases(tmp_path)
    assert not found.cases
    (err,) = found.failures
    assert CID in str(err) and f"missing contrast file(s): {CID}_t1ce.nii.gz" in str(err)


def test_truncated_file(tmp_path: Path) -> None:
    paths = write_case(tmp_path, "brats2021", CID)["paths"]
    data = Path(paths["t2"]).read_bytes()
    Path(paths["t2"]).write_bytes(data[: len(data) // 2])
    _expect(tmp_path, "t2.nii.gz", "not a readable NIfTI file")


def test_file_that_is_not_nifti(tmp_path: Path) -> None:
    paths = write_case(tmp_path, "brats2021", CID)["paths"]
    Path(paths["flair"]).write_bytes(gzip.compress(b"this is not an image"))
    _expect(tmp_path, "flair.nii.gz", "not a readable NIfTI file")


def test_contrasts_with_different_shapes(tmp_path: Path) -> None:
    paths = write_case(tmp_path, "brats2021", CID)["paths"]
    save_nifti(paths["t2"], np.ones((40, 44, 20), np.int16), BRATS_AFFINE)
    _expect(tmp_path, "t2.nii.gz", f"shape (40, 44, 20) differs from {CID}_t1.nii.gz (40, 44, 24)")


def test_contrasts_with_different_affines(tmp_path: Path) -> None:
    paths = write_case(tmp_path, "brats2021", CID)["paths"]
    img = nib.load(paths["t1ce"])
    shifted = BRATS_AFFINE.copy()
    shifted[0, 3] += 3.0
    save_nifti(paths["t1ce"], np.asarray(img.dataobj), shifted)
    _expect(tmp_path, "t1ce.nii.gz", "affine differs")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_infinite_voxels(tmp_path: Path, bad: float) -> None:
    paths = write_case(tmp_path, "brats2021", CID)["paths"]
    data = np.asarray(nib.load(paths["flair"]).dataobj).astype(np.float32)
    data[3, 4, 5] = bad
    save_nifti(paths["flair"], data, BRATS_AFFINE)
    _expect(tmp_path, "flair.nii.gz", "1 voxel(s) are NaN or infinite")


def test_all_zero_contrast(tmp_path: Path) -> None:
    paths = write_case(tmp_path, "brats2021", CID)["paths"]
    save_nifti(paths["t1"], np.zeros((40, 44, 24), np.int16), BRATS_AFFINE)
    _expect(tmp_path, "t1.nii.gz", "the t1 contrast is all zero")


def test_label_values_outside_the_release(tmp_path: Path) -> None:
    paths = write_case(tmp_path, "brats2021", CID)["paths"]
    seg = np.asarray(nib.load(paths["seg"]).dataobj).copy()
    seg[0, 0, 0] = 3  # unused in 2017-2021
    save_nifti(paths["seg"], seg, BRATS_AFFINE, dtype=np.uint8)
    _expect(tmp_path, "seg.nii.gz", "label values [3] are outside the brats2021 set")


def test_label_shape_differs(tmp_path: Path) -> None:
    paths = write_case(tmp_path, "brats2021", CID)["paths"]
    save_nifti(paths["seg"], np.zeros((40, 44, 23), np.uint8), BRATS_AFFINE)
    _expect(tmp_path, "seg.nii.gz", "label shape (40, 44, 23) differs")


def test_msd_image_with_wrong_channels(tmp_path: Path) -> None:
    paths = write_case(tmp_path, "msd", "BRATS_001")["paths"]
    save_nifti(paths["image"], np.ones((40, 44, 24, 3), np.int16), BRATS_AFFINE)
    with pytest.raises(CaseError, match=r"case BRATS_001 \(.*BRATS_001.nii.gz\): expected a 4D image with 4 channels"):
        load_case_arrays(_only_case(tmp_path))


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DiscoveryError, match="no BraTS case found"):
        discover_cases(tmp_path)
    with pytest.raises(DiscoveryError, match="no such file or folder"):
        discover_cases(tmp_path / "nope")


def test_mixed_layouts_are_refused(tmp_path: Path) -> None:
    write_case(tmp_path, "brats2021", CID)
    write_case(tmp_path, "brats2023", "BraTS-GLI-00000-000")
    with pytest.raises(DiscoveryError, match="several layouts"):
        discover_cases(tmp_path)


def test_one_bad_case_does_not_stop_the_others(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    for i in range(3):
        write_case(raw, "brats2021", f"BraTS2021_{i:05d}", seed=i)
    bad = raw / "BraTS2021_00001" / "BraTS2021_00001_t2.nii.gz"
    bad.write_bytes(bad.read_bytes()[:100])
    os.remove(raw / "BraTS2021_00002" / "BraTS2021_00002_flair.nii.gz")
    write_case(raw, "brats2021", "BraTS2021_00003", seed=3)
    result = preprocess_dataset(raw, tmp_path / "cache", progress=False)
    assert sorted(result.processed) == ["BraTS2021_00000", "BraTS2021_00003"]
    failed = sorted(e.case_id for e in result.failures)
    assert failed == ["BraTS2021_00001", "BraTS2021_00002"]
    # nothing half-written: only complete entries in the cache, no temporaries
    assert sorted(p.name for p in (tmp_path / "cache" / "cases").iterdir()) == ["BraTS2021_00000", "BraTS2021_00003"]
    summary = json.loads((tmp_path / "cache" / "summary.json").read_text())
    assert len(summary["failed"]) == 2 and summary["cases"] == 2


@pytest.mark.parametrize("case_id", ["../evil", "/etc/passwd", "..", ".hidden", "a\\b", ""])
def test_case_ids_that_would_leave_the_output_folder_are_refused(case_id: str) -> None:
    from brats_psp.errors import check_case_id

    with pytest.raises(CaseError, match="not a plain file name"):
        check_case_id(case_id)
    assert check_case_id("BraTS2021_00000") == "BraTS2021_00000"
