"""New contrasts for a training slice, drawn from its stored appearance-class map (SynthSeg).

SynthSeg (Billot et al., Medical Image Analysis 2023) draws a new appearance for every
training sample from stored label maps, so that a few anatomies give endless images. The
built-in cases keep the class each voxel was drawn as (:func:`brats_psp.data.synthetic.appearance.class_map`:
CSF, grey and white matter, the structures that enhance but are not tumour, the lesion parts)
in their cache entries; :func:`rerender` draws the four contrasts of a batch of slabs from
them on the training device, with the generator's own appearance draw
(:func:`~brats_psp.data.synthetic.appearance.draw_appearance`: per-contrast class intensities
under the radiological constraints), then per contrast:

1. each class textured by a smooth field (its heterogeneity) plus fine noise;
2. a random power curve (γ in e^±0.3);
3. partial volume: a Gaussian blur in the plane (σ 0.2-1.0 pixel per axis);
4. a multiplicative bias field (log-amplitude up to 0.2);
5. Rician noise (1-5 % of white matter);
6. the z-score the preprocessing applies, with the mean and standard deviation that the
   whole volume would have (from the entry's voxel count of each class), not the slab's.

The other batch augmentations then apply to the new image as to a stored one
(:class:`~brats_psp.data.augment.BatchAugment`, ``data.rerender``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from brats_psp.data.augment import _smooth_field
from brats_psp.data.layouts import MODALITIES
from brats_psp.data.synthetic.appearance import CLASS_NAMES, draw_appearance

__all__ = ["rerender", "class_table"]


def class_table(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One appearance draw as tables over :data:`CLASS_NAMES`: ``(means, spread, noise)``,
    float64 (4, classes), (4, classes) and (4,), contrasts in MODALITIES order, relative to
    white matter = 1; the background (code 0) is 0."""
    app = draw_appearance(rng)
    means = np.zeros((len(MODALITIES), len(CLASS_NAMES)))
    spread = np.zeros_like(means)
    for c, modality in enumerate(MODALITIES):
        for k, name in enumerate(CLASS_NAMES[1:], start=1):
            means[c, k] = app.means[modality][name]
            spread[c, k] = app.spread[modality][name]
    noise = np.array([app.noise[m] for m in MODALITIES])
    return means, spread, noise


def _gauss_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur B x C x H x W ``x`` in the plane with σ (B x 2: along H, along W; pixels), per sample."""
    b, c = x.shape[:2]
    r = 3
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    kernels = torch.exp(-0.5 * (t[None, None, :] / sigma[:, :, None].clamp_min(1e-3)) ** 2)  # B x 2 x taps
    kernels = kernels / kernels.sum(-1, keepdim=True)
    kh = kernels[:, 0].repeat_interleave(c, 0)[:, None, :, None]  # (B·C) x 1 x taps x 1
    kw = kernels[:, 1].repeat_interleave(c, 0)[:, None, None, :]
    flat = x.reshape(1, b * c, *x.shape[-2:])
    flat = F.conv2d(F.pad(flat, (0, 0, r, r), mode="replicate"), kh, groups=b * c)
    flat = F.conv2d(F.pad(flat, (r, r, 0, 0), mode="replicate"), kw, groups=b * c)
    return flat.reshape_as(x)


def rerender(classes: torch.Tensor, class_voxels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Draw new contrasts for a batch of slabs.

    Args:
        classes: B x K x H x W appearance-class codes (:data:`CLASS_NAMES`) of K neighbour slices.
        class_voxels: B x N voxel count of each code in the slab's whole volume (N >= the
            codes present); a sample whose counts are all 0 has no class map and gets zeros.
        g: the batch's generator (every draw comes from it).

    Returns:
        B x 4K x H x W float32 z-scored contrasts on ``classes``'s device, neighbour-major
        (channel ``4 j + c`` is contrast ``c`` of slice ``j``, as the cache's slabs), 0 outside
        the brain (code 0).
    """
    b, k, h, w = classes.shape
    n = len(CLASS_NAMES)
    device = classes.device
    seeds = torch.randint(0, 2**62, (b,), generator=g).tolist()
    tables = [class_table(np.random.default_rng(s)) for s in seeds]
    means = torch.tensor(np.stack([t[0] for t in tables]), dtype=torch.float32)  # B x 4 x N
    spread = torch.tensor(np.stack([t[1] for t in tables]), dtype=torch.float32)
    noise = torch.tensor(np.stack([t[2] for t in tables]), dtype=torch.float32)  # B x 4
    gamma = torch.exp(0.6 * torch.rand(b, 4, 1, generator=g) - 0.3)
    ref = means.amax(-1, keepdim=True)
    means = (means / ref) ** gamma * ref  # the curve acts on the class means (its texture follows them)
    counts = torch.zeros(b, n)
    m = min(n, class_voxels.shape[1])
    counts[:, :m] = class_voxels[:, :m].float().cpu()
    counts[:, 0] = 0
    # The volume's mean and standard deviation of each contrast (texture variance included).
    total = counts.sum(-1, keepdim=True).clamp_min(1)  # B x 1
    mu = (means * counts[:, None]).sum(-1) / total
    second = (means.square() * (1 + spread.square()) * counts[:, None]).sum(-1) / total
    sd = (second - mu.square()).clamp_min(1e-6).sqrt()  # B x 4

    codes = classes.long().reshape(b, 1, k * h * w).expand(b, 4, -1)
    to = dict(device=device, dtype=torch.float32)
    value = torch.gather(means.to(**to), 2, codes).reshape(b, 4, k, h, w)
    het = torch.gather(spread.to(**to), 2, codes).reshape(b, 4, k, h, w)
    texture = (_smooth_field(b, 1, (h, w), g, cells=12) + 0.5 * torch.randn(b, 1, h, w, generator=g)).to(**to)
    x = value * (1 + het * texture[:, :, None])
    x = x.permute(0, 2, 1, 3, 4).reshape(b, k * 4, h, w)  # neighbour-major
    inside = (classes > 0).repeat_interleave(4, dim=1)
    sigma = (0.2 + 0.8 * torch.rand(b, 2, generator=g)).to(**to)
    mask = inside.to(x.dtype)
    x = _gauss_blur(x * mask, sigma) / _gauss_blur(mask, sigma).clamp_min(1e-3)
    bias = torch.exp(0.2 * torch.rand(b, 1, 1, 1, generator=g) * _smooth_field(b, 1, (h, w), g, cells=4)).to(**to)
    x = x * bias
    sd_noise = noise.repeat(1, k)[:, :, None, None].to(**to)
    real = x + sd_noise * torch.randn(x.shape, generator=g).to(**to)
    imag = sd_noise * torch.randn(x.shape, generator=g).to(**to)
    x = torch.sqrt(real.square() + imag.square())
    z = (x - mu.repeat(1, k)[:, :, None, None].to(**to)) / sd.repeat(1, k)[:, :, None, None].to(**to)
    has_map = (counts.sum(-1) > 0).to(device)[:, None, None, None]
    return torch.where(inside & has_map, z, torch.zeros((), **to))
