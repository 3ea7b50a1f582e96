"""Every kind of bad input gets an error that names the case and the file and says what is wrong."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from brats_psp.config import DataConfig, load_config
from brats_psp.data.discovery import discover_cases
from brats_psp.data.layouts import MODALITIES, get_layout
from brats_psp.data.preprocess import preprocess_dataset
from brats_psp.data.transforms import load_case_arrays
from brats_psp.errors import CaseError, DiscoveryError
from brats_psp.io import OutputFolderError, save_nifti
from brats_psp.segment import segment_cases
from tests.conftest import BRATS_AFFINE, run_cli, small_volume, write_case
from tests.test_segment import checkpoint  # noqa: F401  (fixture)

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


@pytest.mark.parametrize(
    "what, expected",
    [("value", "label values [3] are outside the brats2021 set"), ("shape", "label shape (40, 44, 23) differs")],
)
def test_label_values_outside_the_release_or_of_another_shape(tmp_path: Path, what: str, expected: str) -> None:
    paths = write_case(tmp_path, "brats2021", CID)["paths"]
    if what == "value":
        seg = np.asarray(nib.load(paths["seg"]).dataobj).copy()
        seg[0, 0, 0] = 3  # unused in 2017-2021
    else:
        seg = np.zeros((40, 44, 23), np.uint8)
    save_nifti(paths["seg"], seg, BRATS_AFFINE, dtype=np.uint8)
    _expect(tmp_path, "seg.nii.gz", expected)


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


@pytest.mark.parametrize("workers", [1, 2])
def test_one_bad_case_does_not_stop_the_others(tmp_path: Path, workers: int) -> None:
    raw = tmp_path / "raw"
    for i in range(3):
        write_case(raw, "brats2021", f"BraTS2021_{i:05d}", seed=i)
    bad = raw / "BraTS2021_00001" / "BraTS2021_00001_t2.nii.gz"
    bad.write_bytes(bad.read_bytes()[:100])
    os.remove(raw / "BraTS2021_00002" / "BraTS2021_00002_flair.nii.gz")
    write_case(raw, "brats2021", "BraTS2021_00003", seed=3)
    result = preprocess_dataset(raw, tmp_path / "cache", progress=False, workers=workers)
    assert sorted(result.processed) == ["BraTS2021_00000", "BraTS2021_00003"]
    failed = sorted(e.case_id for e in result.failures)
    assert failed == ["BraTS2021_00001", "BraTS2021_00002"]
    assert all(isinstance(e, CaseError) and e.path and e.message for e in result.failures)  # whole, from a worker too
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


# --------------------------------------------------------------------------- dimensionality, data types, empty brains

CID_2023 = "BraTS-GLI-00007-000"


def _refused(root: Path, tmp_path: Path, case_id: str, file_name: str, message: str, spacing=(1.0, 1.0, 1.0)) -> CaseError:
    """Preprocessing reports the case with its file and problem, and writes no cache entry for it."""
    result = preprocess_dataset(root, tmp_path / "cache", DataConfig(spacing=list(spacing)), progress=False)
    assert not result.processed
    (err,) = result.failures
    text = str(err)
    assert err.case_id == case_id and case_id in text and file_name in text and message in text, text
    assert not (tmp_path / "cache" / "cases").exists() or not list((tmp_path / "cache" / "cases").iterdir())
    return err


@pytest.mark.parametrize(("layout", "cid"), [("brats2021", CID), ("brats2023", CID_2023)])
@pytest.mark.parametrize("shape", [(40, 44), (40, 44, 24, 2)], ids=["2d", "4d"])
def test_image_with_the_wrong_dimensionality(tmp_path: Path, layout: str, cid: str, shape: tuple[int, ...]) -> None:
    paths = write_case(tmp_path / "raw", layout, cid)["paths"]
    save_nifti(paths["t2"], np.ones(shape, np.int16), BRATS_AFFINE)
    name = get_layout(layout).filename(cid, "t2")
    _refused(tmp_path / "raw", tmp_path, cid, name, f"expected a 3D image, got shape {shape}")


def test_msd_image_that_is_3d(tmp_path: Path) -> None:
    paths = write_case(tmp_path / "raw", "msd", "BRATS_001")["paths"]
    save_nifti(paths["image"], np.ones((40, 44, 24), np.int16), BRATS_AFFINE)
    _refused(tmp_path / "raw", tmp_path, "BRATS_001", "BRATS_001.nii.gz", "expected a 4D image with 4 channels, got shape (40, 44, 24)")


def test_4d_file_with_one_volume_loads_as_3d(tmp_path: Path) -> None:
    written = write_case(tmp_path, "brats2021", CID)
    save_nifti(written["paths"]["flair"], written["image"][3][..., None], BRATS_AFFINE)
    image, _, _ = load_case_arrays(_only_case(tmp_path))
    np.testing.assert_array_equal(image[3], written["image"][3])


def _write_typed(path: Path, data: np.ndarray, dtype: str, slope: float = 1.0, inter: float = 0.0) -> None:
    """Write ``data`` with on-disk type ``dtype``; with ``scaled`` the file holds int16 and scl_slope/scl_inter."""
    on_disk = np.int16 if dtype == "scaled" else np.dtype(dtype)
    img = nib.Nifti1Image(data.astype(on_disk), BRATS_AFFINE)
    img.set_data_dtype(on_disk)
    if dtype == "scaled":
        img.header.set_slope_inter(slope, inter)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


@pytest.mark.parametrize("dtype", ["int16", "uint8", "float32", "float64", "scaled"])
def test_image_data_types_load_with_their_scaling(tmp_path: Path, dtype: str) -> None:
    """Every on-disk type loads; scl_slope/scl_inter are applied; the result equals a float32 copy of the values."""
    from brats_psp.labels import tissue_to_release

    image, tissue = small_volume()
    raw = image // 5 if dtype == "uint8" else image  # uint8 holds 0..255
    # scaled: every contrast int16 with scl_slope 2.5; t1 also with scl_inter -10
    slopes = {m: (2.5, -10.0 if m == "t1" else 0.0) if dtype == "scaled" else (1.0, 0.0) for m in MODALITIES}
    lay = get_layout("brats2021")
    for c, m in enumerate(MODALITIES):
        _write_typed(tmp_path / "typed" / CID / lay.filename(CID, m), raw[c], dtype, *slopes[m])
        values = raw[c].astype(np.float64) * slopes[m][0] + slopes[m][1]  # what the file means
        _write_typed(tmp_path / "float" / CID / lay.filename(CID, m), values, "float32")
    for root in ("typed", "float"):
        save_nifti(tmp_path / root / CID / lay.filename(CID, "seg"), tissue_to_release(tissue, "brats2021"), BRATS_AFFINE, dtype=np.uint8)
    if dtype == "scaled":
        proxy = nib.load(str(tmp_path / "typed" / CID / lay.filename(CID, "t1"))).dataobj
        assert (proxy.slope, proxy.inter) == (2.5, -10.0) and proxy.dtype == np.int16
    typed, _, _ = load_case_arrays(_only_case(tmp_path / "typed"))
    plain, _, _ = load_case_arrays(_only_case(tmp_path / "float"))
    assert typed.dtype == np.float32
    np.testing.assert_array_equal(typed, plain)
    if dtype == "scaled":
        np.testing.assert_array_equal(typed[0], raw[0] * np.float32(2.5) - 10)
    a = preprocess_dataset(tmp_path / "typed", tmp_path / "cache_typed", DataConfig(spacing=[2.0, 2.0, 2.0]), progress=False)
    b = preprocess_dataset(tmp_path / "float", tmp_path / "cache_float", DataConfig(spacing=[2.0, 2.0, 2.0]), progress=False)
    assert a.processed == b.processed == [CID]
    for name in ("image.npy", "label.npy"):
        np.testing.assert_array_equal(
            np.load(tmp_path / "cache_typed" / "cases" / CID / name), np.load(tmp_path / "cache_float" / "cases" / CID / name)
        )


@pytest.mark.parametrize("seg_dtype", [np.uint8, np.int16, np.float32])
def test_label_data_types(tmp_path: Path, seg_dtype: type) -> None:
    written = write_case(tmp_path, "brats2021", CID)
    seg = np.asarray(nib.load(written["paths"]["seg"]).dataobj)
    save_nifti(written["paths"]["seg"], seg, BRATS_AFFINE, dtype=seg_dtype)
    _, tissue, _ = load_case_arrays(_only_case(tmp_path))
    np.testing.assert_array_equal(tissue, written["tissue"])


def test_every_contrast_zero_is_an_empty_brain(tmp_path: Path) -> None:
    paths = write_case(tmp_path / "raw", "brats2021", CID)["paths"]
    for m in MODALITIES:
        save_nifti(paths[m], np.zeros((40, 44, 24), np.int16), BRATS_AFFINE)
    _refused(tmp_path / "raw", tmp_path, CID, f"{CID}_t1.nii.gz", "the t1 contrast is all zero (no brain)")


def test_constant_contrast_is_an_empty_brain(tmp_path: Path) -> None:
    """A constant image is non-zero everywhere: the crop would keep the whole box and z-scoring would zero it."""
    paths = write_case(tmp_path / "raw", "brats2021", CID)["paths"]
    for m in MODALITIES:
        save_nifti(paths[m], np.full((40, 44, 24), 7, np.int16), BRATS_AFFINE)
    _refused(tmp_path / "raw", tmp_path, CID, f"{CID}_t1.nii.gz", "the t1 contrast is constant (every voxel is 7): no brain to find")


def test_msd_image_that_is_all_zero(tmp_path: Path) -> None:
    paths = write_case(tmp_path / "raw", "msd", "BRATS_001")["paths"]
    save_nifti(paths["image"], np.zeros((40, 44, 24, 4), np.int16), BRATS_AFFINE)
    _refused(tmp_path / "raw", tmp_path, "BRATS_001", "BRATS_001.nii.gz", "the t1 contrast is all zero")


def test_a_few_bright_voxels_are_not_a_brain(tmp_path: Path, checkpoint: Path) -> None:  # noqa: F811
    """One bright voxel in each contrast is not a brain: refused before the crop and the resampling."""
    paths = write_case(tmp_path / "raw", "brats2021", CID)["paths"]
    for m in MODALITIES:
        data = np.zeros((40, 44, 24), np.int16)
        data[10, 10, 10] = 500
        save_nifti(paths[m], data, BRATS_AFFINE)
    _refused(tmp_path / "raw", tmp_path, CID, f"{CID}_t1.nii.gz", "no brain voxel left: only 1 voxel(s) are non-zero", spacing=(3, 3, 3))
    # the infer stage says the same and writes no segmentation
    result = segment_cases(str(checkpoint), tmp_path / "raw", tmp_path / "pred", progress=False)
    (err,) = result.failures
    assert f"{CID}_t1.nii.gz" in str(err) and "no brain voxel left: only 1 voxel(s) are non-zero" in str(err)
    assert not result.written and not list((tmp_path / "pred").glob("*.nii.gz"))


# --------------------------------------------------------------------------- orientation

@pytest.mark.parametrize("axcodes", ["LPS", "PLI", "RAS"])
def test_unusual_orientation_preprocesses_to_the_same_ras_arrays(tmp_path: Path, axcodes: str) -> None:
    """The same head stored LPS or PLI (axes flipped and permuted, the affine saying so) gives the same cache."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

    from brats_psp.labels import tissue_to_release

    image, tissue = small_volume()
    ras = np.diag([1.0, 1.2, 1.5, 1.0])
    ras[:3, 3] = [-20.0, -26.0, -18.0]
    lay = get_layout("brats2021")
    for name, codes in (("ras", "RAS"), ("other", axcodes)):
        ornt = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(codes))
        affine = ras @ inv_ornt_aff(ornt, tissue.shape)
        folder = tmp_path / name / CID
        for c, m in enumerate(MODALITIES):
            save_nifti(folder / lay.filename(CID, m), apply_orientation(image[c], ornt), affine)
        save_nifti(folder / lay.filename(CID, "seg"), apply_orientation(tissue_to_release(tissue, "brats2021"), ornt), affine, dtype=np.uint8)
        assert "".join(nib.aff2axcodes(affine)) == codes
        preprocess_dataset(tmp_path / name, tmp_path / f"cache_{name}", DataConfig(spacing=[1.5, 1.5, 1.5]), progress=False)
    a, b = (tmp_path / f"cache_{n}" / "cases" / CID for n in ("ras", "other"))
    for name in ("image.npy", "label.npy"):
        np.testing.assert_array_equal(np.load(a / name), np.load(b / name))
    np.testing.assert_allclose(json.loads((a / "meta.json").read_text())["affine"], json.loads((b / "meta.json").read_text())["affine"], atol=1e-4)


# --------------------------------------------------------------------------- output folders

def _permission_bits_hold() -> bool:
    """False for root (uid 0 with CAP_DAC_OVERRIDE writes into a 0o500 folder); true for other users,
    and for root run with that capability dropped (``setpriv --bounding-set -dac_override -- ...``)."""
    if os.geteuid() != 0:
        return True
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o500)
        try:
            with open(os.path.join(tmp, "probe"), "w"):
                return False
        except PermissionError:
            return True
        finally:
            os.chmod(tmp, 0o700)


needs_non_root = pytest.mark.skipif(not _permission_bits_hold(), reason="root ignores permission bits")


def _read_only_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    path.chmod(0o500)
    return path


@needs_non_root
def test_preprocess_into_a_read_only_folder(tmp_path: Path) -> None:
    write_case(tmp_path / "raw", "brats2021", CID)
    out = _read_only_dir(tmp_path / "cache")
    try:
        with pytest.raises(OutputFolderError, match=rf"output folder {out} cannot be written \(Permission denied\)"):
            preprocess_dataset(tmp_path / "raw", out, progress=False)
        assert not list(out.iterdir())
    finally:
        out.chmod(0o700)


@needs_non_root
def test_infer_into_a_read_only_folder(tmp_path: Path, checkpoint: Path) -> None:  # noqa: F811
    write_case(tmp_path / "raw", "brats2021", CID)
    out = _read_only_dir(tmp_path / "pred")
    try:
        with pytest.raises(OutputFolderError, match=rf"output folder {out} cannot be written \(Permission denied\)"):
            segment_cases(str(checkpoint), tmp_path / "raw", out, progress=False)
        assert not list(out.iterdir())
    finally:
        out.chmod(0o700)


def test_output_folder_blocked_by_a_file(tmp_path: Path, checkpoint: Path, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    """Root can write anywhere, so this is the unwritable-folder test that runs everywhere: a file sits where
    the folder should be. Both stages stop before any work, name the folder, and the CLI exits with 2."""
    write_case(tmp_path / "raw", "brats2021", CID)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("keep me")
    for out, reason in ((blocker, "File exists"), (blocker / "sub", "Not a directory")):
        with pytest.raises(OutputFolderError, match=rf"output folder {out} cannot be written \({reason}\)"):
            preprocess_dataset(tmp_path / "raw", out, progress=False)
        with pytest.raises(OutputFolderError, match=rf"output folder {out} cannot be written \({reason}\)"):
            segment_cases(str(checkpoint), tmp_path / "raw", out, progress=False)
    assert run_cli("preprocess", "--data", str(tmp_path / "raw"), "--out", str(blocker)) == 2
    assert f"output folder {blocker} cannot be written" in caplog.text
    assert blocker.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["not_a_folder", "raw"]


# --------------------------------------------------------------------------- config windows

def test_inference_window_larger_than_the_volume(tmp_path: Path, checkpoint: Path) -> None:  # noqa: F811
    """infer.roi_size bigger than every slice: SliceInferer pads the slice to the window and crops the result back."""
    write_case(tmp_path / "raw", "brats2021", CID)  # 40 x 44 x 24 at 1 mm; the model resamples to 2 mm (20 x 22 slices)
    cfg = load_config(None, ["infer.roi_size=[96,128]"]).infer
    result = segment_cases(str(checkpoint), tmp_path / "raw", tmp_path / "pred", cfg, progress=False)
    assert not result.failures
    out = nib.load(str(result.written[CID]))
    assert out.shape == (40, 44, 24)
    np.testing.assert_allclose(out.affine, BRATS_AFFINE)
    from brats_psp.inference import predict_volume
    from brats_psp.runtime import setup_runtime
    from brats_psp.checkpoint import load_model

    probs = predict_volume(load_model(str(checkpoint)).network, torch.randn(4, 21, 17, 9), cfg, setup_runtime("cpu", "fp32"))
    assert probs.shape == (3, 21, 17, 9) and 0 <= float(probs.min()) <= float(probs.max()) <= 1


def test_require_brain_is_an_array_transform_with_a_dictionary_twin() -> None:
    from monai.data import MetaTensor

    from brats_psp.data.transforms import RequireBrain, RequireBraind

    meta = {"case_id": "BraTS2021_00042", "filename_or_obj": "/data/BraTS2021_00042/BraTS2021_00042_t1.nii.gz"}
    image = MetaTensor(torch.zeros(4, 5, 5, 5), meta=dict(meta))
    image[0, 2, 2, 2] = 1.0
    assert RequireBrain(min_voxels=1)(image) is image
    with pytest.raises(CaseError) as err:
        RequireBrain(min_voxels=2)(image)
    assert "BraTS2021_00042" in str(err.value) and "BraTS2021_00042_t1.nii.gz" in str(err.value)
    assert "only 1 voxel(s) are non-zero in any contrast" in str(err.value)
    empty = {"image": MetaTensor(torch.zeros(4, 2, 2, 2), meta=dict(meta))}
    with pytest.raises(CaseError, match=r"after resampling to \[3.0, 3.0, 3.0\] mm: every contrast is zero"):
        RequireBraind("image", spacing=(3, 3, 3))(empty)
