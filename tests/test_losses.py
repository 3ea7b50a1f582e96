"""Tests of brats_psp.losses.PSPLoss: values, empty slices, gradients, softmax targets, overfitting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from brats_psp.labels import regions_to_tissue, tissue_to_regions
from brats_psp.losses import LossTerms, PSPLoss, regions_to_tissue_index, soft_dice_loss
from brats_psp.networks import PSPNet, PSPNetOutput


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def nested_regions(batch: int = 2, size: int = 32) -> torch.Tensor:
    """B x 3 x size x size nested discs: WT radius 12, TC 7, ET a ring inside TC."""
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    regions = torch.zeros(batch, 3, size, size)
    for i in range(batch):
        d = ((yy - size / 2 + 3 * i) ** 2 + (xx - size / 2 - 2 * i) ** 2).sqrt()
        regions[i, 0], regions[i, 1], regions[i, 2] = d < 12, d < 7, (d < 7) & (d > 3)
    return regions


def perfect_logits(regions: torch.Tensor, output: str, scale: float = 20.0) -> torch.Tensor:
    if output == "sigmoid":
        return scale * (2 * regions - 1)
    return scale * F.one_hot(regions_to_tissue_index(regions), 4).permute(0, 3, 1, 2).float()


def as_output(masks: torch.Tensor, regions: torch.Tensor, aux: torch.Tensor | None = None) -> PSPNetOutput:
    presence = regions.amax(dim=(2, 3))
    return PSPNetOutput(masks, 20.0 * (2 * presence - 1), aux)


@pytest.mark.parametrize("output", ["sigmoid", "softmax"])
def test_perfect_prediction_gives_near_zero_and_worse_gives_more(output):
    regions = nested_regions()
    presence = regions.amax(dim=(2, 3))
    loss = PSPLoss(output)
    perfect = loss(as_output(perfect_logits(regions, output), regions), regions, presence)
    uncertain = loss(as_output(torch.zeros_like(perfect_logits(regions, output)), regions), regions, presence)
    wrong = loss(as_output(perfect_logits(1 - regions, "sigmoid") if output == "sigmoid"
                           else perfect_logits(regions, output).roll(1, dims=1), regions), regions, presence)
    assert isinstance(perfect, LossTerms)
    assert perfect.seg.item() < 1e-4 and perfect.cls.item() < 1e-6 and perfect.aux.item() == 0.0
    assert perfect.seg < uncertain.seg < wrong.seg
    assert wrong.seg.item() > 1.0


def test_total_weights_the_terms():
    regions = nested_regions()
    presence = regions.amax(dim=(2, 3))
    masks, aux = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    out = PSPNetOutput(masks, torch.randn(2, 3), aux)
    terms = PSPLoss(alpha=0.5, aux_weight=0.4)(out, regions, presence)
    torch.testing.assert_close(terms.total, terms.seg + 0.5 * terms.cls + 0.4 * terms.aux)
    torch.testing.assert_close(terms.cls, F.binary_cross_entropy_with_logits(out.class_logits, presence))
    # the deep-supervision term is the same batch Dice + BCE on the auxiliary logits, written out here
    p = torch.sigmoid(aux)
    aux_dice = 1 - (2 * (p * regions).sum((0, 2, 3)) + 1e-5) / (p.sum((0, 2, 3)) + regions.sum((0, 2, 3)) + 1e-5)
    torch.testing.assert_close(terms.aux, aux_dice.mean() + F.binary_cross_entropy_with_logits(aux, regions))


def test_sigmoid_seg_is_batch_dice_plus_bce():
    regions = nested_regions()
    logits = torch.randn(2, 3, 32, 32)
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * regions).sum((0, 2, 3)) + 1e-5) / (p.sum((0, 2, 3)) + regions.sum((0, 2, 3)) + 1e-5)
    expected = dice.mean() + F.binary_cross_entropy_with_logits(logits, regions)
    torch.testing.assert_close(PSPLoss(bce_weight=1.0, dice_weight=1.0).segmentation_loss(logits, regions), expected)
    torch.testing.assert_close(PSPLoss(bce_weight=0.0).segmentation_loss(logits, regions), dice.mean())


@pytest.mark.parametrize("output, k", [("sigmoid", 3), ("softmax", 4)])
def test_empty_slices_give_finite_loss_and_gradients(output, k):
    regions = torch.zeros(2, 3, 16, 16)
    logits = torch.randn(2, k, 16, 16, requires_grad=True)
    class_logits = torch.randn(2, 3, requires_grad=True)
    terms = PSPLoss(output)(PSPNetOutput(logits, class_logits, None), regions, torch.zeros(2, 3))
    terms.total.backward()
    assert all(torch.isfinite(t) for t in terms)
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_soft_dice_on_an_empty_target_is_zero_only_for_an_empty_prediction():
    empty = torch.zeros(1, 1, 8, 8)
    assert soft_dice_loss(empty, empty).item() == pytest.approx(0.0)
    assert soft_dice_loss(torch.full_like(empty, 0.5), empty).item() == pytest.approx(1.0, abs=1e-4)


def test_gradients_flow_to_the_class_head():
    model = PSPNet(4, depth=18, width=8, psp_channels=16)
    regions = nested_regions()
    out = model(torch.randn(2, 4, 32, 32))
    PSPLoss()(out, regions, regions.amax(dim=(2, 3))).total.backward()
    head_grads = [p.grad for p in model.class_head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in head_grads)
    assert sum(g.abs().sum() for g in head_grads) > 0
    assert model.backbone.layer3[0].shortcut[0].weight.grad.abs().sum() > 0  # through the class head, too


def test_softmax_target_matches_labels_regions_to_tissue():
    rng = np.random.default_rng(0)
    tissue = rng.integers(0, 4, size=(3, 20, 24))  # random tissue -> nested region masks
    nested = np.stack([tissue_to_regions(t) for t in tissue])
    inconsistent = rng.random((3, 3, 20, 24)) > 0.5  # ET outside TC etc.: same priority rule
    for regions in (nested, inconsistent):
        expected = np.stack([regions_to_tissue(r) for r in regions])
        got = regions_to_tissue_index(torch.from_numpy(regions.astype(np.float32)))
        assert got.dtype == torch.int64
        np.testing.assert_array_equal(got.numpy(), expected)
    np.testing.assert_array_equal(
        regions_to_tissue_index(torch.from_numpy(nested.astype(np.float32))).numpy(), tissue
    )


def test_loss_is_float32_under_bf16_autocast():
    model = PSPNet(4, depth=18, width=8, psp_channels=16, deep_supervision=True).to(memory_format=torch.channels_last)
    regions = nested_regions()
    x = torch.randn(2, 4, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        terms = PSPLoss()(out, regions, regions.amax(dim=(2, 3)))
    assert out.masks.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 and t.ndim == 0 and torch.isfinite(t) for t in terms)
    assert terms.aux > 0
    terms.total.backward()
    assert model.psp.fuse[0].weight.grad is not None


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        ({"output": "tanh"}, "'tanh'"),
        ({"alpha": -1.0}, "alpha.*-1.0"),
        ({"aux_weight": float("nan")}, "aux_weight.*nan"),
        ({"smooth": 0.0}, "smooth.*0.0"),
        ({"dice_weight": "1"}, "dice_weight.*'1'"),
    ],
)
def test_bad_arguments_raise(kwargs, shown):
    with pytest.raises(ValueError, match=shown):
        PSPLoss(**kwargs)


def test_mismatched_shapes_raise():
    regions = nested_regions()
    presence = regions.amax(dim=(2, 3))
    with pytest.raises(ValueError, match="4 x H x W"):
        PSPLoss("softmax")(as_output(torch.randn(2, 3, 32, 32), regions), regions, presence)
    with pytest.raises(ValueError, match=r"\(2, 3, 16, 16\)"):
        PSPLoss()(as_output(torch.randn(2, 3, 32, 32), regions), regions[..., :16, :16], presence)


@pytest.mark.parametrize("output", ["sigmoid", "softmax"])
def test_tiny_model_overfits_one_batch(output):
    regions = nested_regions()
    presence = regions.amax(dim=(2, 3))
    image = 0.1 * torch.randn(2, 4, 32, 32) + regions.sum(dim=1, keepdim=True)
    model = PSPNet(4, depth=18, width=8, psp_channels=32, dropout=0.0, output=output)
    loss = PSPLoss(output)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = []
    for _ in range(25):
        terms = loss(model(image), regions, presence)
        optimizer.zero_grad()
        terms.total.backward()
        optimizer.step()
        history.append(terms.total.item())
    assert history[-1] < 0.5 * history[0], history
