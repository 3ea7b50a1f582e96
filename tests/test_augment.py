"""Batch augmentations: MONAI's geometry, the configured probabilities, consistent targets, seeds."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from monai.transforms import Affine

from brats_psp.config import DataConfig
from brats_psp.data import augment as aug
from brats_psp.data.augment import BatchAugment, affine_warp, batch_seed

NOTHING = DataConfig(
    flip_prob=0.0, rotate_deg=0.0, scale_range=0.0, intensity_scale=0.0, intensity_shift=0.0, gamma_range=[1.0, 1.0], noise_std=0.0,
    lesion_appearance=0.0, bias_field=0.0,
)


def _batch(b: int = 8, h: int = 40, w: int = 48, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.avg_pool2d(torch.randn(b, 4, h + 4, w + 4, generator=g), 5, stride=1) * 3
    label = torch.zeros(b, 3, h, w)
    label[:, 0, 10:30, 12:40] = 1
    label[:, 1, 14:26, 16:34] = 1
    label[:, 2, 16:22, 20:28] = 1
    return {"image": image, "label": label, "presence": torch.ones(b, 3), "case_id": ["x"] * b}


@pytest.mark.parametrize("angle, scales", [(0.25, (1.0, 1.0)), (-0.2, (1.1, 0.9)), (0.0, (0.92, 1.08))])
def test_affine_warp_is_monais_affine(angle: float, scales: tuple[float, float]) -> None:
    """Same rotation direction, scale axes and pixel centres as MONAI's Affine, on a non-square slice."""
    image = _batch(1)["image"][0]
    monai = Affine(rotate_params=angle, scale_params=scales, mode="bilinear", padding_mode="zeros", image_only=True)(image)
    ours = affine_warp(image[None], torch.tensor([angle]), torch.tensor([scales]), "bilinear")[0]
    inner = (slice(None), slice(6, -6), slice(6, -6))
    torch.testing.assert_close(ours[inner], torch.as_tensor(monai)[inner], atol=1e-4, rtol=1e-4)


def test_flips_are_exact_and_labels_follow() -> None:
    batch = _batch()
    out = BatchAugment(dataclasses.replace(NOTHING, flip_prob=1.0))(batch, seed=0)
    torch.testing.assert_close(out["image"], batch["image"].flip(-2).flip(-1))
    torch.testing.assert_close(out["label"], batch["label"].flip(-2).flip(-1))
    assert batch["image"] is not out["image"]  # the input batch is left as it was


def test_augmented_targets_stay_binary_and_presence_follows_them() -> None:
    batch = _batch(32)
    cfg = DataConfig(rotate_deg=40.0, scale_range=0.3)
    out = BatchAugment(cfg)(batch, seed=3)
    assert out["image"].shape == batch["image"].shape and out["label"].shape == batch["label"].shape
    assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(out["presence"], out["label"].flatten(2).amax(2))
    # the regions stay nested (ET inside TC inside WT) through rotation and nearest sampling
    wt, tc, et = out["label"].unbind(1)
    assert bool((tc <= wt).all()) and bool((et <= tc).all())
    assert out["case_id"] == batch["case_id"]


def test_the_same_seed_repeats_a_batch_and_another_seed_does_not() -> None:
    batch = _batch(16)
    augment = BatchAugment(DataConfig())
    a, b, c = augment(batch, 11), augment(batch, 11), augment(batch, 12)
    torch.testing.assert_close(a["image"], b["image"])
    assert not torch.equal(a["image"], c["image"])
    assert batch_seed(0, 1, 2) == batch_seed(0, 1, 2) != batch_seed(0, 2, 1)


def test_no_augmentation_when_disabled() -> None:
    batch = _batch()
    out = BatchAugment(DataConfig(augment=False))(batch, seed=0)
    assert out is batch


@pytest.mark.parametrize(
    "change, probability",
    [
        ({"rotate_deg": 15.0}, aug.AFFINE_PROB),
        ({"intensity_scale": 0.1}, aug.SCALE_PROB),
        ({"intensity_shift": 0.1}, aug.SHIFT_PROB),
        ({"gamma_range": [0.8, 1.25]}, aug.GAMMA_PROB),
        ({"noise_std": 0.05}, aug.NOISE_PROB),
        ({"flip_prob": 0.2}, 1 - 0.8**2),
    ],
)
def test_each_step_touches_the_configured_share_of_slices(change: dict, probability: float) -> None:
    batch = _batch(400, 24, 24)
    out = BatchAugment(dataclasses.replace(NOTHING, **change))(batch, seed=5)
    changed = (out["image"] - batch["image"]).flatten(1).abs().amax(1) > 1e-6
    assert float(changed.float().mean()) == pytest.approx(probability, abs=0.07)


def test_gamma_keeps_each_slices_mean_and_std() -> None:
    batch = _batch(64)
    out = BatchAugment(dataclasses.replace(NOTHING, gamma_range=[0.7, 1.4]))(batch, seed=1)
    changed = (out["image"] - batch["image"]).flatten(1).abs().amax(1) > 1e-6
    assert changed.any()
    x, y = batch["image"][changed].flatten(1), out["image"][changed].flatten(1)
    torch.testing.assert_close(y.mean(1), x.mean(1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y.std(1), x.std(1), atol=1e-4, rtol=1e-4)


def test_rotation_angles_cover_the_configured_range() -> None:
    """Rotating a horizontal bar by the drawn angles: the measured angles span ±rotate_deg."""
    b, size = 256, 64
    label = torch.zeros(b, 3, size, size)
    label[:, :, size // 2 - 1 : size // 2 + 1, 8:-8] = 1
    batch = {"image": label[:, :1].repeat(1, 4, 1, 1).clone(), "label": label, "presence": torch.ones(b, 3)}
    out = BatchAugment(dataclasses.replace(NOTHING, rotate_deg=15.0))(batch, seed=2)
    angles = []
    for mask in out["label"][:, 0]:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(xs) > 10:
            angles.append(math.degrees(math.atan(np.polyfit(xs.numpy(), ys.numpy(), 1)[0])))
    angles = np.abs(angles)
    assert angles.max() < 16.5 and angles.max() > 12 and (angles > 1).mean() == pytest.approx(aug.AFFINE_PROB, abs=0.1)


def test_noise_has_the_configured_std() -> None:
    batch = _batch(64)
    out = BatchAugment(dataclasses.replace(NOTHING, noise_std=0.05))(batch, seed=4)
    diff = (out["image"] - batch["image"]).flatten(1)
    noisy = diff.abs().amax(1) > 0
    assert float(diff[noisy].std()) == pytest.approx(0.05, rel=0.05) and out["image"].dtype == torch.float32


def test_lesion_appearance_moves_lesion_parts_within_their_ranges_only() -> None:
    from brats_psp.data.augment import LESION_SHIFTS, _lesion_appearance

    b, h, w = 64, 32, 32
    image = torch.ones(b, 8, h, w)  # 2.5D with one neighbour each side would be 12; 8 = two slabs of 4
    label = torch.zeros(b, 3, h, w)
    label[:, 0, 4:28, 4:28] = 1  # WT
    label[:, 1, 10:22, 10:22] = 1  # TC
    label[:, 2, 10:22, 10:13] = 1  # ET: a strip of the core
    out = _lesion_appearance(image, label, torch.Generator().manual_seed(0))
    diff = out - image
    assert (diff[..., :2, :] == 0).all() and (diff[..., :, :2] == 0).all()  # outside the lesion: unchanged
    # Deep inside each part, the shift lies in its range (times the texture, 1 +- 0.4 x field).
    for name, (y, x) in {"ed": (6, 6), "ncr": (16, 18), "et": (16, 11)}.items():
        for ch in range(8):
            low, high = LESION_SHIFTS[name][ch % 4]
            vals = diff[:, ch, y, x]
            assert (vals >= low * 2.2 - 1e-6).all() and (vals <= high * 2.2 + 1e-6).all(), (name, ch)
            assert vals.std() > 0.05, (name, ch)  # drawn per slice
        # The same contrast in both slabs gets the same shift (up to the shared texture).
        np.testing.assert_allclose(diff[:, 1, y, x].numpy(), diff[:, 5, y, x].numpy(), atol=1e-6)
    # The non-enhancing core never gets much brighter on T1ce (channel 1); edema never much darker on FLAIR (3).
    assert diff[:, 1, 16, 18].max() < 0.2 * 1.4 + 1e-6 and diff[:, 3, 6, 6].min() > -0.3 * 1.4 - 1e-6


def test_bias_field_is_smooth_and_stays_inside_the_brain() -> None:
    batch = _batch(16)
    batch["image"][:, :, :, :5] = 0.0  # outside the brain
    out = BatchAugment(dataclasses.replace(NOTHING, bias_field=0.3))(batch, seed=1)
    diff = out["image"] - batch["image"]
    assert (diff[..., :5] == 0).all()
    changed = diff.flatten(1).abs().amax(1) > 0
    assert 0.2 < changed.float().mean() < 0.8  # probability BIAS_PROB = 0.5
    assert diff.abs().max() <= 0.3 * 4.0  # amplitude x a unit-variance field
    # Smooth: neighbouring pixels differ far less than the field itself varies.
    inner = diff[..., 5:]
    assert (inner[..., 1:] - inner[..., :-1]).abs().max() < 0.25 * inner.abs().max()  # white noise: ~1


def test_lesion_appearance_moves_a_core_without_enhancing_tumour_with_its_edema() -> None:
    # On a low-grade tumour's slice (a core, no ET) the core's contrast to edema is the only cue
    # that tells them apart: the whole tumour gets one shift per contrast, so that contrast stays.
    from brats_psp.data.augment import _lesion_appearance

    image = torch.ones(16, 4, 32, 32)
    image[:, :, 10:22, 10:22] = 1.5  # the core 0.5 brighter than the edema
    label = torch.zeros(16, 3, 32, 32)
    label[:, 0, 4:28, 4:28] = 1
    label[:, 1, 10:22, 10:22] = 1
    diff = _lesion_appearance(image, label, torch.Generator().manual_seed(0)) - image
    core, edema = diff[..., 15, 15], diff[..., 7, 7]  # 8 pixels apart, the same draw
    moved = edema.abs() > 0.05
    assert moved.float().mean() > 0.5 and (core.abs() > 0.02).float().mean() > 0.5  # both move
    assert (torch.sign(core[moved]) == torch.sign(edema[moved])).all()  # together, not apart
    # the core stays about 0.5 brighter than its edema: the contrast changes only by the slowly
    # varying texture, on average by less than half the shift (a core left alone: by all of it)
    after = (image + diff)[..., 15, 15] - (image + diff)[..., 7, 7]
    assert float((after - 0.5).abs().mean()) < 0.5 * float(edema.abs().mean())


def test_smooth_field_is_bicubic_interpolation_of_its_grid() -> None:
    # The matrix form of the fields (bias, lesion texture) gives F.interpolate's bicubic field
    # from the same grid draws, also on a non-square slice.
    import torch.nn.functional as F

    from brats_psp.data.augment import _smooth_field

    for cells, size in ((5, (128, 128)), (12, (96, 160))):
        field = _smooth_field(3, 2, size, torch.Generator().manual_seed(4), cells=cells)
        low = torch.randn(3, 2, cells, cells, generator=torch.Generator().manual_seed(4))
        expected = F.interpolate(low, size=size, mode="bicubic", align_corners=True)
        assert field.shape == (3, 2, *size)
        torch.testing.assert_close(field, expected, atol=1e-5, rtol=1e-5)


def test_box_mean_and_statistics_match_torch() -> None:
    # The faster forms in the batch augmentations give torch's own values.
    import torch.nn.functional as F

    from brats_psp.data.augment import _box3, _std_mean

    x = torch.rand(4, 3, 20, 33, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_box3(x), F.avg_pool2d(x, 3, stride=1, padding=1))
    flat = x.flatten(1)
    std, mean = _std_mean(flat)
    torch.testing.assert_close(std, flat.std(1))
    torch.testing.assert_close(mean, flat.mean(1))
    std_k, mean_k = _std_mean(flat, keepdim=True)
    assert std_k.shape == mean_k.shape == (4, 1)
