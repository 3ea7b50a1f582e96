"""Networks: the dilated ResNet backbone, PSPNet, the seed's PSPNet, and a factory from config.

:func:`build_network` builds the network that a :class:`~brats_psp.config.ModelConfig` (the
``model`` section of a config: its one schema, defaults and limits) describes.
"""

from __future__ import annotations

import logging
import typing
from collections.abc import Mapping
from typing import Any

from torch import nn

from brats_psp.config import ModelConfig
from brats_psp.networks.pspnet import (
    DECODERS,
    OUTPUT_MODES,
    TISSUE_CLASSES,
    ClassHead,
    PSPNet,
    PSPNetOutput,
    PyramidPooling,
    mask_channels,
    region_probabilities,
)
from brats_psp.networks.resnet import RESNET_DEPTHS, DilatedResNet, ResNetFeatures
from brats_psp.networks.seed_pspnet import SeedPSPModule, SeedPSPNet

__all__ = [
    "DECODERS",
    "OUTPUT_MODES",
    "TISSUE_CLASSES",
    "RESNET_DEPTHS",
    "NETWORK_NAMES",
    "ClassHead",
    "DilatedResNet",
    "ResNetFeatures",
    "PSPNet",
    "PSPNetOutput",
    "PyramidPooling",
    "SeedPSPModule",
    "SeedPSPNet",
    "build_network",
    "count_parameters",
    "mask_channels",
    "region_probabilities",
]

logger = logging.getLogger(__name__)

#: ``name`` values understood by :func:`build_network`.
NETWORK_NAMES: tuple[str, ...] = typing.get_args(typing.get_type_hints(ModelConfig)["name"])

#: Settings that the seed's architecture fixes; :func:`build_network` ignores them for ``seed_pspnet``.
_PSPNET_ONLY = ("psp_channels", "decoder", "class_head", "deep_supervision", "dropout", "decoder_channels")


def build_network(model: ModelConfig | Mapping[str, Any], in_channels: int) -> nn.Module:
    """Build the network that ``model`` describes, for ``in_channels`` input channels.

    Args:
        model: the ``model`` section of a config (``cfg.model``), or a mapping of its keys
            (checked with :meth:`ModelConfig.from_dict`; absent keys take the defaults).
        in_channels: input channels C (4 contrasts x slices per plane).

    Returns:
        a :class:`PSPNet` or :class:`SeedPSPNet`; both return :class:`PSPNetOutput`.

    Raises:
        ValueError: (a :class:`~brats_psp.config.ConfigError`) naming the key and value, for
            an unknown key or an invalid value.
    """
    m = model if isinstance(model, ModelConfig) else ModelConfig.from_dict(model)
    if isinstance(model, ModelConfig):
        m.validate()
    if m.name == "seed_pspnet":
        defaults = ModelConfig()
        ignored = {k: getattr(m, k) for k in _PSPNET_ONLY if getattr(m, k) != getattr(defaults, k)}
        if ignored:
            logger.info("seed_pspnet fixes its own head; ignoring model config %s", ignored)
        return SeedPSPNet(in_channels, m.depth, m.width, tuple(m.bins), m.output)
    return PSPNet(
        in_channels,
        depth=m.depth,
        width=m.width,
        bins=tuple(m.bins),
        psp_channels=m.psp_channels,
        decoder=m.decoder,
        output=m.output,
        class_head=m.class_head,
        deep_supervision=m.deep_supervision,
        dropout=m.dropout,
        decoder_channels=None if m.decoder_channels is None else tuple(m.decoder_channels),
    )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
