"""Tests of brats_psp.networks: shapes, output stride, the seed's structure, config factory."""

from __future__ import annotations

import typing

import pytest
import torch
from torch import nn

from brats_psp.config import ModelConfig, load_config
from brats_psp.labels import REGION_NAMES
from brats_psp.networks import (
    DECODERS,
    OUTPUT_MODES,
    RESNET_DEPTHS,
    DilatedResNet,
    PSPNet,
    PSPNetOutput,
    SeedPSPNet,
    build_network,
    count_parameters,
    region_probabilities,
)
from tests.conftest import REPO

B, C, H, W = 2, 4, 61, 75  # odd H and W, not multiples of 8
SMALL = {"width": 16, "psp_channels": 64}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("depth", [18, 34, 50])
@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("output, k", [("sigmoid", 3), ("softmax", 4)])
def test_pspnet_output_shapes(image, depth, decoder, output, k):
    model = PSPNet(C, depth=depth, decoder=decoder, output=output, **SMALL).eval()
    with torch.no_grad():
        out = model(image)
    assert isinstance(out, PSPNetOutput)
    assert out.masks.shape == (B, k, H, W)
    assert out.class_logits.shape == (B, len(REGION_NAMES))
    assert out.aux_masks is None
    assert torch.isfinite(out.masks).all()


@pytest.mark.parametrize("output, k", [("sigmoid", 3), ("softmax", 4)])
def test_deep_supervision_masks_in_training_only(image, output, k):
    model = PSPNet(C, depth=18, output=output, deep_supervision=True, **SMALL)
    out = model.train()(image)
    assert out.aux_masks is not None and out.aux_masks.shape == (B, k, H, W)
    with torch.no_grad():
        assert model.eval()(image).aux_masks is None


def test_skip_decoder_is_fed_layer1_and_the_input(image):
    """The skip decoder's step at stride 4 takes ResNet layer 1, its last step (full size) the
    input slices; in between nothing is added. So an output pixel depends most on the input
    right under it, where the progressive decoder sees the input only through stride 8."""
    model = PSPNet(C, depth=18, decoder="skip", **SMALL).eval()
    steps = model.decoder.steps
    assert [s.skip_channels for s in steps] == [model.backbone.channels[0], 0, C]
    assert steps[0].conv[0].in_channels == 64 + model.backbone.channels[0]
    assert steps[2].conv[0].in_channels == steps[1].conv[0].out_channels + C
    plain = PSPNet(C, depth=18, decoder="progressive", **SMALL).eval()
    assert [s.skip_channels for s in plain.decoder.steps] == [0, 0, 0]
    # Influence of the input on one output pixel: its 3x3 neighbourhood (the full-size step's
    # window) against the ring of a 9x9 window around it.
    x = image[:1].clone().requires_grad_(True)
    for net, direct in ((model, True), (plain, False)):
        x.grad = None
        net(x).masks[0, 0, 30, 40].backward()
        g = x.grad[0].abs().sum(0)
        ring = g[26:35, 36:45].clone()
        ring[3:6, 3:6] = 0
        ratio = (g[29:32, 39:42].mean() / (ring.sum() / 72)).item()
        assert (ratio > 2.0) if direct else (ratio < 2.0), (direct, ratio)


def test_skip_decoder_rejects_a_missing_or_wrong_skip():
    block = PSPNet(C, depth=18, decoder="skip", **SMALL).decoder.steps[2]
    x = torch.randn(1, block.conv[0].in_channels - C, 8, 8)
    with pytest.raises(ValueError, match="skip of 4 channels"):
        block(x, (16, 16))
    with pytest.raises(ValueError, match=r"\(1, 3, 16, 16\)"):
        block(x, (16, 16), torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("slices", [1, 3])
def test_stem_takes_four_times_k_channels(slices):
    x = torch.randn(2, 4 * slices, 40, 33)
    model = PSPNet(4 * slices, depth=18, **SMALL).eval()
    with torch.no_grad():
        assert model(x).masks.shape == (2, 3, 40, 33)
    assert model.backbone.stem[0].in_channels == 4 * slices


def test_class_logits_without_class_head_come_from_the_masks(image):
    model = PSPNet(C, depth=18, class_head=False, **SMALL).eval()
    assert model.class_head is None
    with torch.no_grad():
        out = model(image)
    torch.testing.assert_close(out.class_logits, out.masks.amax(dim=(2, 3)))


@pytest.mark.parametrize("depth, channels", [(18, (16, 32, 64, 128)), (50, (64, 128, 256, 512))])
def test_backbone_output_stride_8(depth, channels):
    backbone = DilatedResNet(depth, in_channels=4, width=16).eval()
    with torch.no_grad():
        feats = backbone(torch.randn(1, 4, 64, 64))
    assert backbone.channels == channels
    assert feats.layer1.shape == (1, channels[0], 16, 16)
    assert feats.layer2.shape == (1, channels[1], 8, 8)
    assert feats.layer3.shape == (1, channels[2], 8, 8)
    assert feats.layer4.shape == (1, channels[3], 8, 8)
    convs3 = [m for m in backbone.layer3.modules() if isinstance(m, nn.Conv2d)]
    convs4 = [m for m in backbone.layer4.modules() if isinstance(m, nn.Conv2d)]
    assert {m.dilation[0] for m in convs3 if m.kernel_size == (3, 3)} == {2}
    assert {m.dilation[0] for m in convs4 if m.kernel_size == (3, 3)} == {4}
    assert {m.stride[0] for m in convs3 + convs4} == {1}


def test_kaiming_init_and_width():
    backbone = DilatedResNet(18, in_channels=4, width=32)
    conv = backbone.stem[0]
    assert conv.out_channels == 32
    fan_out = conv.out_channels * 7 * 7
    assert conv.weight.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.1)
    assert count_parameters(DilatedResNet(18, 4, 64)) > 3.5 * count_parameters(backbone)


def test_channels_last_and_bf16_autocast(image):
    model = PSPNet(C, depth=18, deep_supervision=True, **SMALL).to(memory_format=torch.channels_last)
    x = image.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.masks.dtype == torch.bfloat16
    assert out.masks.shape == (B, 3, H, W) and out.aux_masks.shape == (B, 3, H, W)
    assert torch.isfinite(out.masks.float()).all() and torch.isfinite(out.class_logits.float()).all()


def test_channels_last_matches_contiguous(image):
    model = PSPNet(C, depth=18, **SMALL).eval()
    with torch.no_grad():
        ref = model(image).masks
        model.to(memory_format=torch.channels_last)
        got = model(image.contiguous(memory_format=torch.channels_last)).masks
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_pyramid_pooling_follows_the_paper():
    model = PSPNet(C, depth=18, width=16, psp_channels=48, bins=(1, 2, 3, 6))
    layer4 = model.backbone.channels[3]  # 128
    pools = [stage[0].output_size for stage in model.psp.stages]
    reduce_convs = [stage[1] for stage in model.psp.stages]
    assert pools == [1, 2, 3, 6]
    assert all(conv.out_channels == layer4 // 4 and conv.kernel_size == (1, 1) for conv in reduce_convs)
    assert all(isinstance(stage[2], nn.BatchNorm2d) for stage in model.psp.stages)
    fuse = model.psp.fuse[0]
    assert fuse.in_channels == layer4 * 2 and fuse.out_channels == 48 and fuse.kernel_size == (3, 3)


def test_seed_pspnet_structure(image):
    model = SeedPSPNet(C, depth=34, width=16).eval()
    layer3, layer4 = model.feats.channels[2:]
    assert [stage[0].output_size for stage in model.psp.stages] == [1, 2, 3, 6]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.psp.modules())
    assert all(stage[1].out_channels == layer4 for stage in model.psp.stages)
    assert model.psp.bottleneck.in_channels == 5 * layer4 and model.psp.bottleneck.out_channels == 1024
    ups = [model.up_1, model.up_2, model.up_3]
    assert [(u.conv[0].in_channels, u.conv[0].out_channels) for u in ups] == [(1024, 256), (256, 64), (64, 64)]
    assert all(isinstance(u.conv[2], nn.PReLU) for u in ups)
    assert (model.drop_1.p, model.drop_2.p) == (0.3, 0.15)
    assert model.classifier.mlp[0].in_features == layer3 == 64
    assert model.classifier.mlp[0].out_features == 256 and model.classifier.mlp[2].out_features == 3
    assert not any(isinstance(m, nn.LogSoftmax) for m in model.modules())
    with torch.no_grad():
        out = model(image)
    assert isinstance(out, PSPNetOutput)
    assert out.masks.shape == (B, 3, H, W) and out.class_logits.shape == (B, 3) and out.aux_masks is None


def test_seed_pspnet_softmax_has_four_classes(image):
    with torch.no_grad():
        out = SeedPSPNet(C, depth=18, width=8, output="softmax").eval()(image)
    assert out.masks.shape == (B, 4, H, W)


def test_region_probabilities_sigmoid():
    logits = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(region_probabilities(logits, "sigmoid"), torch.sigmoid(logits))


def test_region_probabilities_softmax():
    logits = torch.randn(2, 4, 5, 5)
    p = torch.softmax(logits, dim=1)
    bg, ncr, ed, et = p.unbind(1)
    expected = torch.stack([1 - bg, ncr + et, et], dim=1)
    got = region_probabilities(logits, "softmax")
    torch.testing.assert_close(got, expected)
    assert (got[:, 0] >= got[:, 1]).all() and (got[:, 1] >= got[:, 2]).all()  # nested WT >= TC >= ET


def test_region_probabilities_rejects_wrong_channels():
    with pytest.raises(ValueError, match="softmax"):
        region_probabilities(torch.randn(1, 3, 4, 4), "softmax")
    with pytest.raises(ValueError, match="'tanh'"):
        region_probabilities(torch.randn(1, 3, 4, 4), "tanh")


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        ({"depth": 19}, "19"),
        ({"width": 0}, "width.*0"),
        ({"in_channels": 0}, "in_channels.*0"),
        ({"decoder": "deconv"}, "'deconv'"),
        ({"output": "logits"}, "'logits'"),
        ({"bins": ()}, r"\[\]"),
        ({"bins": (1, 2, 2)}, r"\[1, 2, 2\]"),
        ({"psp_channels": -1}, "-1"),
        ({"dropout": 1.5}, "1.5"),
        ({"decoder_channels": (8, 8)}, r"\(8, 8\)"),
    ],
)
def test_pspnet_rejects_bad_arguments(kwargs, shown):
    args = {"in_channels": C, "depth": 18, **SMALL, **kwargs}
    with pytest.raises(ValueError, match=shown):
        PSPNet(**args)


def test_build_network_from_dict():
    cfg = {"name": "pspnet", "depth": 18, "width": 8, "bins": [1, 2, 4], "psp_channels": 32,
           "decoder": "bilinear", "output": "softmax", "class_head": False, "deep_supervision": True, "dropout": 0.2}
    model = build_network(cfg, in_channels=12)
    assert isinstance(model, PSPNet)
    assert model.backbone.channels[0] == 8 and model.backbone.stem[0].in_channels == 12
    assert [s[0].output_size for s in model.psp.stages] == [1, 2, 4]
    assert model.class_head is None and model.aux_head is not None and model.out_channels == 4
    out = model.train()(torch.randn(2, 12, 24, 24))
    assert out.masks.shape == (2, 4, 24, 24) and out.aux_masks.shape == (2, 4, 24, 24)


def test_build_network_defaults_and_seed():
    # one set of defaults: a mapping without keys, a default ModelConfig and configs/default.yaml agree
    model = build_network({}, in_channels=4)
    assert isinstance(model, PSPNet)
    assert model.backbone.depth == 18 and model.backbone.width == 16
    assert model.output == "sigmoid" and model.class_head is not None and model.aux_head is not None
    default = build_network(load_config(REPO / "configs" / "default.yaml").model, in_channels=4)
    assert count_parameters(default) == count_parameters(model) == count_parameters(build_network(ModelConfig(), 4))
    seed = build_network({"name": "seed_pspnet", "depth": 18, "width": 8}, in_channels=4)
    assert isinstance(seed, SeedPSPNet) and seed.feats.depth == 18


def test_the_model_schema_and_the_network_modules_accept_the_same_values():
    hints = typing.get_type_hints(ModelConfig)
    assert set(typing.get_args(hints["depth"])) == set(RESNET_DEPTHS)
    assert set(typing.get_args(hints["decoder"])) == set(DECODERS)
    assert set(typing.get_args(hints["output"])) == set(OUTPUT_MODES)
    # every depth the schema accepts builds, and one it refuses the backbone refuses too
    for depth in RESNET_DEPTHS:
        assert build_network(ModelConfig(depth=depth, width=4, psp_channels=8), 4).backbone.depth == depth
    with pytest.raises(ValueError, match="depth"):
        DilatedResNet(152, 4, 8)


@pytest.mark.parametrize(
    "cfg, shown",
    [
        ({"name": "unet"}, "model.name: 'unet'"),
        ({"depth": 152}, r"model.depth: 152 is not one of \[18, 34, 50, 101\]"),
        ({"depth": True}, "model.depth: True"),
        ({"width": 0}, "model.width: 0"),
        ({"bins": [1, 0]}, r"model.bins: \[1, 0\]"),
        ({"decoder": "fpn"}, "model.decoder: 'fpn'"),
        ({"output": "logits"}, "model.output: 'logits'"),
        ({"class_head": "yes"}, "model.class_head: expected bool"),
        ({"deep_supervision": 1}, "model.deep_supervision: expected bool"),
        ({"dropout": 1.0}, "model.dropout: 1.0"),
        ({"psp_channels": "512"}, "model.psp_channels: expected int"),
        ({"decoder_channels": [8, 8]}, r"model.decoder_channels: \[8, 8\]"),
        ({"deph": 18}, "unknown key model.deph"),
    ],
)
def test_build_network_rejects_bad_config(cfg, shown):
    with pytest.raises(ValueError, match=shown):
        build_network(cfg, in_channels=4)


def test_count_parameters_trainable_only():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))  # (3*2 + 2) + (2*1 + 1) parameters
    assert count_parameters(model) == 11
    model[0].requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 3 and count_parameters(model) == 11
