"""Input images in NRRD and MetaImage (read with SimpleITK) give what their NIfTI twins give:
the same voxels, the same RAS affine, and from ``infer`` the same labels on the same grid."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from brats_psp.data.discovery import discover_cases
from brats_psp.data.layouts import LAYOUTS, MODALITIES
from brats_psp.data.transforms import load_case_arrays
from brats_psp.segment import segment_cases
from tests.conftest import BRATS_AFFINE, untrained_checkpoint, write_case

CID = "BraTS-GLI-00005-000"


def _rotation(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


#: The BraTS affine (x and y flipped), and an oblique one with a flipped axis and anisotropic voxels.
OBLIQUE = np.eye(4)
OBLIQUE[:3, :3] = _rotation(20) @ np.diag([1.2, -0.9, 1.5])
OBLIQUE[:3, 3] = [-40.0, 30.0, 5.0]
AFFINES = {"brats": BRATS_AFFINE, "oblique": OBLIQUE}


def _to_itk(nii_path: Path, out: Path) -> None:
    """Write a NIfTI file as ``out`` (.nrrd / .mha) with the same voxels and world geometry (LPS)."""
    img = nib.load(str(nii_path))
    data = np.asarray(img.dataobj)
    affine = img.affine
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    itk = sitk.GetImageFromArray(data.transpose(2, 1, 0))
    itk.SetSpacing(spacing.tolist())
    itk.SetDirection((lps / spacing).ravel().tolist())
    itk.SetOrigin((np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]).tolist())
    sitk.WriteImage(itk, str(out), useCompression=True)


def _convert_case(src: Path, dst: Path, ext: str) -> None:
    layout = LAYOUTS["brats2023"]
    dst.mkdir(parents=True)
    for name in (*MODALITIES, "seg"):
        _to_itk(src / layout.filename(CID, name), dst / layout.filename(CID, name, ext))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


@pytest.mark.parametrize("ext", [".nrrd", ".mha"])
@pytest.mark.parametrize("geometry", sorted(AFFINES))
def test_nrrd_and_metaimage_read_as_their_nifti_twin(tmp_path: Path, ext: str, geometry: str) -> None:
    write_case(tmp_path / "nii", "brats2023", CID, affine=AFFINES[geometry])
    _convert_case(tmp_path / "nii" / CID, tmp_path / "itk" / CID, ext)
    (nii_case,), (itk_case,) = discover_cases(tmp_path / "nii").cases, discover_cases(tmp_path / "itk").cases
    assert all(p.name.endswith(ext) for p in (*itk_case.images, itk_case.label))
    image_a, tissue_a, ref_a = load_case_arrays(nii_case)
    image_b, tissue_b, ref_b = load_case_arrays(itk_case)
    np.testing.assert_array_equal(image_b, image_a)
    np.testing.assert_array_equal(tissue_b, tissue_a)
    np.testing.assert_allclose(ref_b.affine, ref_a.affine, atol=1e-5)


def test_infer_on_nrrd_writes_the_labels_of_the_nifti_case(checkpoint: Path, tmp_path: Path) -> None:
    write_case(tmp_path / "nii", "brats2023", CID, affine=OBLIQUE)
    _convert_case(tmp_path / "nii" / CID, tmp_path / "itk" / CID, ".nrrd")
    a = segment_cases(str(checkpoint), tmp_path / "nii", tmp_path / "out_nii", progress=False)
    b = segment_cases(str(checkpoint), tmp_path / "itk", tmp_path / "out_itk", progress=False)
    assert not a.failures and not b.failures
    out_a, out_b = nib.load(str(a.written[CID])), nib.load(str(b.written[CID]))
    assert b.written[CID].name == f"{CID}.nii.gz"  # predictions are NIfTI whatever the input format
    np.testing.assert_array_equal(np.asarray(out_b.dataobj), np.asarray(out_a.dataobj))
    np.testing.assert_allclose(out_b.affine, out_a.affine, atol=1e-5)


def test_a_datalist_may_name_metaimage_files(tmp_path: Path) -> None:
    write_case(tmp_path / "nii", "brats2023", CID)
    _convert_case(tmp_path / "nii" / CID, tmp_path / "itk" / CID, ".mha")
    layout = LAYOUTS["brats2023"]
    entry = {"image": [f"itk/{CID}/{layout.filename(CID, m, '.mha')}" for m in MODALITIES], "label": f"itk/{CID}/{layout.filename(CID, 'seg', '.mha')}"}
    (tmp_path / "list.json").write_text(json.dumps({"testing": [entry]}))
    (case,) = discover_cases(tmp_path / "list.json").cases
    assert case.case_id == CID and case.labels == "brats2023"
    np.testing.assert_array_equal(load_case_arrays(case)[0], load_case_arrays(discover_cases(tmp_path / "nii").cases[0])[0])


def test_an_unreadable_nrrd_is_named(tmp_path: Path) -> None:
    write_case(tmp_path / "nii", "brats2023", CID)
    _convert_case(tmp_path / "nii" / CID, tmp_path / "itk" / CID, ".nrrd")
    bad = tmp_path / "itk" / CID / LAYOUTS["brats2023"].filename(CID, "t2", ".nrrd")
    bad.write_bytes(bad.read_bytes()[:100])
    from brats_psp.errors import CaseError

    with pytest.raises(CaseError, match="not a readable NRRD/MetaImage file") as err:
        load_case_arrays(discover_cases(tmp_path / "itk").cases[0])
    assert err.value.case_id == CID and bad.name in str(err.value)
