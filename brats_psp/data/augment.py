"""Training augmentations of a whole batch at once, in torch, on the device the network trains on.

The loader only crops each slice (:func:`brats_psp.data.slices.slice_transforms`); the rest
runs here on the batch, in the order MONAI's dictionary transforms would apply it per slice,
with the same distributions:

====================  =====================================================  ============
step                  what (per slice)                                       probability
====================  =====================================================  ============
flip                  along H, then along W (``RandFlipd``)                  ``data.flip_prob`` each
rotation and scale    one angle in ±``rotate_deg``, a scale per axis in      0.5
                      1 ± ``scale_range``; bilinear image, nearest label,
                      zero padding (``RandAffined``)
intensity scale       × (1 + U(±``intensity_scale``)) per channel            0.5
                      (``RandScaleIntensityd``)
intensity shift       + U(±``intensity_shift``) per channel                  0.5
                      (``RandShiftIntensityd``)
gamma                 γ in ``gamma_range`` on the min-max-scaled slice,      0.3
                      mean and std kept (``RandAdjustContrastd``)
Gaussian noise        σ = ``noise_std``                                      0.3
====================  =====================================================  ============

Why not per slice in the loader: on the 2-core benchmark machine MONAI's per-slice chain
cost 2.2 to 3.3 ms a slice on one core (profiled), in the time of the training step; on whole
batches the data path went from 0.845 to 0.92 of the in-memory step rate (fp32 steps,
``benchmarks/training.py``). With a GPU it runs there, and the loader's workers only read and crop.
With the two steps below, the smooth fields as matrix products, flips per slice, the scale and
shift on the whole batch and plain-pass statistics (the same outputs to 1e-4) take a batch of 16
12 × 128 × 128 slices (2.5D) 39.1 ms on both cores, against 59.6 ms for the per-step gathers
and ``F.interpolate`` of 857031b: 1.53× (``benchmarks/augment.py --against 857031b``).

With ``data.rerender`` > 0, that share of the slices first gets new contrasts drawn from its
stored appearance-class map (:mod:`brats_psp.data.rerender`, built-in cases only), and the
steps above and below apply to them. Two steps that MONAI has no transform for come last, both for transfer to real scans (the
SynthSeg lesson: appearance randomised per sample, far wider than real scans vary):

====================  =====================================================  ====================
step                  what (per slice)                                       probability
====================  =====================================================  ====================
lesion appearance     each lesion part (edema, non-enhancing core, enhancing  ``data.lesion_appearance``
                      tumour, from the labels, edges softened over 3 pixels)
                      shifted per contrast by a draw from
                      :data:`LESION_SHIFTS` (z-score units), textured; the
                      robust cues are kept (edema stays bright on FLAIR and
                      T2, the core does not enhance, and moves on its own
                      only on slices with enhancing tumour, elsewhere with
                      the edema); enhancing tumour
                      moves both ways on T1ce (faint to strong)
bias field            a smooth additive field per channel, amplitude up to   0.5
                      ``data.bias_field``, inside the brain
====================  =====================================================  ====================

Every draw comes from one seed per batch (see :func:`batch_seed`): a resumed run repeats it.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from brats_psp.config import DataConfig

__all__ = ["BatchAugment", "affine_warp", "batch_seed"]

#: Probabilities of the steps without a config key (MONAI's usual choices, as before).
AFFINE_PROB, SCALE_PROB, SHIFT_PROB, GAMMA_PROB, NOISE_PROB = 0.5, 0.5, 0.5, 0.3, 0.3
BIAS_PROB = 0.5

#: Shift ranges (z-score units) of each lesion part, per contrast in MODALITIES order
#: (T1, T1ce, T2, FLAIR). Edema may get darker only a little on FLAIR and T2 (it stays
#: bright there); the non-enhancing core moves freely on T2/FLAIR (necrosis, cyst or solid
#: tumour: from dark to as bright as edema) but barely up on T1ce; enhancing tumour moves
#: both ways on T1ce (real enhancement can be faint: about 1 standard deviation of the brain).
LESION_SHIFTS: dict[str, tuple[tuple[float, float], ...]] = {
    "ed": ((-0.5, 0.3), (-0.5, 0.3), (-0.3, 0.8), (-0.3, 0.8)),
    "ncr": ((-1.0, 0.5), (-1.0, 0.2), (-1.0, 1.0), (-1.5, 1.2)),
    "et": ((-0.5, 0.5), (-0.8, 0.8), (-0.5, 0.5), (-0.5, 0.5)),
}


def batch_seed(seed: int, epoch: int, step: int, rank: int = 0) -> int:
    """The augmentation seed of one batch: a function of (train seed, epoch, step, rank) alone."""
    return (seed * 1_000_003 + epoch * 10_007 + step * 101 + rank * 7_919) % 2**63


def affine_warp(x: torch.Tensor, angles: torch.Tensor, scales: torch.Tensor, mode: str) -> torch.Tensor:
    """Rotate (radians) and scale B × C × H × W slices about their centre, in pixel units.

    Output pixel ``p`` (centred) samples the input at ``R(angle) · diag(scale) · p``, as MONAI's
    ``Affine`` does; ``scales`` is B × 2 in (H, W) order. Zero padding outside the slice.
    """
    b, _, h, w = x.shape
    cos, sin = torch.cos(angles), torch.sin(angles)
    sh, sw = scales[:, 0], scales[:, 1]
    # pixel-space matrix in (row, col) = (H, W) coordinates: R @ S
    m = torch.stack([torch.stack([cos * sh, -sin * sw], -1), torch.stack([sin * sh, cos * sw], -1)], -2)
    # affine_grid works in (x, y) = (W, H) order on coordinates normalised by the size
    # (align_corners=False: n = 2c / size for a centred pixel coordinate c)
    to_xy = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=m.dtype, device=m.device)
    norm = torch.diag(torch.tensor([2.0 / w, 2.0 / h], dtype=m.dtype, device=m.device))
    unnorm = torch.diag(torch.tensor([w / 2.0, h / 2.0], dtype=m.dtype, device=m.device))
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, :, :2] = norm @ to_xy @ m @ to_xy @ unnorm
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


class BatchAugment:
    """The training augmentations (table above) of ``{"image", "label", "presence"}`` batches.

    ``image`` B × C × H × W float, ``label`` B × 3 × H × W region masks, on any device;
    ``presence`` (the auxiliary head's targets) is recomputed from the augmented labels.
    """

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg

    def __call__(self, batch: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        if not self.cfg.augment:
            return batch
        cfg = self.cfg
        image, label = batch["image"], batch["label"]
        b, c = image.shape[:2]
        g = torch.Generator().manual_seed(seed)  # parameters are drawn on the CPU, then moved

        def chosen(p: float) -> torch.Tensor:
            return torch.nonzero(torch.rand(b, generator=g) < p).flatten().to(image.device)

        def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
            return (low + (high - low) * torch.rand(*shape, generator=g, dtype=torch.float64)).to(image.device, image.dtype)

        image, label = image.clone(), label.clone()
        if cfg.rerender > 0 and "classes" in batch and len(i := chosen(cfg.rerender)):  # first: the rest applies to the new image
            i = i[batch["class_voxels"][i].sum(1) > 0]  # slices of a case without a class map keep their contrasts
            if len(i):
                from brats_psp.data.rerender import rerender  # here: it imports this module's smooth fields

                image[i] = rerender(batch["classes"][i], batch["class_voxels"][i], g).to(image.dtype)
        if cfg.flip_prob > 0:  # along H, then along W; a slice chosen for both is flipped once along both
            dims: list[list[int]] = [[] for _ in range(b)]
            for dim in (-2, -1):
                for j in chosen(cfg.flip_prob).tolist():
                    dims[j].append(dim)
            for j, flip in enumerate(dims):
                if flip:
                    image[j], label[j] = image[j].flip(flip), label[j].flip(flip)
        if (cfg.rotate_deg > 0 or cfg.scale_range > 0) and len(i := chosen(AFFINE_PROB)):
            angles = uniform(-math.radians(cfg.rotate_deg), math.radians(cfg.rotate_deg), len(i)).float()
            scales = uniform(1 - cfg.scale_range, 1 + cfg.scale_range, len(i), 2).float()
            image[i] = affine_warp(image[i], angles, scales, "bilinear")
            label[i] = affine_warp(label[i], angles, scales, "nearest")
        # A step on some of the slices runs on the whole batch where that is cheaper than gathering
        # them (factor 1 or offset 0 elsewhere): the same numbers.
        if cfg.intensity_scale > 0 and len(i := chosen(SCALE_PROB)):
            factor = torch.ones(b, c, dtype=image.dtype, device=image.device)
            factor[i] = 1 + uniform(-cfg.intensity_scale, cfg.intensity_scale, len(i), c)
            image *= factor[..., None, None]
        if cfg.intensity_shift > 0 and len(i := chosen(SHIFT_PROB)):
            offset = torch.zeros(b, c, dtype=image.dtype, device=image.device)
            offset[i] = uniform(-cfg.intensity_shift, cfg.intensity_shift, len(i), c)
            image += offset[..., None, None]
        low, high = cfg.gamma_range
        if (low, high) != (1.0, 1.0) and len(i := chosen(GAMMA_PROB)):
            image[i] = _gamma(image[i], uniform(low, high, len(i)))
        if cfg.noise_std > 0 and len(i := chosen(NOISE_PROB)):
            noise = torch.randn(len(i), *image.shape[1:], generator=g).to(image.device, image.dtype)
            image[i] += noise * cfg.noise_std
        if cfg.lesion_appearance > 0 and len(i := chosen(cfg.lesion_appearance)):
            image[i] = _lesion_appearance(image[i], label[i], g)
        if cfg.bias_field > 0 and len(i := chosen(BIAS_PROB)):
            amp = uniform(0.0, cfg.bias_field, len(i), c)[..., None, None]
            field = _smooth_field(len(i), c, image.shape[-2:], g).to(image.device, image.dtype)
            image[i] += amp * field * (image[i] != 0)
        presence = label.flatten(2).amax(2)
        return {**batch, "image": image, "label": label, "presence": presence}


@functools.lru_cache(maxsize=32)
def _bicubic_weights(cells: int, n: int) -> torch.Tensor:
    """n x cells float32: the weights with which ``F.interpolate(mode="bicubic",
    align_corners=True)`` takes ``n`` points from ``cells`` along one axis (bicubic is separable)."""
    columns = torch.eye(cells, dtype=torch.float64).reshape(cells, 1, cells, 1)
    return F.interpolate(columns, size=(n, 1), mode="bicubic", align_corners=True)[:, 0, :, 0].T.float().contiguous()


def _smooth_field(b: int, c: int, size: torch.Size | tuple[int, int], g: torch.Generator, cells: int = 5) -> torch.Tensor:
    """B x C x H x W smooth random fields (unit-variance values on a ``cells`` x ``cells`` grid, bicubic).

    Bicubic interpolation as two small matrix products (``rows @ low @ cols.T``): the same field
    as ``F.interpolate`` to float rounding, 5-30x faster on a CPU for these tiny grids.
    """
    low = torch.randn(b, c, cells, cells, generator=g)
    rows, cols = _bicubic_weights(cells, int(size[0])), _bicubic_weights(cells, int(size[1]))
    return rows @ low @ cols.T


def _lesion_appearance(image: torch.Tensor, label: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Shift each lesion part's intensities per channel by a draw from ``LESION_SHIFTS`` (see the table above).

    ``label`` holds the region masks (WT, TC, ET); the parts are ET, the core without ET, and
    WT without the core. A channel ``k`` is contrast ``k % 4`` (2.5D slabs are neighbour-major).
    """
    b, c = image.shape[:2]
    wt, tc, et = label[:, 0:1], label[:, 1:2], label[:, 2:3]
    # The core's intensities move on their own only on slices with enhancing tumour, whose rim
    # marks the core; without it (low-grade tumours) its contrast to edema is the only cue, so
    # there the core moves with the edema (the whole tumour shifts as one, keeping that contrast).
    has_et = et.flatten(1).amax(1)[:, None, None, None]
    parts = {"ed": wt * (1 - tc * has_et), "ncr": tc * (1 - et) * has_et, "et": et}
    texture = 1.0 + 0.4 * _smooth_field(b, 1, image.shape[-2:], g, cells=12).to(image.device, image.dtype)
    inside = image.abs().sum(1, keepdim=True) > 0
    modality = torch.arange(c) % 4  # one shift per contrast, the same on its neighbour slices
    shifts = []
    for name in parts:
        low, high = torch.tensor(LESION_SHIFTS[name], dtype=torch.float64).T
        shifts.append((low + (high - low) * torch.rand(b, 4, generator=g, dtype=torch.float64))[:, modality])
    shift = torch.stack(shifts, 1).to(image.device, image.dtype)  # B x parts x C
    masks = torch.cat(list(parts.values()), 1).to(image.dtype)  # B x parts x H x W
    soft = _box3(masks) * texture  # edges softened over 3 pixels
    return torch.where(inside, image + torch.einsum("bpc,bphw->bchw", shift, soft), image)


def _box3(x: torch.Tensor) -> torch.Tensor:
    """3 x 3 mean of B x C x H x W with zero padding (``F.avg_pool2d(x, 3, 1, 1)``), as two
    separable sums of shifted views: the same values, several times faster on a CPU."""
    p = F.pad(x, (1, 1, 1, 1))
    rows = p[..., :-2, :] + p[..., 1:-1, :] + p[..., 2:, :]
    return (rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]) / 9.0


def _std_mean(x: torch.Tensor, keepdim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased standard deviation and mean over dimension 1 of B x N ``x`` (``torch.std_mean``'s
    values, in two plain passes, which are several times faster on a CPU)."""
    mean = x.mean(1, keepdim=True)
    std = ((x - mean).square().sum(1, keepdim=True) / (x.shape[1] - 1)).sqrt()
    return (std, mean) if keepdim else (std[:, 0], mean[:, 0])


def _gamma(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """MONAI's ``AdjustContrast(retain_stats=True)`` per slice: min-max scale, ^gamma, rescale,
    then restore the slice's mean and std."""
    flat = x.flatten(1)
    std, mean = _std_mean(flat)
    low, high = torch.aminmax(flat, dim=1)
    span = (high - low)[:, None]
    y = ((flat - low[:, None]) / (span + 1e-7)).clamp_min(0) ** gamma[:, None] * span + low[:, None]
    y_std, y_mean = _std_mean(y, keepdim=True)
    y = (y - y_mean) / (y_std + 1e-8) * std[:, None] + mean[:, None]
    return y.view_as(x)
