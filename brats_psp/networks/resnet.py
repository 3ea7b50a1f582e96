"""Dilated ResNet backbone with output stride 8, for any number of input channels.

ResNet (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016,
https://arxiv.org/abs/1512.03385) with the strides of layers 3 and 4 replaced by
dilation 2 and 4 (Yu & Koltun, "Multi-Scale Context Aggregation by Dilated
Convolutions", ICLR 2016, https://arxiv.org/abs/1511.07122), as PSPNet uses it
(Zhao et al., CVPR 2017, https://arxiv.org/abs/1612.01105). Written here so that
the project needs neither torchvision nor pretrained weights: the stem takes C input
channels (4 MRI contrasts, or 4 x k with k neighbouring slices) and every block is
initialised with Kaiming's method.

Spatial sizes for an input of H x W (``ceil`` because every stride-2 layer pads)::

    stem    conv7x7/2 + maxpool/2   ceil(H/4)
    layer1  stride 1                ceil(H/4)
    layer2  stride 2                ceil(H/8)
    layer3  dilation 2              ceil(H/8)
    layer4  dilation 4              ceil(H/8)
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

__all__ = ["BasicBlock", "Bottleneck", "DilatedResNet", "ResNetFeatures", "RESNET_DEPTHS", "kaiming_init_"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut; ResNet-18/34."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided / dilated), 1x1 expand by 4; ResNet-50/101 (stride on the 3x3, "v1.5")."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


#: depth -> (block type, number of blocks in layers 1..4)
RESNET_DEPTHS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


class ResNetFeatures(NamedTuple):
    """Outputs of the four residual layers, each B x C_i x h x w (see :attr:`DilatedResNet.channels`)."""

    layer1: Tensor
    layer2: Tensor
    layer3: Tensor
    layer4: Tensor


class DilatedResNet(nn.Module):
    """ResNet-18/34/50/101 with output stride 8 (layers 3 and 4 dilated by 2 and 4, not strided).

    Args:
        depth: 18 or 34 (basic blocks), 50 or 101 (bottleneck blocks).
        in_channels: channels of the input image (4 contrasts, or 4 x k for k neighbouring slices).
        width: channels of the stem and of layer 1's blocks (64 in He et al.); layer i has
            ``width * 2**(i-1) * expansion`` output channels, so width 32 gives a model about
            four times smaller and faster for CPU work.
        zero_init_residual: start the last BatchNorm of every residual branch at zero, so that
            each block starts as the identity (Goyal et al. 2017, https://arxiv.org/abs/1706.02677);
            helps training from scratch.

    Input: B x ``in_channels`` x H x W. Output: :class:`ResNetFeatures`, layer 1 at
    ``ceil(H/4)``, layers 2-4 at ``ceil(H/8)`` (output stride 8).
    """

    output_stride = 8

    def __init__(self, depth: int = 34, in_channels: int = 4, width: int = 64, zero_init_residual: bool = True) -> None:
        super().__init__()
        if isinstance(depth, bool) or depth not in RESNET_DEPTHS:
            raise ValueError(f"depth must be one of {sorted(RESNET_DEPTHS)}, got {depth!r}")
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("width", width)
        block, blocks = RESNET_DEPTHS[depth]
        self.depth = depth
        self.in_channels = in_channels
        self.width = width
        #: output channels of layers 1..4
        self.channels: tuple[int, int, int, int] = tuple(width * 2**i * block.expansion for i in range(4))

        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        in_ch = width
        layers = []
        for i, (n_blocks, stride, dilation) in enumerate(zip(blocks, (1, 2, 1, 1), (1, 1, 2, 4))):
            layers.append(_make_layer(block, in_ch, width * 2**i, n_blocks, stride, dilation))
            in_ch = self.channels[i]
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

        kaiming_init_(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)
                elif isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def forward(self, x: Tensor) -> ResNetFeatures:
        """B x C x H x W -> :class:`ResNetFeatures`."""
        x1 = self.layer1(self.stem(x))
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        return ResNetFeatures(x1, x2, x3, self.layer4(x3))


def kaiming_init_(module: nn.Module) -> None:
    """Kaiming-normal (fan-out, ReLU) for every convolution in ``module``; BatchNorm to 1 / 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _make_layer(
    block: type[BasicBlock] | type[Bottleneck],
    in_channels: int,
    channels: int,
    n_blocks: int,
    stride: int,
    dilation: int,
) -> nn.Sequential:
    """``n_blocks`` blocks; the first one strides (layer 2 only), all share ``dilation``."""
    layers = [block(in_channels, channels, stride, dilation)]
    layers += [block(channels * block.expansion, channels, 1, dilation) for _ in range(n_blocks - 1)]
    return nn.Sequential(*layers)


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity, or a 1x1 projection + BN where the block changes the channels or the stride."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")

