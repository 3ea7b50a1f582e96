"""Property tests (hypothesis) for the label conventions and the metrics, on small random volumes."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from brats_psp.labels import REGION_NAMES, RELEASES, Tissue, regions_to_tissue, release_to_tissue, tissue_to_regions, tissue_to_release
from brats_psp.metrics import EMPTY_HD95_MM, dice, hd95

# hypothesis keeps its example database and caches in ./.hypothesis by default; keep them out of the checkout
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "brats_psp_hypothesis")
SETTINGS = settings(max_examples=50, deadline=None)
SHAPES = array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=7)
TISSUES = [int(t) for t in Tissue if t != Tissue.GTV]  # what region models handle (GTV is MEN-RT's alone)
REGION_RELEASES = sorted(r for r in RELEASES if RELEASES[r].has_regions)


def label_volumes(values: list[int]) -> st.SearchStrategy[np.ndarray]:
    return arrays(np.uint8, SHAPES, elements=st.sampled_from(values))


masks = arrays(np.bool_, SHAPES)


def mask_pairs() -> st.SearchStrategy[tuple[np.ndarray, np.ndarray]]:
    return SHAPES.flatmap(lambda shape: st.tuples(arrays(np.bool_, shape), arrays(np.bool_, shape)))


@st.composite
def release_and_label(draw: st.DrawFn) -> tuple[str, np.ndarray]:
    name = draw(st.sampled_from(REGION_RELEASES))
    return name, draw(label_volumes(list(RELEASES[name].values)))


@SETTINGS
@given(release_and_label())
def test_release_to_tissue_to_release_round_trips(case: tuple[str, np.ndarray]) -> None:
    name, label = case
    tissue = release_to_tissue(label, name)
    assert tissue.dtype == np.uint8 and tissue.shape == label.shape
    np.testing.assert_array_equal(tissue_to_release(tissue, name), label)


@SETTINGS
@given(st.sampled_from(REGION_RELEASES), label_volumes(TISSUES))
def test_tissue_to_release_to_tissue_keeps_what_the_release_can_say(name: str, tissue: np.ndarray) -> None:
    """Tissues the release has a value for come back unchanged; a paediatric cyst (CC) is core
    (NCR) where the release has no value for it; the others (RC before 2023) become background."""
    expressible = [int(t) for t in RELEASES[name].from_tissue]
    back = release_to_tissue(tissue_to_release(tissue, name), name)
    expected = np.where(np.isin(tissue, expressible), tissue, 0)
    if int(Tissue.CC) not in expressible:
        expected = np.where(tissue == Tissue.CC, int(Tissue.NCR), expected)
    np.testing.assert_array_equal(back, expected)


@SETTINGS
@given(label_volumes(TISSUES))
def test_regions_nest_and_round_trip(tissue: np.ndarray) -> None:
    regions = tissue_to_regions(tissue)
    wt, tc, et = (regions[REGION_NAMES.index(r)] for r in ("WT", "TC", "ET"))
    assert not (et & ~tc).any() and not (tc & ~wt).any()  # ET ⊆ TC ⊆ WT
    # RC (resection cavity) is in no region, so it does not survive the trip; a cyst (CC) comes
    # back as the rest of the core (NCR): the regions cannot tell them apart
    expected = np.where(tissue == Tissue.RC, 0, np.where(tissue == Tissue.CC, int(Tissue.NCR), tissue))
    np.testing.assert_array_equal(regions_to_tissue(regions), expected)


@SETTINGS
@given(SHAPES.flatmap(lambda shape: arrays(np.bool_, (3, *shape))))
def test_any_region_masks_give_nested_regions(regions: np.ndarray) -> None:
    """regions_to_tissue resolves inconsistent masks (ET outside TC, ...) into nested ones; WT is kept exactly."""
    again = tissue_to_regions(regions_to_tissue(regions))
    wt, tc, et = again
    assert not (et & ~tc).any() and not (tc & ~wt).any()
    np.testing.assert_array_equal(wt, regions.any(0))
    np.testing.assert_array_equal(et, regions[2])


@SETTINGS
@given(mask_pairs())
def test_dice_is_symmetric_and_bounded(pair: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = pair
    d = dice(a, b)
    assert 0.0 <= d <= 1.0 and d == dice(b, a)
    assert dice(a, a) == 1.0 and dice(b, b) == 1.0
    if a.any() and not (a & b).any():
        assert d == 0.0


@SETTINGS
@given(mask_pairs(), st.tuples(*[st.sampled_from([0.5, 1.0, 1.5, 3.0])] * 3))
def test_hd95_is_symmetric_and_zero_on_itself(pair: tuple[np.ndarray, np.ndarray], spacing: tuple[float, float, float]) -> None:
    a, b = pair
    h = hd95(a, b, spacing)
    assert h == hd95(b, a, spacing) and h >= 0.0
    assert hd95(a, a, spacing) == 0.0
    if a.any() != b.any():
        assert h == EMPTY_HD95_MM
    elif a.any():
        extent = float(np.linalg.norm(np.asarray(a.shape) * np.asarray(spacing)))
        assert h <= extent  # a distance inside the volume
