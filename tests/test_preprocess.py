"""Volume transforms and the preprocess stage: shapes, normalisation, crop, inverse, cache reuse."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from brats_psp.config import DataConfig
from brats_psp.data.discovery import discover_cases
from brats_psp.data.cache import kfold_assignment, load_entry_meta
from brats_psp.data.preprocess import preprocess_dataset
from brats_psp.data.builtin import cache_folder_for
from brats_psp.data.transforms import ClipPercentiles, apply_transforms, preprocessing_params, volume_transforms
from brats_psp.labels import Tissue
from tests.conftest import BRATS_AFFINE, REAL_CASE, write_case


def _transformed(root: Path, spacing=(1.0, 1.0, 1.0)):
    case = discover_cases(root).cases[0]
    chain = volume_transforms(spacing)
    return case, chain, apply_transforms(chain, {"case": case})


def test_output_shape_crop_and_normalisation(tmp_path: Path) -> None:
    made = write_case(tmp_path, "brats2021", "BraTS2021_00000")
    _, _, d = _transformed(tmp_path)
    image, label = d["image"], d["label"]
    # crop to the brain's bounding box; the BraTS affine flips x and y, so the box is mirrored
    nz = np.argwhere(made["image"].any(axis=0))
    expected = tuple(int(s) for s in nz.max(0) - nz.min(0) + 1)
    assert tuple(image.shape) == (4, *expected) and tuple(label.shape) == (1, *expected)
    for c in range(4):
        inside = image[c][image[c] != 0].numpy()
        assert abs(inside.mean()) < 1e-3 and abs(inside.std() - 1) < 1e-3
    # orientation RAS: the diagonal of the affine is positive
    assert np.all(np.diag(np.asarray(image.affine))[:3] > 0)
    # tissue codes survive: same voxel counts as written
    for t in (Tissue.NCR, Tissue.ED, Tissue.ET):
        assert int((label == t).sum()) == int((made["tissue"] == t).sum())


def test_clip_percentiles_clips_each_contrast_inside_the_brain_only() -> None:
    rng = np.random.default_rng(0)
    image = torch.zeros(2, 20, 20, 10)
    image[:, 2:18, 2:18, 1:9] = torch.from_numpy(rng.normal(100.0, 10.0, (2, 16, 16, 8)).astype(np.float32))
    image[0, 5, 5, 5] = 1000.0  # a vessel
    image[1] *= 3.0  # another contrast, its own scale
    raw = image.clone()
    out = ClipPercentiles((1.0, 99.0))(image)
    for c in range(2):
        inside = raw[c] != 0
        low, high = np.percentile(raw[c][inside].numpy(), [1.0, 99.0])
        assert torch.equal(out[c] != 0, inside)  # the mask (zeros outside the brain) is kept
        assert float(out[c][inside].min()) == pytest.approx(low) and float(out[c][inside].max()) == pytest.approx(high)
        middle = inside & (raw[c] > low) & (raw[c] < high)
        assert torch.equal(out[c][middle], raw[c][middle])  # only the tails change
    assert float(out[0, 5, 5, 5]) < 200.0
    with pytest.raises(ValueError, match="0 <= low < high <= 100"):
        ClipPercentiles((99.0, 1.0))


def test_clipped_preprocessing_is_its_own_cache_and_checkpoint_record(tmp_path: Path) -> None:
    write_case(tmp_path, "brats2021", "BraTS2021_00000")
    case = discover_cases(tmp_path).cases[0]
    plain = apply_transforms(volume_transforms(with_label=False), {"case": case})["image"]
    clipped = apply_transforms(volume_transforms(with_label=False, percentiles=(1.0, 99.0)), {"case": case})["image"]
    for c in range(4):  # still a z-score inside the brain, of clipped values
        inside = clipped[c][clipped[c] != 0].numpy()
        assert abs(inside.mean()) < 1e-3 and abs(inside.std() - 1) < 1e-3
    assert float(clipped.abs().max()) < float(plain.abs().max())
    assert preprocessing_params([1.5] * 3, [1.0, 99.0])["normalize"] != preprocessing_params([1.5] * 3)["normalize"]
    assert cache_folder_for(tmp_path, DataConfig(intensity_percentiles=[1.0, 99.0])) != cache_folder_for(tmp_path, DataConfig())


def test_inverse_maps_back_to_the_input_grid(tmp_path: Path) -> None:
    made = write_case(tmp_path, "brats2021", "BraTS2021_00000")
    _, chain, d = _transformed(tmp_path)
    back = chain.inverse({"image": d["image"], "label": d["label"]})
    label = back["label"]
    assert tuple(label.shape[1:]) == made["tissue"].shape
    np.testing.assert_allclose(np.asarray(label.affine), BRATS_AFFINE)
    np.testing.assert_array_equal(label[0].numpy().astype(np.uint8), made["tissue"])


def test_non_standard_affine_is_resampled_and_inverted(tmp_path: Path) -> None:
    # 2 mm voxels with permuted axes: the chain reorients, resamples to 1 mm, and inverts back.
    affine = np.array([[0, 2.0, 0, -40], [0, 0, 2.0, -30], [2.0, 0, 0, 5], [0, 0, 0, 1]])
    made = write_case(tmp_path, "brats2023", "BraTS-GLI-00009-000", shape=(20, 22, 12), affine=affine)
    _, chain, d = _transformed(tmp_path)
    assert np.allclose(np.abs(np.diag(np.asarray(d["image"].affine)[:3, :3])), 1.0)
    assert d["image"].shape[1] > 20  # the 2 mm axes now sampled at 1 mm
    back = chain.inverse({"label": d["label"]})["label"]
    assert tuple(back.shape[1:]) == made["tissue"].shape
    np.testing.assert_allclose(np.asarray(back.affine), affine, atol=1e-4)
    agree = (back[0].numpy().astype(np.uint8) == made["tissue"]).mean()
    assert agree > 0.97


def test_preprocess_writes_cache_datalist_summary_and_reuses(small_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    cfg = DataConfig(folds=3, fold=1)
    first = preprocess_dataset(small_dataset, out, cfg, progress=False)
    assert len(first.processed) == 6 and not first.reused and not first.failures
    meta = json.loads((out / "cases" / "BraTS2021_00000" / "meta.json").read_text())
    image = np.load(out / "cases" / "BraTS2021_00000" / "image.npy", mmap_mode="r")
    label = np.load(out / "cases" / "BraTS2021_00000" / "label.npy", mmap_mode="r")
    x, y, z = meta["shape"]
    assert image.shape == (z, 4, x, y) and image.dtype == np.float16
    assert label.shape == (z, x, y) and label.dtype == np.uint8
    presence = np.asarray(meta["presence"])
    np.testing.assert_array_equal(presence[:, 0], (label > 0).reshape(z, -1).any(1))
    datalist = json.loads((out / "datalist.json").read_text())
    assert {e["fold"] for e in datalist["validation"]} == {1}
    assert len(datalist["training"]) + len(datalist["validation"]) == 6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == 6 and summary["input_shapes"] == ["40x44x24"] and summary["input_spacings"] == ["1x1x1"]
    assert summary["region_voxels"]["WT"]["min"] > 0

    mtime = (out / "cases" / "BraTS2021_00000" / "image.npy").stat().st_mtime_ns
    second = preprocess_dataset(small_dataset, out, cfg, progress=False)
    assert not second.processed and len(second.reused) == 6
    assert (out / "cases" / "BraTS2021_00000" / "image.npy").stat().st_mtime_ns == mtime


def test_corrupted_cache_entry_is_rebuilt(small_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    preprocess_dataset(small_dataset, out, progress=False)
    path = out / "cases" / "BraTS2021_00002" / "image.npy"
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(raw))
    assert load_entry_meta(path.parent) is None
    again = preprocess_dataset(small_dataset, out, progress=False)
    assert again.processed == ["BraTS2021_00002"]
    assert load_entry_meta(path.parent) is not None


def test_changed_input_is_reprocessed(small_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    preprocess_dataset(small_dataset, out, progress=False)
    t1 = small_dataset / "BraTS2021_00003" / "BraTS2021_00003_t1.nii.gz"
    os.utime(t1, ns=(t1.stat().st_atime_ns, t1.stat().st_mtime_ns + 10**9))
    assert preprocess_dataset(small_dataset, out, progress=False).processed == ["BraTS2021_00003"]


def test_kfold_assignment_is_deterministic_and_balanced() -> None:
    ids = [f"c{i}" for i in range(23)]
    a = kfold_assignment(ids, 5, seed=3)
    assert a == kfold_assignment(list(reversed(ids)), 5, seed=3)
    counts = np.bincount(list(a.values()))
    assert counts.max() - counts.min() <= 1
    assert a != kfold_assignment(ids, 5, seed=4)


@pytest.mark.skipif(not REAL_CASE.is_dir(), reason="shared/data/real is not present")
def test_real_case_through_the_transforms() -> None:
    case = discover_cases(REAL_CASE).cases[0]
    d = apply_transforms(volume_transforms(with_label=False), {"case": case})
    image = d["image"]
    assert image.shape[0] == 4 and all(s < 240 for s in image.shape[1:3]) and image.shape[3] <= 155
    for c in range(4):
        inside = image[c][image[c] != 0]
        assert abs(float(inside.mean())) < 1e-3 and abs(float(inside.std()) - 1) < 1e-3


def test_atomic_writes_get_the_usual_file_mode(tmp_path: Path) -> None:
    from brats_psp.io import write_text

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_workers_write_the_same_cache_as_one_process(small_dataset: Path, tmp_path: Path) -> None:
    one = preprocess_dataset(small_dataset, tmp_path / "one", progress=False)
    two = preprocess_dataset(small_dataset, tmp_path / "two", progress=False, workers=2)
    assert sorted(one.processed) == sorted(two.processed) and len(two.processed) == 6
    for case in sorted((tmp_path / "one" / "cases").iterdir()):
        other = tmp_path / "two" / "cases" / case.name
        for name in ("image.npy", "label.npy"):
            assert (case / name).read_bytes() == (other / name).read_bytes(), (case.name, name)
        a, b = (json.loads((d / "meta.json").read_text()) for d in (case, other))
        assert a == b
    assert (tmp_path / "one" / "datalist.json").read_text() == (tmp_path / "two" / "datalist.json").read_text()


def test_automatic_workers_start_one_process_per_four_cases() -> None:
    from brats_psp.cpus import default_workers
    from brats_psp.data.preprocess import MIN_CASES_PER_WORKER, auto_workers

    assert auto_workers(0) == auto_workers(MIN_CASES_PER_WORKER * 2 - 1) == 1  # a worker would cost more than it saves
    assert auto_workers(MIN_CASES_PER_WORKER * 2) == min(2, default_workers())
    assert auto_workers(10_000) == default_workers()


def test_a_negative_worker_count_is_refused(small_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="workers"):
        preprocess_dataset(small_dataset, tmp_path / "cache", progress=False, workers=-1)
