"""The seed's PSPNet (``shared/seed/``, from the public pspnet-pytorch repository), re-implemented.

Kept for comparison with :class:`brats_psp.networks.pspnet.PSPNet` ("the seed's way":
ResNet-34, 4-channel stem). The architecture is the seed's, layer for layer:

* pyramid pooling without BatchNorm: each bin is adaptive average pooling + a 1x1 conv that
  keeps all C channels (no reduction, no bias, no BN); the C x (len(bins) + 1) concatenation
  (bins first, then the features) goes through a 1x1 bottleneck (with bias) to 1024 channels
  and a ReLU;
* Dropout2d(0.3), then three ``PSPUpsample`` steps 1024 -> 256 -> 64 -> 64 (bilinear x2,
  3x3 conv, BN, PReLU), each followed by Dropout2d(0.15), and a final 1x1 conv;
* the class head on layer-3 features: adaptive max pool -> Linear(deep_features_size, 256)
  -> ReLU -> Linear(256, 3).

Modernised where the seed no longer runs on current PyTorch or would not fit this project:

* ``F.interpolate(..., align_corners=False)`` instead of the removed ``F.upsample`` (what
  ``F.upsample(mode="bilinear")`` does on PyTorch >= 0.4);
* no ``LogSoftmax`` at the end: the module returns logits, so the same loss
  (:class:`brats_psp.losses.PSPLoss`) applies to both networks;
* the backbone is the project's :class:`~brats_psp.networks.resnet.DilatedResNet` (output
  stride 8, as the seed's ``extractors``) with a C-channel stem, no pretrained weights;
* the last upsampling step ends at the input's exact size, so H and W need not be
  multiples of 8 (for multiples of 8 every step is exactly x2, as in the seed);
* masks have 3 region (sigmoid) or 4 tissue (softmax) channels, class logits 3 regions, and
  the forward returns :class:`~brats_psp.networks.pspnet.PSPNetOutput` (``aux_masks`` None).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brats_psp.networks.pspnet import (
    ClassHead,
    PSPNetOutput,
    UpsampleBlock,
    _check_bins,
    mask_channels,
    progressive_sizes,
)
from brats_psp.networks.resnet import DilatedResNet

__all__ = ["SeedPSPModule", "SeedPSPNet"]


class SeedPSPModule(nn.Module):
    """The seed's ``PSPModule``: pyramid pooling without channel reduction or BatchNorm.

    Input: B x ``features`` x h x w. Output: B x ``out_features`` x h x w.
    """

    def __init__(self, features: int, out_features: int = 1024, sizes: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.sizes = _check_bins(sizes)
        self.stages = nn.ModuleList(self._make_stage(features, size) for size in self.sizes)
        self.bottleneck = nn.Conv2d(features * (len(self.sizes) + 1), out_features, kernel_size=1)
        self.relu = nn.ReLU()

    @staticmethod
    def _make_stage(features: int, size: int) -> nn.Sequential:
        return nn.Sequential(nn.AdaptiveAvgPool2d(size), nn.Conv2d(features, features, kernel_size=1, bias=False))

    def forward(self, feats: Tensor) -> Tensor:
        size = feats.shape[-2:]
        priors = [F.interpolate(stage(feats), size=size, mode="bilinear", align_corners=False) for stage in self.stages]
        return self.relu(self.bottleneck(torch.cat([*priors, feats], dim=1)))


class SeedPSPNet(nn.Module):
    """The seed's PSPNet on the project's dilated ResNet (see the module docstring for what changed).

    Args:
        in_channels: input channels C (4 contrasts, or 4 x k with k neighbouring slices).
        depth: ResNet depth (the seed's default backend is ResNet-34).
        width: base channels of the ResNet (64 as the seed).
        bins: pyramid pooling sizes (the seed's 1, 2, 3, 6).
        output: ``"sigmoid"`` (3 region logits) or ``"softmax"`` (4 tissue logits).

    ``psp_size`` and ``deep_features_size`` of the seed are the backbone's layer-4 and layer-3
    channels (512 and 256 for ResNet-34, as the seed's ``resnet34`` entry sets them).

    Input: B x C x H x W. Output: :class:`PSPNetOutput` with masks B x K x H x W, class_logits
    B x 3 and aux_masks ``None``.
    """

    def __init__(
        self,
        in_channels: int = 4,
        depth: int = 34,
        width: int = 64,
        bins: Sequence[int] = (1, 2, 3, 6),
        output: str = "sigmoid",
    ) -> None:
        super().__init__()
        self.out_channels = mask_channels(output)
        self.output = output
        # The seed's extractors are torchvision-style ResNets with default initialisation.
        self.feats = DilatedResNet(depth, in_channels, width, zero_init_residual=False)
        deep_features_size, psp_size = self.feats.channels[2:]
        self.psp = SeedPSPModule(psp_size, 1024, bins)
        self.drop_1 = nn.Dropout2d(p=0.3)
        self.up_1 = UpsampleBlock(1024, 256)
        self.up_2 = UpsampleBlock(256, 64)
        self.up_3 = UpsampleBlock(64, 64)
        self.drop_2 = nn.Dropout2d(p=0.15)
        self.final = nn.Conv2d(64, self.out_channels, kernel_size=1)
        self.classifier = ClassHead(deep_features_size, hidden=256)

    def forward(self, x: Tensor) -> PSPNetOutput:
        """B x C x H x W -> :class:`PSPNetOutput` (masks at H x W)."""
        sizes = progressive_sizes(x.shape[-2:], 3)
        features = self.feats(x)
        p = self.drop_1(self.psp(features.layer4))
        for up, size in zip((self.up_1, self.up_2, self.up_3), sizes):
            p = self.drop_2(up(p, size))
        return PSPNetOutput(self.final(p), self.classifier(features.layer3), None)
