"""Cached volumes -> training slices: targets, 2.5D context, augmentations, the tumour-ratio sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from brats_psp.config import DataConfig
from brats_psp.data.preprocess import preprocess_dataset
from brats_psp.data.cache import split_cases
from brats_psp.data.slices import SliceDataset, TumourRatioSampler, random_states, slice_transforms
from brats_psp.labels import REGION_NAMES, Tissue, tissue_to_regions


@pytest.fixture
def cache(small_dataset: Path, tmp_path: Path) -> Path:
    preprocess_dataset(small_dataset, tmp_path / "cache", DataConfig(folds=3), progress=False)
    return tmp_path / "cache"


def test_split_follows_the_fold(cache: Path) -> None:
    train, val = split_cases(cache, fold=0)
    assert len(train) + len(val) == 6 and len(val) == 2
    assert not set(train) & set(val)


def test_samples_and_presence_targets_match_the_slice(cache: Path) -> None:
    train, _ = split_cases(cache, fold=0)
    ds = SliceDataset(train, transform=slice_transforms(DataConfig(slice_size=[48, 48]), train=False))
    assert len(ds) == sum(np.load(d / "label.npy", mmap_mode="r").shape[0] for d in train)
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].shape == (4, 48, 48) and s["label"].shape == (3, 48, 48)
        vol = ds.volumes[ds.index[i][0]]
        tissue = np.asarray(vol.label[s["z"]])
        expected = [np.isin(tissue, [int(t) for t in ts]).any() for ts in ([1, 2, 3], [1, 3], [3])]
        assert s["presence"].tolist() == [float(e) for e in expected]
        assert s["presence"].tolist() == ds.presence[i].astype(float).tolist()
    # regions are nested: ET inside TC inside WT
    lab = torch.stack([ds[i]["label"] for i in range(len(ds))])
    assert torch.all(lab[:, 2] <= lab[:, 1]) and torch.all(lab[:, 1] <= lab[:, 0])


def test_context_slices_stack_neighbours(cache: Path) -> None:
    train, _ = split_cases(cache, fold=0)
    plain = SliceDataset(train[:1])
    ctx = SliceDataset(train[:1], context_slices=1)
    s = ctx[5]
    assert s["image"].shape[0] == 12
    torch.testing.assert_close(s["image"][4:8], plain[5]["image"])  # the centre slice in the middle
    torch.testing.assert_close(s["image"][0:4], plain[4]["image"])
    first = ctx[0]["image"]
    torch.testing.assert_close(first[0:4], first[4:8])  # edge slice repeated


def test_random_crops_keep_targets_consistent(cache: Path) -> None:
    train, _ = split_cases(cache, fold=0)
    ds = SliceDataset(train, transform=slice_transforms(DataConfig(slice_size=[16, 16]), train=True))
    centre = SliceDataset(train, transform=slice_transforms(DataConfig(slice_size=[16, 16]), train=False))
    changed = 0
    for k, i in enumerate(np.flatnonzero(ds.has_tumour)[:20]):
        s = ds[(int(i), k)]
        assert s["image"].shape == (4, 16, 16) and s["label"].shape == (3, 16, 16)
        assert set(torch.unique(s["label"]).tolist()) <= {0.0, 1.0}
        assert s["presence"].tolist() == s["label"].flatten(1).amax(1).tolist()
        changed += int(not torch.equal(s["label"], centre[int(i)]["label"]))
    assert changed > 0  # the crops moved


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.8, 1.0])
def test_sampler_draws_the_tumour_ratio(ratio: float) -> None:
    has_tumour = np.zeros(1000, bool)
    has_tumour[::10] = True  # 10 % of slices contain tumour
    sampler = TumourRatioSampler(has_tumour, num_samples=2000, ratio=ratio, seed=1)
    picks = np.fromiter((i for i, _ in sampler), int)
    assert len(picks) == 2000
    assert has_tumour[picks].mean() == pytest.approx(ratio, abs=1e-3)


def test_sampler_epochs_and_shards() -> None:
    has_tumour = np.arange(100) % 3 == 0
    a = TumourRatioSampler(has_tumour, 64, 0.5, seed=2)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    a.set_epoch(0)
    assert list(a) == first
    shards = [list(TumourRatioSampler(has_tumour, 64, 0.5, seed=2, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 32
    assert sorted(shards[0] + shards[1]) == sorted(first)


def test_a_sample_seed_fixes_its_crop_whatever_the_transform_drew_before(cache: Path) -> None:
    train, _ = split_cases(cache, fold=0)
    cfg = DataConfig(slice_size=[16, 16])
    a = SliceDataset(train, transform=slice_transforms(cfg, train=True))
    b = SliceDataset(train, transform=slice_transforms(cfg, train=True))
    assert len(random_states(a.transform)) >= 2  # the crop's and the cropper's inside it
    i = int(np.flatnonzero(a.has_tumour)[0])
    for _ in range(3):
        b[(i + 1, 99)]  # b's transforms have drawn other numbers before
    first, again, other = a[(i, 7)], b[(i, 7)], a[(i, 8)]
    torch.testing.assert_close(first["image"], again["image"])
    torch.testing.assert_close(first["label"], again["label"])
    assert not torch.equal(first["image"], other["image"])


def test_compact_samples_hold_the_same_values_in_fewer_bytes(cache: Path) -> None:
    """What a training loader sends (float16 image, uint8 masks) is, once on the device as
    float32, exactly the float32 sample, crop and all."""
    from brats_psp.runtime import setup_runtime
    from brats_psp.training import to_device

    train, _ = split_cases(cache, fold=0)
    cfg = DataConfig(slice_size=[16, 16], context_slices=1)
    plain = SliceDataset(train, 1, slice_transforms(cfg, train=True))
    compact = SliceDataset(train, 1, slice_transforms(cfg, train=True), compact=True)
    runtime = setup_runtime("cpu", "fp32", 1)
    for i in (0, int(np.flatnonzero(plain.has_tumour)[0])):
        a, b = plain[(i, 5)], compact[(i, 5)]
        assert b["image"].dtype == torch.float16 and b["label"].dtype == torch.uint8
        assert b["image"].nbytes * 2 == a["image"].nbytes and b["label"].nbytes * 4 == a["label"].nbytes
        on_device = to_device({k: v[None] if isinstance(v, torch.Tensor) else v for k, v in b.items()}, runtime)
        for key in ("image", "label", "presence"):
            assert on_device[key].dtype == torch.float32
            assert torch.equal(on_device[key][0], a[key]), key


def test_loader_batches_do_not_depend_on_the_workers(cache: Path) -> None:
    """Per-sample seeds: 0 workers, and 2 persistent workers over two epochs, give the same batches."""
    from torch.utils.data import DataLoader

    train, _ = split_cases(cache, fold=0)
    ds = SliceDataset(train, transform=slice_transforms(DataConfig(slice_size=[16, 16]), train=True))
    sampler = TumourRatioSampler(ds.has_tumour, 12, 0.5, seed=3)

    def epochs(workers: int) -> list[torch.Tensor]:
        loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=workers, persistent_workers=workers > 0)
        out = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            out += [b["image"] for b in loader]
        return out

    main, workers = epochs(0), epochs(2)
    assert len(main) == len(workers) == 6
    for x, y in zip(main, workers):
        torch.testing.assert_close(x, y)
    assert not torch.equal(main[0], main[3])  # epochs differ


def test_sampler_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="ratio must be in"):
        TumourRatioSampler(np.ones(3, bool), 4, 1.5)
    with pytest.raises(ValueError, match="rank 2"):
        TumourRatioSampler(np.ones(3, bool), 4, 0.5, rank=2, world_size=2)


def test_region_names_order() -> None:
    assert REGION_NAMES == ("WT", "TC", "ET") and Tissue.ET == 3


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_slices_of_every_plane_match_what_inference_sees(cache: Path, plane: str) -> None:
    """Training slices (and 2.5D context) along each plane are the slices SliceInferer cuts."""
    from brats_psp.data.geometry import PLANE_AXES
    from brats_psp.inference import add_context

    train, _ = split_cases(cache, fold=0)
    ds = SliceDataset(train[:1], context_slices=1, planes=[plane])
    vol = ds.volumes[0]
    volume = torch.from_numpy(np.asarray(vol.image, dtype=np.float32)).permute(1, 2, 3, 0)  # (4, X, Y, Z)
    tissue = torch.from_numpy(np.asarray(vol.label)).permute(1, 2, 0)  # (X, Y, Z)
    axis = PLANE_AXES[plane]
    assert len(ds) == volume.shape[axis + 1]
    with_context = add_context(volume, 1, axis)
    for i in (0, len(ds) // 2, len(ds) - 1):
        s = ds[i]
        torch.testing.assert_close(s["image"], with_context.select(axis + 1, i))
        regions = torch.from_numpy(tissue_to_regions(tissue.select(axis, i).numpy()).astype(np.float32))
        torch.testing.assert_close(s["label"], regions)
        assert s["presence"].tolist() == ds.presence[i].astype(float).tolist()


@pytest.mark.parametrize("shape", [(4, 100, 121), (3, 128, 90), (4, 130, 140), (1, 5, 7)])
def test_pad_to_size_equals_monai_spatial_pad(shape: tuple[int, int, int]) -> None:
    from monai.transforms import SpatialPad, SpatialPadd

    from brats_psp.data.slices import PadToSize, PadToSized

    x = torch.randn(shape)
    expected = SpatialPadd(keys=["image"], spatial_size=(128, 128))({"image": x})["image"]
    torch.testing.assert_close(PadToSized(keys=["image"], size=(128, 128))({"image": x})["image"], torch.as_tensor(expected))
    torch.testing.assert_close(PadToSize((128, 128))(x), torch.as_tensor(SpatialPad(spatial_size=(128, 128))(x)))
