"""New contrasts per training batch from the built-in cases' stored appearance-class maps
(brats_psp.data.rerender): the maps, their way into the cache, the drawing, the batch step.

Two built-in cases are generated once per module (with their class maps) and preprocessed.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from brats_psp.config import DataConfig
from brats_psp.data.augment import BatchAugment
from brats_psp.data.builtin import classes_folder_for, ensure_demo_dataset, ensure_training_cache
from brats_psp.data.cache import CachedVolume
from brats_psp.data.preprocess import preprocess_dataset
from brats_psp.data.release import classes_path
from brats_psp.data.rerender import rerender
from brats_psp.data.slices import CLASS_CODES, SliceDataset, slice_transforms
from brats_psp.data.synthetic.anatomy import STRUCTURES
from brats_psp.data.synthetic.appearance import CLASS_NAMES
from brats_psp.labels import Tissue
from tests.test_augment import NOTHING

LESION_CODES = [CLASS_NAMES.index(k) for k in ("ed", "et", "ncr", "cyst", "haem", "net")]


@pytest.fixture(scope="module")
def built_in(tmp_path_factory: pytest.TempPathFactory) -> tuple[DataConfig, Path, Path]:
    """(config, raw folder, preprocessed cache) of a two-case built-in set."""
    cfg = DataConfig(cache_dir=str(tmp_path_factory.mktemp("cache")), demo_cases=2)
    raw = ensure_demo_dataset(cfg)
    return cfg, raw, ensure_training_cache(cfg, progress=False)


def _volumes(cache: Path) -> list[CachedVolume]:
    return [CachedVolume(d) for d in sorted((cache / "cases").iterdir())]


def test_class_map_codes_lesions_structures_and_the_mask(built_in: tuple[DataConfig, Path, Path]) -> None:
    cfg, raw, _ = built_in
    for case_dir in sorted(p for p in raw.iterdir() if p.is_dir()):
        codes = np.asarray(nib.load(classes_path(case_dir.name, classes_folder_for(raw))).dataobj)
        seg = np.asarray(nib.load(case_dir / f"{case_dir.name}_seg.nii.gz").dataobj)
        t1 = np.asarray(nib.load(case_dir / f"{case_dir.name}_t1.nii.gz").dataobj)
        assert codes.dtype == np.uint8 and codes.shape == seg.shape and codes.max() < len(CLASS_NAMES)
        np.testing.assert_array_equal(codes > 0, t1 > 0)  # the skull strip's mask, rim included, bites excluded
        # A voxel labelled tumour is drawn as a lesion part, and a lesion part is labelled tumour.
        lesion = np.isin(codes, LESION_CODES)
        np.testing.assert_array_equal(lesion, seg > 0)
        # The non-tumour structures that enhance are there, and are background.
        for name in ("vessel", "sinus", "choroid", "dura"):
            assert name in STRUCTURES
            drawn = codes == CLASS_NAMES.index(name)
            assert drawn.sum() > 100, (case_dir.name, name, int(drawn.sum()))
            assert not (seg[drawn] > 0).any()


def test_the_cache_stores_the_class_map_aligned_with_the_label(built_in: tuple[DataConfig, Path, Path]) -> None:
    cfg, raw, cache = built_in
    for vol in _volumes(cache):
        assert vol.has_classes
        codes, label = np.asarray(vol.classes), np.asarray(vol.label)
        assert codes.shape == label.shape and codes.dtype == np.uint8
        # Both resampled with nearest neighbours from one grid: tumour labels sit on lesion codes exactly.
        np.testing.assert_array_equal(np.isin(codes, LESION_CODES), np.isin(label, [Tissue.NCR, Tissue.ED, Tissue.ET]))
        assert np.bincount(codes.ravel()).tolist() == vol.meta["class_voxels"]
        # Slabs of every plane cut the class map as the image.
        for axis in (0, 1, 2):
            i = vol.length(axis) // 2
            slab = vol.classes_slab(i, 1, axis)
            assert slab.shape == (3, *vol.slab(i, 1, axis).shape[1:])
            np.testing.assert_array_equal(np.isin(slab[1], LESION_CODES), vol.label_slice(i, axis) > 0)
    # A second run reuses every entry, class maps included.
    again = preprocess_dataset(raw, cache, cfg, progress=False, classes_dir=classes_folder_for(raw))
    assert len(again.reused) == 2 and not again.processed


def _slabs(cache: Path, n: int = 12) -> dict[str, torch.Tensor]:
    """``n`` slabs from both cases, padded / cropped to 128 x 128, with their class maps."""
    ds = SliceDataset(sorted((cache / "cases").iterdir()), 1, slice_transforms(DataConfig(), train=False), classes=True)
    picks = np.linspace(0, len(ds) - 1, n).astype(int)
    return torch.utils.data.default_collate([ds[int(i)] for i in picks])


def test_rerender_draws_zscored_contrasts_inside_the_brain_only(built_in: tuple[DataConfig, Path, Path]) -> None:
    _, _, cache = built_in
    vol = _volumes(cache)[0]
    ds = SliceDataset([vol.case_dir], 1, classes=True)
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])  # every axial slice of the case
    assert batch["classes"].shape == (len(ds), 3, *batch["image"].shape[-2:]) and batch["class_voxels"].shape[1] == CLASS_CODES
    new = rerender(batch["classes"], batch["class_voxels"], torch.Generator().manual_seed(0))
    assert new.shape == batch["image"].shape and new.dtype == torch.float32
    inside = batch["classes"].repeat_interleave(4, dim=1) > 0
    assert (new[~inside] == 0).all() and torch.isfinite(new).all()
    # Each slice draws its own appearance; z-scored with the whole volume's statistics of its
    # draw, the volume's slices together have about mean 0 and standard deviation 1 per contrast.
    for c in range(4):
        values = new[:, 4 + c][inside[:, 4 + c]]
        assert abs(float(values.mean())) < 0.25 and 0.7 < float(values.std()) < 1.4, (c, float(values.mean()), float(values.std()))
    # The same generator draws the same images, another one others.
    again = rerender(batch["classes"], batch["class_voxels"], torch.Generator().manual_seed(0))
    other = rerender(batch["classes"], batch["class_voxels"], torch.Generator().manual_seed(1))
    assert torch.equal(new, again) and not torch.allclose(new, other)


def test_rerender_keeps_the_radiological_cues(built_in: tuple[DataConfig, Path, Path]) -> None:
    _, _, cache = built_in
    batch = _slabs(cache, 24)
    codes = batch["classes"][:, 1]
    new = rerender(batch["classes"], batch["class_voxels"], torch.Generator().manual_seed(3))[:, 4:8]  # the middle slices

    def mean(c: int, name: str) -> torch.Tensor:
        """Per slice, contrast c's mean over class ``name`` (nan where absent)."""
        m = (codes == CLASS_NAMES.index(name)).float()
        return (new[:, c] * m).flatten(1).sum(1) / m.flatten(1).sum(1)

    t1, t2, flair = 0, 2, 3
    wm_gm = mean(t1, "wm") - mean(t1, "gm")  # T1: white matter above grey matter
    csf = mean(t2, "csf") - mean(t2, "gm")  # T2: CSF brightest
    dark = mean(flair, "gm") - mean(flair, "csf")  # FLAIR: CSF suppressed
    for diff in (wm_gm, csf, dark):
        present = ~torch.isnan(diff)
        assert present.sum() >= 10 and (diff[present] > 0).float().mean() > 0.9, diff


def test_batch_augment_redraws_the_configured_share_and_only_slices_with_a_map(built_in: tuple[DataConfig, Path, Path]) -> None:
    _, _, cache = built_in
    batch = _slabs(cache, 16)
    batch = {**batch, "image": batch["image"].float(), "label": batch["label"].float()}
    plain = BatchAugment(NOTHING)(batch, seed=5)
    assert torch.equal(plain["image"], batch["image"])  # off: the class maps are carried, not used
    everything = BatchAugment(dataclasses.replace(NOTHING, rerender=1.0))(batch, seed=5)
    changed = (everything["image"] != batch["image"]).flatten(1).any(1)
    assert changed.all()
    torch.testing.assert_close(everything["label"], batch["label"])
    half = BatchAugment(dataclasses.replace(NOTHING, rerender=0.5))(batch, seed=5)
    assert 0 < int((half["image"] != batch["image"]).flatten(1).any(1).sum()) < 16
    # A case without a class map (a user's data) keeps its own contrasts.
    no_map = {**batch, "class_voxels": torch.zeros_like(batch["class_voxels"])}
    kept = BatchAugment(dataclasses.replace(NOTHING, rerender=1.0))(no_map, seed=5)
    assert torch.equal(kept["image"], batch["image"])


def test_cases_without_a_class_map_are_named_and_keep_their_contrasts(
    small_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "cache"
    preprocess_dataset(small_dataset, out, DataConfig(), progress=False)
    with caplog.at_level(logging.WARNING):
        ds = SliceDataset(sorted((out / "cases").iterdir()), 1, classes=True)
    assert "6 of 6 case(s) have no appearance-class map" in caplog.text and "BraTS2021_00000" in caplog.text
    sample = ds[0]
    assert (sample["classes"] == 0).all() and (sample["class_voxels"] == 0).all()
    assert sample["classes"].shape == (3, *sample["image"].shape[1:])


def test_a_class_map_that_does_not_fit_its_case_is_a_case_error_naming_the_file(small_dataset: Path, tmp_path: Path) -> None:
    classes = tmp_path / "classes"
    img = nib.load(small_dataset / "BraTS2021_00000" / "BraTS2021_00000_t1.nii.gz")
    wrong = classes_path("BraTS2021_00000", classes)
    wrong.parent.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), img.affine), wrong)
    result = preprocess_dataset(small_dataset, tmp_path / "cache", DataConfig(), progress=False, classes_dir=classes)
    assert [e.case_id for e in result.failures] == ["BraTS2021_00000"] and len(result.processed) == 5
    message = str(result.failures[0])
    assert str(wrong) in message and "class map shape (5, 5, 5) differs from image shape" in message
    # The other cases have no class map and are cached without one.
    assert not CachedVolume(tmp_path / "cache" / "cases" / "BraTS2021_00001").has_classes


def test_show_data_draws_the_new_appearances(built_in: tuple[DataConfig, Path, Path], tmp_path: Path) -> None:
    from tests.conftest import run_cli

    cfg, raw, _ = built_in
    out = tmp_path / "rerendered.png"
    assert run_cli("show-data", "--rerender", "2", "--cases", "2", "--out", str(out), f"data.cache_dir={cfg.cache_dir}", "data.demo_cases=2") == 0
    assert out.stat().st_size > 10_000
    from brats_psp.plots import plot_rerendered

    (tmp_path / "empty" / "cases").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no cached case with an appearance-class map"):
        plot_rerendered(tmp_path / "empty", tmp_path / "x.png")


def test_demo_data_writes_class_maps_that_training_picks_up(built_in: tuple[DataConfig, Path, Path], tmp_path: Path) -> None:
    """``demo-data --classes``: the maps beside the release folder, the same as the built-in set's
    for the same seed and case, stored in the cache that ``train --data`` builds."""
    from tests.conftest import run_cli

    _, built_raw, _ = built_in
    raw = tmp_path / "demo" / "raw"
    assert run_cli("demo-data", "--out", str(raw), "--cases", "1", "--seed", "0", "--workers", "1", "--classes") == 0
    (written,) = sorted((tmp_path / "demo" / "classes").glob("*.nii.gz"))
    assert (classes_folder_for(raw) / ".complete").is_file()
    same = nib.load(classes_folder_for(built_raw) / written.name)
    np.testing.assert_array_equal(np.asarray(nib.load(written).dataobj), np.asarray(same.dataobj))
    cache = ensure_training_cache(DataConfig(cache_dir=str(tmp_path / "cache")), raw, progress=False)
    (entry,) = _volumes(cache)
    assert entry.has_classes and entry.case_id == written.name.removesuffix(".nii.gz")
