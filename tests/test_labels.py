"""Each release's and task's labels map to the right WT/TC/ET voxels, and back."""

from __future__ import annotations

import re

import numpy as np
import pytest

from brats_psp.labels import (
    REGION_NAMES,
    RELEASES,
    TASKS,
    LabelValueError,
    NoRegionsError,
    Tissue,
    UnknownTaskError,
    convention_for,
    region_presence,
    task_of,
    regions_to_tissue,
    release_to_regions,
    release_to_tissue,
    tissue_to_regions,
    tissue_to_release,
)

# One voxel per label value of each release, with the regions it must fall in (WT, TC, ET),
# written out by hand from shared/REFERENCE.md.
EXPECTED = {
    "brats2021": {0: (0, 0, 0), 1: (1, 1, 0), 2: (1, 0, 0), 4: (1, 1, 1)},
    "brats2023": {0: (0, 0, 0), 1: (1, 1, 0), 2: (1, 0, 0), 3: (1, 1, 1), 4: (0, 0, 0)},
    "msd": {0: (0, 0, 0), 1: (1, 0, 0), 2: (1, 1, 0), 3: (1, 1, 1)},
    # Paediatric: 1 ET, 2 NETC, 3 CC (cystic component), 4 ED; TC = 1|2|3, WT = 1|2|3|4.
    "brats2023-ped": {0: (0, 0, 0), 1: (1, 1, 1), 2: (1, 1, 0), 3: (1, 1, 0), 4: (1, 0, 0)},
}
REGION_CONVENTIONS = sorted(r for r in RELEASES if RELEASES[r].has_regions)


@pytest.mark.parametrize("release", sorted(EXPECTED))
def test_release_labels_map_to_regions(release: str) -> None:
    values = np.array(sorted(EXPECTED[release]), dtype=np.uint8).reshape(-1, 1, 1)
    regions = release_to_regions(values, release)
    assert regions.shape == (3, len(values), 1, 1)
    got = {int(v): tuple(int(x) for x in regions[:, i, 0, 0]) for i, v in enumerate(values.ravel())}
    assert got == EXPECTED[release]


def test_region_values_are_the_reference_table() -> None:
    assert RELEASES["brats2021"].region_values("WT") == (1, 2, 4)
    assert RELEASES["brats2021"].region_values("TC") == (1, 4)
    assert RELEASES["brats2021"].region_values("ET") == (4,)
    assert RELEASES["brats2023"].region_values("ET") == (3,)
    assert RELEASES["brats2023"].region_values("TC") == (1, 3)
    # MSD label 2 is non-enhancing tumour: part of TC, never ET.
    assert RELEASES["msd"].region_values("TC") == (2, 3)
    assert RELEASES["msd"].region_values("ET") == (3,)
    assert RELEASES["brats2023-ped"].region_values("WT") == (1, 2, 3, 4)
    assert RELEASES["brats2023-ped"].region_values("TC") == (1, 2, 3)
    assert RELEASES["brats2023-ped"].region_values("ET") == (1,)


@pytest.mark.parametrize("release", REGION_CONVENTIONS)
def test_round_trip_through_tissue(release: str) -> None:
    rng = np.random.default_rng(1)
    values = np.array([v for v in RELEASES[release].values])
    label = rng.choice(values, size=(7, 6, 5)).astype(np.uint8)
    tissue = release_to_tissue(label, release)
    np.testing.assert_array_equal(tissue_to_release(tissue, release), label)


@pytest.mark.parametrize("release", REGION_CONVENTIONS)
def test_round_trip_through_regions(release: str) -> None:
    """Predicted regions -> label map in the release's convention -> the same regions."""
    rng = np.random.default_rng(2)
    tissue = rng.choice([0, 1, 2, 3], size=(9, 8, 4)).astype(np.uint8)
    regions = tissue_to_regions(tissue)
    back = regions_to_tissue(regions)
    np.testing.assert_array_equal(back, tissue)
    label = tissue_to_release(back, release)
    np.testing.assert_array_equal(release_to_regions(label, release), regions)


def test_converting_between_releases() -> None:
    brats2021 = np.array([0, 1, 2, 4], dtype=np.uint8)
    assert tissue_to_release(release_to_tissue(brats2021, "brats2021"), "brats2023").tolist() == [0, 1, 2, 3]
    assert tissue_to_release(release_to_tissue(brats2021, "brats2021"), "msd").tolist() == [0, 2, 1, 3]


def test_resection_cavity_is_in_no_region_and_lost_outside_2023() -> None:
    tissue = release_to_tissue(np.array([4]), "brats2023")
    assert tissue.tolist() == [Tissue.RC]
    assert not tissue_to_regions(tissue).any()
    assert tissue_to_release(tissue, "brats2021").tolist() == [0]


def test_inconsistent_regions_resolve_to_nested_tissue() -> None:
    regions = np.zeros((3, 4), bool)
    regions[2, 0] = True  # ET without WT/TC -> still ET
    regions[1, 1] = True  # TC without WT -> NCR
    regions[0, 2] = True  # WT only -> ED
    assert regions_to_tissue(regions).tolist() == [Tissue.ET, Tissue.NCR, Tissue.ED, Tissue.BACKGROUND]


@pytest.mark.parametrize(
    ("release", "values", "bad"),
    [("brats2021", [0, 1, 3], [3]), ("brats2023", [0, 5], [5]), ("msd", [0, 4, 7], [4, 7]), ("brats2021", [-1, 0], [-1])],
)
def test_label_values_outside_the_release_are_named(release: str, values: list[int], bad: list[int]) -> None:
    with pytest.raises(LabelValueError, match=re.escape(f"label values {bad} are outside the {release} set")):
        release_to_tissue(np.array(values), release)


def test_non_integer_labels_are_refused() -> None:
    with pytest.raises(LabelValueError, match="not integers"):
        release_to_tissue(np.array([0.0, 1.5]), "brats2021")
    assert release_to_tissue(np.array([0.0, 4.0]), "brats2021").tolist() == [0, Tissue.ET]


def test_unknown_release() -> None:
    with pytest.raises(ValueError, match="unknown label convention 'brats2019'"):
        release_to_tissue(np.zeros(3), "brats2019")


def test_region_presence_per_axial_slice() -> None:
    tissue = np.zeros((4, 4, 3), np.uint8)
    tissue[1, 1, 0] = Tissue.ED
    tissue[2, 2, 2] = Tissue.ET
    presence = region_presence(tissue_to_regions(tissue))
    assert presence.shape == (3, len(REGION_NAMES))
    assert presence.tolist() == [[1, 0, 0], [0, 0, 0], [1, 1, 1]]


@pytest.mark.parametrize(
    ("case_id", "task", "convention"),
    [
        ("BraTS-GLI-00001-000", "GLI", "brats2023"),
        ("BraTS-SSA-00002-000", "SSA", "brats2023"),
        ("BraTS-GoAT-00003", "GoAT", "brats2023"),
        ("BraTS-MEN-00004-000", "MEN", "brats2023"),
        ("BraTS-MET-00110-000", "MET", "brats2023"),
        ("BraTS-PED-00012-000", "PED", "brats2023-ped"),
        ("BraTS-MEN-RT-0005-1", "MEN-RT", "brats2023-men-rt"),
    ],
)
def test_the_task_comes_from_the_case_id(case_id: str, task: str, convention: str) -> None:
    assert task_of(case_id) == task
    assert convention_for(case_id, "brats2023") == convention == TASKS[task]


@pytest.mark.parametrize("case_id", ["BraTS-XYZ-00001-000", "patient7"])
def test_an_unknown_task_is_refused_with_how_to_force_one(case_id: str) -> None:
    with pytest.raises(UnknownTaskError, match=re.escape(case_id) + ".*force one with data.task="):
        convention_for(case_id, "brats2023")
    assert convention_for(case_id, "brats2023", task="ped") == "brats2023-ped"  # forced


def test_a_forced_task_wins_over_the_id_and_is_checked() -> None:
    assert convention_for("BraTS-GLI-00001-000", "brats2023", task="PED") == "brats2023-ped"
    assert convention_for("BraTS2021_00000", "brats2021") == "brats2021"
    with pytest.raises(UnknownTaskError, match="unknown task 'kids'"):
        convention_for("BraTS-GLI-00001-000", "brats2023", task="kids")
    with pytest.raises(ValueError, match="needs BraTS 2023"):
        convention_for("BraTS2021_00000", "brats2021", task="ped")


def test_paediatric_labels_round_trip_and_a_cyst_is_core() -> None:
    """Labels -> tissue -> labels keeps every PED value; regions -> labels cannot tell the
    cyst (3) from the rest of the core, so a region prediction writes the core as NETC (2)."""
    label = np.array([0, 1, 2, 3, 4], np.uint8)
    tissue = release_to_tissue(label, "brats2023-ped")
    assert tissue.tolist() == [Tissue.BACKGROUND, Tissue.ET, Tissue.NCR, Tissue.CC, Tissue.ED]
    np.testing.assert_array_equal(tissue_to_release(tissue, "brats2023-ped"), label)
    predicted = tissue_to_release(regions_to_tissue(tissue_to_regions(tissue)), "brats2023-ped")
    assert predicted.tolist() == [0, 1, 2, 2, 4]
    # The same tumour written as GLI: the cyst is necrosis (1), edema 2, ET 3.
    assert tissue_to_release(tissue, "brats2023").tolist() == [0, 3, 1, 1, 2]


def test_men_rt_has_no_regions_and_region_models_refuse_it() -> None:
    for convert in (release_to_tissue, release_to_regions, tissue_to_release):
        with pytest.raises(NoRegionsError, match="MEN-RT: one label, 1 = GTV.*no WT/TC/ET regions"):
            convert(np.array([0, 1]), "brats2023-men-rt")
