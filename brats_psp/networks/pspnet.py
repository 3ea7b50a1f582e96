"""PSPNet for 2D BraTS slices: dilated ResNet, pyramid pooling, decoder, region and class heads.

Zhao, Shi, Qi, Wang, Jia, "Pyramid Scene Parsing Network", CVPR 2017,
https://arxiv.org/abs/1612.01105, with the image-level tumour-class head of the seed
implementation (``shared/seed/``) and, optionally, the paper's per-pixel auxiliary head.

The masks are either the three nested BraTS regions (``output="sigmoid"``, channels in
:data:`brats_psp.labels.REGION_NAMES` order, as region-based BraTS winners train) or the
four exclusive tissue classes (``output="softmax"``, channels :data:`TISSUE_CLASSES`).
:func:`region_probabilities` turns either into region probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brats_psp.labels import REGION_NAMES, REGIONS, Tissue
from brats_psp.networks.resnet import DilatedResNet, kaiming_init_

__all__ = [
    "OUTPUT_MODES",
    "DECODERS",
    "TISSUE_CLASSES",
    "PSPNetOutput",
    "PSPNet",
    "PyramidPooling",
    "UpsampleBlock",
    "ClassHead",
    "mask_channels",
    "region_probabilities",
    "progressive_sizes",
    "presence_logits_from_masks",
]

#: ``output`` modes: per-region sigmoid logits, or per-tissue softmax logits.
OUTPUT_MODES: tuple[str, ...] = ("sigmoid", "softmax")
#: ``decoder`` kinds: the seed's three x2 steps, the same steps fed the encoder's detail
#: (U-Net-style skips from ResNet layer 1 and the input), or the paper's bilinear x8.
DECODERS: tuple[str, ...] = ("progressive", "skip", "bilinear")
#: Channel order of the softmax masks: tissue codes 0..3 (RC, code 4, is not predicted).
TISSUE_CLASSES: tuple[Tissue, ...] = (Tissue.BACKGROUND, Tissue.NCR, Tissue.ED, Tissue.ET)


class PSPNetOutput(NamedTuple):
    """What every network of :mod:`brats_psp.networks` returns.

    Attributes:
        masks: B x K x H x W logits at the input's resolution; K = 3 regions (sigmoid) or
            4 tissue classes (softmax).
        class_logits: B x 3 logits, one per region in ``REGION_NAMES`` order: does the slice
            contain WT / TC / ET?
        aux_masks: B x K x H x W logits of the per-pixel auxiliary head on layer 3 (deep
            supervision), in training mode only; ``None`` otherwise.
    """

    masks: Tensor
    class_logits: Tensor
    aux_masks: Tensor | None = None


def mask_channels(output: str) -> int:
    """Number of mask channels K for an ``output`` mode (3 regions or 4 tissue classes)."""
    _check_choice("output", output, OUTPUT_MODES)
    return len(REGION_NAMES) if output == "sigmoid" else len(TISSUE_CLASSES)


def region_probabilities(masks_logits: Tensor, output: str) -> Tensor:
    """B x K x H x W mask logits -> B x 3 x H x W region probabilities (``REGION_NAMES`` order).

    ``sigmoid``: the sigmoid of each region logit. ``softmax``: each region's probability is
    the sum of the probabilities of its tissues (:data:`brats_psp.labels.REGIONS`), i.e.
    WT = p_NCR + p_ED + p_ET (= 1 - p_BG, summed for precision near p_BG = 1),
    TC = p_NCR + p_ET, ET = p_ET.
    """
    k = mask_channels(output)
    if masks_logits.ndim < 2 or masks_logits.shape[1] != k:
        raise ValueError(f"{output} masks need {k} channels in dim 1, got shape {tuple(masks_logits.shape)}")
    if output == "sigmoid":
        return torch.sigmoid(masks_logits)
    probs = torch.softmax(masks_logits, dim=1)
    index = {tissue: i for i, tissue in enumerate(TISSUE_CLASSES)}
    return torch.stack([sum(probs[:, index[t]] for t in REGIONS[r] if t in index) for r in REGION_NAMES], dim=1)


def progressive_sizes(size: Sequence[int], steps: int = 3) -> list[tuple[int, int]]:
    """Target sizes of ``steps`` x2 upsamplings from stride ``2**steps`` up to ``size`` exactly.

    ``(61, 75)`` -> ``[(16, 19), (31, 38), (61, 75)]``; for multiples of 8 every step doubles.
    """
    h, w = size
    return [(math.ceil(h / 2**s), math.ceil(w / 2**s)) for s in range(steps - 1, -1, -1)]


class PyramidPooling(nn.Module):
    """The pyramid pooling module of PSPNet (Zhao et al. 2017, Fig. 3).

    Each bin size b: adaptive average pooling to b x b, 1x1 conv to ``in_channels // 4``
    channels (the paper's 1/N with its N = 4 levels), BN, ReLU, bilinear upsampling
    (``align_corners=False``) back to h x w. The pooled maps are concatenated with the
    input and fused by a 3x3 conv + BN + ReLU.

    In training mode BatchNorm on the 1 x 1 bin needs a batch of at least 2.

    Input: B x ``in_channels`` x h x w. Output: B x ``out_channels`` x h x w.
    """

    def __init__(self, in_channels: int, out_channels: int, bins: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.bins = _check_bins(bins)
        reduced = max(in_channels // 4, 1)
        self.stages = nn.ModuleList(self._make_stage(in_channels, reduced, b) for b in self.bins)
        self.fuse = nn.Sequential(
            nn.Conv2d(in_channels + reduced * len(self.bins), out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    @staticmethod
    def _make_stage(in_channels: int, out_channels: int, bin_size: int) -> nn.Sequential:
        return nn.Sequential(
            nn.AdaptiveAvgPool2d(bin_size),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(stage(x), size=size, mode="bilinear", align_corners=False) for stage in self.stages]
        return self.fuse(torch.cat([x, *pooled], dim=1))


class UpsampleBlock(nn.Module):
    """Bilinear upsampling to a given size, then 3x3 conv + BN + PReLU (the seed's ``PSPUpsample``).

    With ``skip_channels`` > 0 a feature map of the target size (an encoder skip) is
    concatenated with the upsampled input before the convolution, as in U-Net's decoder.

    Input: B x ``in_channels`` x h x w, a target size (H', W') and, with ``skip_channels``,
    B x ``skip_channels`` x H' x W'. Output: B x ``out_channels`` x H' x W'.
    """

    def __init__(self, in_channels: int, out_channels: int, skip_channels: int = 0) -> None:
        super().__init__()
        self.skip_channels = skip_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels + skip_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.PReLU(),
        )

    def forward(self, x: Tensor, size: Sequence[int], skip: Tensor | None = None) -> Tensor:
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        if self.skip_channels:
            if skip is None or skip.shape[1] != self.skip_channels or skip.shape[-2:] != x.shape[-2:]:
                got = None if skip is None else tuple(skip.shape)
                raise ValueError(f"UpsampleBlock expects a skip of {self.skip_channels} channels at {tuple(x.shape[-2:])}, got {got}")
            x = torch.cat([x, skip], dim=1)
        return self.conv(x)


class ClassHead(nn.Module):
    """The seed's image-level class head: global max pool -> Linear -> ReLU -> Linear.

    Input: B x ``in_features`` x h x w. Output: B x ``out_features`` logits.
    """

    def __init__(self, in_features: int, out_features: int = len(REGION_NAMES), hidden: int = 256) -> None:
        super().__init__()
        self.in_features = in_features
        self.mlp = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_features))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(torch.flatten(F.adaptive_max_pool2d(x, 1), 1))


class _ProgressiveDecoder(nn.Module):
    """Dropout, three :class:`UpsampleBlock` steps each followed by dropout (half the rate,
    the seed's 0.3 / 0.15 ratio), then a 1x1 classifier. Ends at the input's exact size.

    ``skip_channels``: per step (stride 4, 2, 1), the channels of the encoder map it is fed
    (0: none); ``forward`` then takes those maps in ``skips``.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        out_channels: int,
        dropout: float,
        skip_channels: Sequence[int] = (0, 0, 0),
    ) -> None:
        super().__init__()
        self.drop_in = nn.Dropout2d(dropout)
        widths = [in_channels, *channels]
        self.steps = nn.ModuleList(UpsampleBlock(a, b, c) for a, b, c in zip(widths[:-1], widths[1:], skip_channels))
        self.drop = nn.Dropout2d(dropout / 2)
        self.classifier = nn.Conv2d(widths[-1], out_channels, 1)

    def forward(self, x: Tensor, size: Sequence[int], skips: Sequence[Tensor | None] = (None, None, None)) -> Tensor:
        x = self.drop_in(x)
        for step, step_size, skip in zip(self.steps, progressive_sizes(size, len(self.steps)), skips):
            x = self.drop(step(x, step_size, skip))
        return self.classifier(x)


class _BilinearDecoder(nn.Module):
    """The paper's head: dropout, 1x1 classifier at stride 8, bilinear upsampling to the input size."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.drop = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        return F.interpolate(self.classifier(self.drop(x)), size=tuple(size), mode="bilinear", align_corners=False)


class PSPNet(nn.Module):
    """PSPNet (Zhao et al., CVPR 2017, https://arxiv.org/abs/1612.01105) for BraTS slices.

    Dilated ResNet (output stride 8) -> :class:`PyramidPooling` on layer 4 -> decoder -> masks,
    plus the seed's tumour-class head on layer 3 and optionally the paper's per-pixel
    auxiliary head on layer 3 (deep supervision, loss weight 0.4 in the paper).

    Args:
        in_channels: input channels C (4 contrasts, or 4 x k with k neighbouring slices).
        depth: ResNet depth, 18, 34, 50 or 101.
        width: base channels of the ResNet (64 standard; 32 for a lean CPU model).
        bins: pyramid pooling bin sizes.
        psp_channels: channels out of the pyramid pooling module.
        decoder: ``"progressive"`` (the seed's three x2 steps of upsample + 3x3 conv + BN + PReLU
            + Dropout2d), ``"skip"`` (the same steps, the one at stride 4 also fed ResNet layer 1
            and the one at full size the input slices, so that thin structures such as an
            enhancing rim keep the input's resolution) or ``"bilinear"`` (1x1 classifier at
            stride 8, bilinear x8).
        output: ``"sigmoid"`` (3 region logits WT/TC/ET) or ``"softmax"`` (4 tissue logits BG/NCR/ED/ET).
        class_head: add the image-level class head. Without it ``class_logits`` are derived from
            the masks (per region, the largest pixel logit; for softmax the logit of the largest
            region probability), so the output type never changes.
        deep_supervision: add the per-pixel auxiliary head (3x3 conv-BN-ReLU-dropout-1x1 conv) on
            layer 3; its masks are returned in training mode only.
        dropout: Dropout2d rate after pyramid pooling and in the auxiliary head (the paper's 0.1);
            the progressive decoder's steps use half of it.
        decoder_channels: channels of the three progressive steps; default the seed's ratios
            (1024 -> 256, 64, 64), i.e. ``psp_channels`` / 4, / 16, / 16, at least 8.

    Input: B x C x H x W, any H and W (not only multiples of 8).
    Output: :class:`PSPNetOutput` with masks B x K x H x W, class_logits B x 3 and aux_masks
    B x K x H x W or ``None``.
    """

    def __init__(
        self,
        in_channels: int = 4,
        depth: int = 34,
        width: int = 64,
        bins: Sequence[int] = (1, 2, 3, 6),
        psp_channels: int = 512,
        decoder: str = "progressive",
        output: str = "sigmoid",
        class_head: bool = True,
        deep_supervision: bool = False,
        dropout: float = 0.1,
        decoder_channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        _check_choice("decoder", decoder, DECODERS)
        self.out_channels = mask_channels(output)
        _check_positive_int("psp_channels", psp_channels)
        _check_dropout(dropout)
        if decoder_channels is None:
            decoder_channels = tuple(max(psp_channels // d, 8) for d in (4, 16, 16))
        decoder_channels = tuple(decoder_channels)
        if len(decoder_channels) != 3 or not all(_is_positive_int(c) for c in decoder_channels):
            raise ValueError(f"decoder_channels must be three positive integers, got {decoder_channels!r}")
        self.output = output
        self.decoder_kind = decoder

        self.backbone = DilatedResNet(depth, in_channels, width)
        layer3_channels, layer4_channels = self.backbone.channels[2:]
        self.psp = PyramidPooling(layer4_channels, psp_channels, bins)
        self.decoder = self._build_decoder(decoder, psp_channels, decoder_channels, dropout)
        self.class_head = ClassHead(layer3_channels) if class_head else None
        self.aux_head = self._build_aux_head(layer3_channels, dropout) if deep_supervision else None
        for part in (self.psp, self.decoder, self.aux_head):
            if part is not None:
                kaiming_init_(part)

    def _build_decoder(self, kind: str, in_channels: int, channels: Sequence[int], dropout: float) -> nn.Module:
        if kind == "progressive":
            return _ProgressiveDecoder(in_channels, channels, self.out_channels, dropout)
        if kind == "skip":
            skips = (self.backbone.channels[0], 0, self.backbone.in_channels)
            return _ProgressiveDecoder(in_channels, channels, self.out_channels, dropout, skips)
        return _BilinearDecoder(in_channels, self.out_channels, dropout)

    def _build_aux_head(self, in_channels: int, dropout: float) -> nn.Sequential:
        hidden = max(in_channels // 4, 1)
        return nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
            nn.Conv2d(hidden, self.out_channels, 1),
        )

    def forward(self, x: Tensor) -> PSPNetOutput:
        """B x C x H x W -> :class:`PSPNetOutput` (masks at H x W)."""
        size = x.shape[-2:]
        feats = self.backbone(x)
        if self.decoder_kind == "skip":
            masks = self.decoder(self.psp(feats.layer4), size, (feats.layer1, None, x))
        else:
            masks = self.decoder(self.psp(feats.layer4), size)
        if self.class_head is not None:
            class_logits = self.class_head(feats.layer3)
        else:
            class_logits = presence_logits_from_masks(masks, self.output)
        aux_masks = None
        if self.aux_head is not None and self.training:
            aux = self.aux_head(feats.layer3)
            aux_masks = F.interpolate(aux, size=size, mode="bilinear", align_corners=False)
        return PSPNetOutput(masks, class_logits, aux_masks)


def presence_logits_from_masks(masks_logits: Tensor, output: str) -> Tensor:
    """B x K x H x W mask logits -> B x 3 region-presence logits (largest over the slice)."""
    if output == "sigmoid":
        return masks_logits.amax(dim=(2, 3))
    probs = region_probabilities(masks_logits.float(), output).amax(dim=(2, 3))
    return torch.logit(probs, eps=1e-6)


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_positive_int(name: str, value: object) -> None:
    if not _is_positive_int(value):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_bins(bins: Sequence[int]) -> tuple[int, ...]:
    if isinstance(bins, (str, bytes)) or not isinstance(bins, Sequence):
        raise ValueError(f"bins must be a sequence of positive integers, got {bins!r}")
    bins = tuple(bins)
    if not bins or not all(_is_positive_int(b) for b in bins) or len(set(bins)) != len(bins):
        raise ValueError(f"bins must be distinct positive integers, got {list(bins)!r}")
    return bins


def _check_dropout(dropout: object) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
