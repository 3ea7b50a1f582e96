"""Networks: the dilated ResNet backbone, PSPNet, the seed's PSPNet, and a factory from config.

:func:`build_network` reads the ``model`` section of a config (keys and defaults in
:data:`MODEL_DEFAULTS`)::

    name: pspnet            # pspnet | seed_pspnet
    depth: 34               # 18 | 34 | 50 | 101
    width: 64               # base channels of the ResNet
    bins: [1, 2, 3, 6]      # pyramid pooling bin sizes
    psp_channels: 512       # pspnet only
    decoder: progressive    # progressive | bilinear; pspnet only
    output: sigmoid         # sigmoid (3 regions) | softmax (4 tissue classes)
    class_head: true        # pspnet only (the seed always has one)
    deep_supervision: false # pspnet only
    dropout: 0.1            # pspnet only (the seed's rates are fixed at 0.3 / 0.15)
    decoder_channels: null  # pspnet only; three ints, default from psp_channels
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

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
    "MODEL_DEFAULTS",
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
NETWORK_NAMES: tuple[str, ...] = ("pspnet", "seed_pspnet")

#: Model-config keys and the value used when a key is absent.
MODEL_DEFAULTS: dict[str, Any] = {
    "name": "pspnet",
    "depth": 34,
    "width": 64,
    "bins": [1, 2, 3, 6],
    "psp_channels": 512,
    "decoder": "progressive",
    "output": "sigmoid",
    "class_head": True,
    "deep_supervision": False,
    "dropout": 0.1,
    "decoder_channels": None,
}

#: Keys the seed's architecture fixes; :func:`build_network` ignores them for ``seed_pspnet``.
_PSPNET_ONLY = ("psp_channels", "decoder", "class_head", "deep_supervision", "dropout", "decoder_channels")


def build_network(cfg: Mapping[str, Any], in_channels: int) -> nn.Module:
    """Build the network a model config describes, for ``in_channels`` input channels.

    Args:
        cfg: the model section of a config; absent keys take :data:`MODEL_DEFAULTS`.
        in_channels: input channels C (4 contrasts x k slices).

    Returns:
        a :class:`PSPNet` or :class:`SeedPSPNet`; both return :class:`PSPNetOutput`.

    Raises:
        ValueError: naming the key and value, for an unknown key or an invalid value.
    """
    unknown = sorted(set(cfg) - set(MODEL_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown model config keys {unknown}; known keys are {list(MODEL_DEFAULTS)}")
    c = {**MODEL_DEFAULTS, **cfg}
    _check(c, "name", c["name"] in NETWORK_NAMES, f"one of {list(NETWORK_NAMES)}")
    _check(c, "depth", _is_int(c["depth"]) and c["depth"] in RESNET_DEPTHS, f"one of {sorted(RESNET_DEPTHS)}")
    _check(c, "width", _is_int(c["width"]) and c["width"] >= 1, "a positive integer")
    _check(
        c,
        "bins",
        isinstance(c["bins"], (list, tuple)) and len(c["bins"]) > 0 and all(_is_int(b) and b >= 1 for b in c["bins"]),
        "a non-empty list of positive integers",
    )
    _check(c, "psp_channels", _is_int(c["psp_channels"]) and c["psp_channels"] >= 1, "a positive integer")
    _check(c, "decoder", c["decoder"] in DECODERS, f"one of {list(DECODERS)}")
    _check(c, "output", c["output"] in OUTPUT_MODES, f"one of {list(OUTPUT_MODES)}")
    _check(c, "class_head", isinstance(c["class_head"], bool), "true or false")
    _check(c, "deep_supervision", isinstance(c["deep_supervision"], bool), "true or false")
    dropout = c["dropout"]
    _check(c, "dropout", _is_real(dropout) and 0 <= dropout < 1, "a number in [0, 1)")
    dec = c["decoder_channels"]
    _check(
        c,
        "decoder_channels",
        dec is None or (isinstance(dec, (list, tuple)) and len(dec) == 3 and all(_is_int(v) and v >= 1 for v in dec)),
        "null or a list of three positive integers",
    )

    if c["name"] == "seed_pspnet":
        ignored = {k: cfg[k] for k in _PSPNET_ONLY if k in cfg and cfg[k] != MODEL_DEFAULTS[k]}
        if ignored:
            logger.info("seed_pspnet fixes its own head; ignoring model config %s", ignored)
        return SeedPSPNet(in_channels, c["depth"], c["width"], tuple(c["bins"]), c["output"])
    return PSPNet(
        in_channels,
        depth=c["depth"],
        width=c["width"],
        bins=tuple(c["bins"]),
        psp_channels=c["psp_channels"],
        decoder=c["decoder"],
        output=c["output"],
        class_head=c["class_head"],
        deep_supervision=c["deep_supervision"],
        dropout=float(c["dropout"]),
        decoder_channels=None if dec is None else tuple(dec),
    )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(cfg: Mapping[str, Any], key: str, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"model config {key!r} must be {expected}, got {cfg[key]!r}")
