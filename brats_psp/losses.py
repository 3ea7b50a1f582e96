"""Training loss of the PSPNets: segmentation (Dice + cross-entropy), class head, deep supervision.

``total = seg + alpha * cls + aux_weight * aux`` where

* ``seg`` -- on the masks. ``output="sigmoid"``: soft Dice on the region probabilities plus
  BCE-with-logits on the region masks (the region-based recipe of the BraTS winners, e.g.
  nnU-Net, https://arxiv.org/abs/2011.00848). ``output="softmax"``: cross-entropy on the
  tissue class map derived from the nested region masks (:func:`regions_to_tissue_index`)
  plus soft Dice on the region probabilities of :func:`~brats_psp.networks.region_probabilities`.
* ``cls`` -- BCE-with-logits of the class logits against region presence per slice (the
  seed's auxiliary class loss, weight ``alpha`` = 1.0 in the seed).
* ``aux`` -- the same segmentation loss on the auxiliary masks of deep supervision (weight 0.4
  in Zhao et al. 2017); zero when the output has none.

Dice is computed per region over the whole batch (sums over batch, height and width), so
slices without tumour are well defined: a region absent from the whole batch gives
``1 - smooth / (sum(p) + smooth)``, finite, and BCE / CE drive its probabilities to zero.
Everything is computed in float32, also under autocast.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brats_psp.labels import REGION_NAMES, Tissue
from brats_psp.networks.pspnet import OUTPUT_MODES, PSPNetOutput, mask_channels, region_probabilities

__all__ = ["LossTerms", "PSPLoss", "soft_dice_loss", "regions_to_tissue_index"]


class LossTerms(NamedTuple):
    """Scalar float32 tensors: the weighted ``total`` and the unweighted terms it sums."""

    total: Tensor
    seg: Tensor
    cls: Tensor
    aux: Tensor


def soft_dice_loss(probs: Tensor, target: Tensor, smooth: float = 1e-5) -> Tensor:
    """Batch soft Dice loss: ``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)`` per channel, averaged.

    Args:
        probs: B x R x H x W probabilities.
        target: B x R x H x W in {0, 1}.
        smooth: added to numerator and denominator; keeps empty regions finite.

    Returns:
        scalar, mean over the R channels of the per-channel loss (sums over B, H, W).
    """
    dims = (0, *range(2, probs.ndim))
    intersection = (probs * target).sum(dims)
    denominator = probs.sum(dims) + target.sum(dims)
    return (1.0 - (2.0 * intersection + smooth) / (denominator + smooth)).mean()


def regions_to_tissue_index(regions: Tensor) -> Tensor:
    """B x 3 x H x W region masks -> B x H x W int64 tissue codes (0 BG, 1 NCR, 2 ED, 3 ET).

    The rule of :func:`brats_psp.labels.regions_to_tissue`: ET wins over TC, TC over WT
    (ET -> ET, TC without ET -> NCR, WT without TC -> ED, else background); values > 0.5
    count as inside a region.
    """
    if regions.ndim < 2 or regions.shape[1] != len(REGION_NAMES):
        raise ValueError(f"expected {len(REGION_NAMES)} region channels {REGION_NAMES}, got {tuple(regions.shape)}")
    inside = regions > 0.5
    wt, tc, et = (inside[:, REGION_NAMES.index(r)] for r in ("WT", "TC", "ET"))
    tissue = torch.zeros(inside[:, 0].shape, dtype=torch.int64, device=regions.device)
    tissue[wt] = int(Tissue.ED)
    tissue[tc] = int(Tissue.NCR)
    tissue[et] = int(Tissue.ET)
    return tissue


class PSPLoss(nn.Module):
    """Loss of a :class:`~brats_psp.networks.PSPNetOutput` against region masks and presence.

    Args:
        output: the network's output mode, ``"sigmoid"`` or ``"softmax"``.
        alpha: weight of the class-head BCE (the seed's 1.0).
        aux_weight: weight of the deep-supervision term (the paper's 0.4).
        dice_weight: weight of the soft Dice term in ``seg`` and ``aux``.
        bce_weight: weight of the pixel-wise cross-entropy term in ``seg`` and ``aux``
            (binary per region for sigmoid, 4-class for softmax).
        smooth: Dice smoothing constant.

    ``forward(out, regions, presence)``: ``out`` a :class:`PSPNetOutput` with masks
    B x K x H x W, ``regions`` B x 3 x H x W float in {0, 1} (``REGION_NAMES`` order),
    ``presence`` B x 3 float in {0, 1}. Returns :class:`LossTerms`.
    """

    def __init__(
        self,
        output: str = "sigmoid",
        alpha: float = 1.0,
        aux_weight: float = 0.4,
        dice_weight: float = 1.0,
        bce_weight: float = 1.0,
        smooth: float = 1e-5,
    ) -> None:
        super().__init__()
        if output not in OUTPUT_MODES:
            raise ValueError(f"output must be one of {list(OUTPUT_MODES)}, got {output!r}")
        weights = {"alpha": alpha, "aux_weight": aux_weight, "dice_weight": dice_weight, "bce_weight": bce_weight}
        for name, value in weights.items():
            if not _is_real(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not _is_real(smooth) or not math.isfinite(smooth) or smooth <= 0:
            raise ValueError(f"smooth must be a finite number > 0, got {smooth!r}")
        self.output = output
        self.alpha = float(alpha)
        self.aux_weight = float(aux_weight)
        self.dice_weight = float(dice_weight)
        self.bce_weight = float(bce_weight)
        self.smooth = float(smooth)

    def segmentation_loss(self, masks_logits: Tensor, regions: Tensor) -> Tensor:
        """``dice_weight * Dice + bce_weight * (BCE | CE)`` of B x K x H x W logits vs B x 3 x H x W regions."""
        logits = masks_logits.float()
        target = regions.float()
        if self.output == "sigmoid":
            pixel = F.binary_cross_entropy_with_logits(logits, target)
        else:
            pixel = F.cross_entropy(logits, regions_to_tissue_index(target))
        dice = soft_dice_loss(region_probabilities(logits, self.output), target, self.smooth)
        return self.dice_weight * dice + self.bce_weight * pixel

    def forward(self, out: PSPNetOutput, regions: Tensor, presence: Tensor) -> LossTerms:
        self._check_shapes(out, regions, presence)
        with torch.autocast(device_type=regions.device.type, enabled=False):
            seg = self.segmentation_loss(out.masks, regions)
            cls = F.binary_cross_entropy_with_logits(out.class_logits.float(), presence.float())
            if out.aux_masks is not None:
                aux = self.segmentation_loss(out.aux_masks, regions)
            else:
                aux = seg.new_zeros(())
            total = seg + self.alpha * cls + self.aux_weight * aux
        return LossTerms(total, seg, cls, aux)

    def _check_shapes(self, out: PSPNetOutput, regions: Tensor, presence: Tensor) -> None:
        k, r = mask_channels(self.output), len(REGION_NAMES)
        if out.masks.ndim != 4 or out.masks.shape[1] != k:
            raise ValueError(f"{self.output} loss needs B x {k} x H x W masks, got shape {tuple(out.masks.shape)}")
        b, _, h, w = out.masks.shape
        if tuple(regions.shape) != (b, r, h, w):
            raise ValueError(f"regions must have shape {(b, r, h, w)} to match the masks, got {tuple(regions.shape)}")
        if tuple(presence.shape) != (b, r) or tuple(out.class_logits.shape) != (b, r):
            raise ValueError(
                f"presence and class_logits must have shape {(b, r)}, "
                f"got {tuple(presence.shape)} and {tuple(out.class_logits.shape)}"
            )
        if out.aux_masks is not None and out.aux_masks.shape != out.masks.shape:
            shapes = f"{tuple(out.aux_masks.shape)} vs {tuple(out.masks.shape)}"
            raise ValueError(f"aux_masks and masks must have the same shape, got {shapes}")


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
