"""Tests of the synthetic BraTS-like dataset (brats_psp.data.synthetic).

Eight cases are generated once per module (about 1.5-2 s each) and shared.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scipy import ndimage as ndi

from brats_psp.data import synthetic
from brats_psp.data.layouts import LAYOUTS, MODALITIES
from brats_psp.data.synthetic.anatomy import SITE_WEIGHTS, STRUCTURES, atrophy, load_template, random_geometry, warp_anatomy
from brats_psp.data.synthetic.grid import BRATS_SHAPE
from brats_psp.data.synthetic.lesion import LesionPlan, draw_lesion, plan_lesions
from brats_psp.data.synthetic import (
    BRATS_AFFINE,
    BRATS_SHAPE,
    SyntheticCase,
    case_id_for,
    generate_case,
    write_case,
    write_dataset,
)
from brats_psp.labels import Tissue, tissue_to_release

N_CASES = 8


@pytest.fixture(scope="module")
def cases() -> list[SyntheticCase]:
    return [generate_case(i, seed=0) for i in range(N_CASES)]


_SUB = (slice(None, None, 2),) * 3  # every 8th voxel: enough for means and medians, 8x cheaper


def _normal_wm(case: SyntheticCase) -> np.ndarray:
    """Normal-appearing white matter on the ``_SUB`` grid: away from the lesion, brightest T1 quartile."""
    t1 = case.images["t1"][_SUB]
    lesion = case.tissue[_SUB] > 0
    far = (t1 > 0) & ~lesion
    # Drop a margin around the lesion (partial volume, soft edema edge).
    box = np.argwhere(lesion)
    if len(box):
        lo, hi = box.min(0) - 3, box.max(0) + 4
        far[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = False
    return far & (t1 > np.percentile(t1[far], 75))


def _lesion_box(case: SyntheticCase) -> tuple[slice, ...]:
    """Bounding box of the lesion (its labels, in the full grid)."""
    where = np.argwhere(case.tissue > 0)
    return tuple(slice(int(a), int(b) + 1) for a, b in zip(where.min(0), where.max(0)))


# --------------------------------------------------------------------------- basics


def test_case_ids() -> None:
    assert case_id_for(0, "brats2021") == "BraTS2021_00000"
    assert case_id_for(12, "brats2023") == "BraTS-GLI-00012-000"
    assert case_id_for(0, "msd") == "BRATS_001"
    assert case_id_for(41, "msd") == "BRATS_042"
    with pytest.raises(ValueError):
        case_id_for(0, "brats2019")


def test_shapes_dtypes_affine(cases: list[SyntheticCase]) -> None:
    case = cases[0]
    assert case.case_id == "BraTS2021_00000"
    assert set(case.images) == set(MODALITIES)
    for modality, img in case.images.items():
        assert img.shape == BRATS_SHAPE, modality
        assert img.dtype == np.int16, modality
    assert case.tissue.shape == BRATS_SHAPE
    assert case.tissue.dtype == np.uint8
    assert case.affine.dtype == np.float64
    np.testing.assert_array_equal(
        case.affine, [[-1, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]]
    )
    np.testing.assert_array_equal(BRATS_AFFINE, case.affine)


def test_intensities_like_brats(cases: list[SyntheticCase]) -> None:
    medians: dict[str, list[float]] = {m: [] for m in MODALITIES}
    for case in cases:
        brain = case.images["t1"] > 0
        # Brain-sized (BraTS brains hold ~1.2-2.1 million 1 mm voxels), the four contrasts share it.
        assert 1.1e6 < brain.sum() < 2.3e6, case.case_id
        for modality, img in case.images.items():
            assert np.array_equal(img > 0, brain), (case.case_id, modality)
            assert img.min() == 0
            sub = img[_SUB]
            medians[modality].append(float(np.median(sub[sub > 0])))
            assert 100 < medians[modality][-1] < 5000, (case.case_id, modality, medians[modality][-1])
        # The brain fits in the grid: nothing on the in-plane borders or in the top slice.
        assert not brain[[0, -1], :, :].any() and not brain[:, [0, -1], :].any()
        assert not brain[:, :, -1].any(), case.case_id
    # A per-scan intensity scale: absolute intensities differ between cases, as in real MRI.
    for modality, values in medians.items():
        assert max(values) / min(values) > 1.3, (modality, values)


def test_labels_inside_brain(cases: list[SyntheticCase]) -> None:
    for case in cases:
        assert set(np.unique(case.tissue)) <= {0, 1, 2, 3}, case.case_id
        brain = case.images["flair"] > 0
        assert not (case.tissue[~brain] > 0).any(), case.case_id
        assert (case.tissue > 0).sum() > 500, case.case_id


# --------------------------------------------------------------------------- determinism


def test_deterministic(cases: list[SyntheticCase]) -> None:
    # Case 2 alone (own RNG: default_rng([seed, index])) equals case 2 generated after 0 and 1;
    # fmt only changes the case id.
    again = generate_case(2, seed=0, fmt="msd")
    assert again.case_id == "BRATS_003"
    np.testing.assert_array_equal(again.tissue, cases[2].tissue)
    for modality in MODALITIES:
        np.testing.assert_array_equal(again.images[modality], cases[2].images[modality])


def test_cases_differ(cases: list[SyntheticCase]) -> None:
    assert not np.array_equal(cases[0].tissue, cases[1].tissue)
    assert not np.array_equal(cases[0].images["t1"], cases[1].images["t1"])
    # ... and the anatomy itself differs (random affine + elastic), not only the lesion.
    assert not np.array_equal(cases[0].images["t1"] > 0, cases[1].images["t1"] > 0)


# --------------------------------------------------------------------------- contrasts


def _class_means(case: SyntheticCase) -> dict[str, dict[str, float]]:
    """Mean of each contrast over normal white matter and over each label with >= 100 voxels
    (its inner part, one voxel in from its edge, where that has 100)."""
    wm = _normal_wm(case)
    mean = {m: {"wm": float(case.images[m][_SUB][wm].mean())} for m in MODALITIES}
    box = _lesion_box(case)
    tissue = case.tissue[box]
    for name, code in (("ncr", Tissue.NCR), ("ed", Tissue.ED), ("et", Tissue.ET)):
        region = tissue == code
        inner = ndi.binary_erosion(region)  # away from the soft edges, where classes mix
        if inner.sum() >= 100:
            region = inner
        if region.sum() >= 100:
            for m in MODALITIES:
                mean[m][name] = float(case.images[m][box][region].mean())
    return mean


def test_robust_contrast_rules(cases: list[SyntheticCase]) -> None:
    # Only the cues that hold on every scanner are fixed: enhancement brighter on T1ce than on
    # T1 (relative to white matter), edema bright on FLAIR and T2, the order of normal tissue.
    checked = {"et": 0, "ed": 0}
    for case in cases:
        mean = _class_means(case)
        for m, brighter in (("t1", True), ("t2", False)):
            sub = case.images[m][_SUB]
            assert (mean[m]["wm"] > np.median(sub[sub > 0])) == brighter, (case.case_id, m)
        if "et" in mean["t1ce"]:
            checked["et"] += 1
            t1ce_ratio = mean["t1ce"]["et"] / mean["t1ce"]["wm"]
            # enhancement may be faint against white matter, but it is brighter than the edema
            # around it after contrast, and brighter than before contrast
            if "ed" in mean["t1ce"]:
                assert mean["t1ce"]["et"] > 1.1 * mean["t1ce"]["ed"], (case.case_id, mean["t1ce"])
            assert t1ce_ratio > mean["t1"]["et"] / mean["t1"]["wm"], case.case_id
        if "ed" in mean["flair"]:
            checked["ed"] += 1
            assert mean["flair"]["ed"] > 1.15 * mean["flair"]["wm"], case.case_id
            assert mean["t2"]["ed"] > 1.15 * mean["t2"]["wm"], case.case_id
    assert min(checked.values()) >= 3, checked


def test_appearance_changes_across_cases(cases: list[SyntheticCase]) -> None:
    # SynthSeg-style randomisation: the relative intensities of tissues differ from case to
    # case, widely (a core may be darker than edema on FLAIR in one case, as bright in another).
    gm_wm = []
    core_ed = []
    for case in cases:
        mean = _class_means(case)
        t1 = case.images["t1"][_SUB]
        brain = (t1 > 0) & (case.tissue[_SUB] == 0)
        gm_wm.append(np.percentile(t1[brain], 30) / mean["t1"]["wm"])
        if "ncr" in mean["flair"] and "ed" in mean["flair"]:
            core_ed.append(mean["flair"]["ncr"] / mean["flair"]["ed"])
    assert max(gm_wm) - min(gm_wm) > 0.1, gm_wm
    assert len(core_ed) >= 3 and max(core_ed) / min(core_ed) > 1.3, core_ed


def test_non_tumour_enhancing_structures_are_background(cases: list[SyntheticCase]) -> None:
    # Vessels, sinuses, choroid plexus and dura are bright on T1ce, far from any lesion, labelled 0.
    for case in cases[:4]:
        t1ce = case.images["t1ce"].astype(np.float32)
        wm = _normal_wm(case)
        ref = float(t1ce[_SUB][wm].mean())
        lesion = ndi.binary_dilation(case.tissue > 0, iterations=10)
        bright = (t1ce > 1.3 * ref) & ~lesion
        assert bright.sum() > 300, (case.case_id, int(bright.sum()))
        assert not (case.tissue[bright] > 0).any()


def test_anatomy_structures_and_atrophy() -> None:
    tpl = load_template()
    rng = np.random.default_rng(3)
    geo = random_geometry(rng, tpl)
    anatomy = warp_anatomy(rng, tpl, geo, [])
    inside = anatomy.brain
    np.testing.assert_allclose((anatomy.csf + anatomy.gm + anatomy.wm)[inside], 1.0, atol=1e-4)
    for name in STRUCTURES:
        weight = anatomy.structures[name]
        assert weight.max() > 0.5, name  # each structure is drawn
        assert not weight[~inside].any(), name  # inside the brain only
    # The choroid plexus lies in the ventricles (CSF), the vessels mostly in sulcal CSF.
    assert anatomy.csf[anatomy.structures["choroid"] > 0.5].mean() > 0.5
    # Atrophy grows the CSF into the tissue around it.
    csf_before = float(anatomy.csf.sum())
    atrophy(np.random.default_rng(0), anatomy, level=2.0)
    assert float(anatomy.csf.sum()) > 1.2 * csf_before
    np.testing.assert_allclose((anatomy.csf + anatomy.gm + anatomy.wm)[inside], 1.0, atol=1e-4)


def test_lesion_sites_sizes_and_kinds_cover_the_ranges() -> None:
    # 240 lesion plans (cheap: no drawing): every glioma region is used, frontal and temporal
    # most, radii from a few mm to over 20 mm, the three kinds and the core interiors.
    tpl = load_template()
    plans = []
    for i in range(240):
        rng = np.random.default_rng([99, i])
        plans += plan_lesions(rng, i, random_geometry(rng, tpl), tpl)
    regions = [p.region for p in plans]
    counts = {r: regions.count(r) for r in SITE_WEIGHTS}
    assert all(counts[r] > 0 for r in SITE_WEIGHTS), counts
    assert counts["frontal"] > counts["cerebellum"] and counts["temporal"] > counts["brainstem"], counts
    radii = np.array([p.radii.mean() for p in plans])
    assert radii.min() < 4.0 and radii.max() > 20.0, (radii.min(), radii.max())
    core_ml = 4.0 / 3.0 * np.pi * np.prod([p.radii for p in plans], axis=1) / 1000.0
    assert core_ml.min() < 0.5 and core_ml.max() > 40.0
    assert {p.kind for p in plans} == {"gbm", "solid", "lgg"}
    assert {p.interior for p in plans} >= {"necrotic", "cystic", "haemorrhagic", "solid", "net"}
    assert len(plans) > 240  # some cases are multifocal


def test_a_small_low_grade_focus_with_a_cyst_draws() -> None:
    # a second focus can be low-grade with a mean radius under 3.3 mm; its cyst (30 % of
    # low-grade cores) used to draw uniform(2, < 2) mm and raise
    brain = np.ones(BRATS_SHAPE, bool)
    brain[:5] = False
    wm = brain.astype(np.float32)
    plan = LesionPlan(
        kind="lgg", interior="net", centre_vox=np.array([120.0, 120.0, 77.0]), radii=np.array([2.6, 2.6, 2.6]),
        orientation=np.eye(3), edema_reach=2.0, push=0.0, region="frontal",
    )
    cysts = 0
    for seed in range(12):
        les = draw_lesion(np.random.default_rng(seed), plan, wm, brain)
        assert (les.tissue == Tissue.NCR).any() and not (les.tissue == Tissue.ET).any()
        cysts += bool(les.weights["cyst"].max() > 0.5)
    assert cysts > 0


def test_edema_spares_the_cortex_in_appearance_but_labels_cover_the_front() -> None:
    # vasogenic edema is water in the white matter: most lesions' edema looks faint over grey
    # matter (the spared gyri between its fingers), some infiltrate it; the ED label is the
    # whole front either way, as annotators outline the FLAIR signal around spared gyri
    brain = np.ones(BRATS_SHAPE, bool)
    brain[:5] = False
    wm = np.zeros(BRATS_SHAPE, np.float32)
    wm[:, :, :77] = 1.0  # white matter below the lesion's centre plane, grey matter above
    plan = LesionPlan(
        kind="gbm", interior="necrotic", centre_vox=np.array([120.0, 120.0, 77.0]), radii=np.array([10.0, 10.0, 10.0]),
        orientation=np.eye(3), edema_reach=12.0, push=0.0, region="frontal",
    )
    ratios = []
    for seed in range(20):
        les = draw_lesion(np.random.default_rng(seed), plan, wm, brain)
        ed = les.tissue == Tissue.ED
        grey = wm[les.box] < 0.5
        assert (ed & grey).sum() > 0.1 * ed.sum()  # the label covers the grey-matter side too
        ratios.append(les.weights["ed"][ed & grey].mean() / les.weights["ed"][ed & ~grey].mean())
    ratios = np.array(ratios)
    assert (ratios < 0.3).sum() >= 10  # most spare the cortex
    assert ratios.max() > 2 * np.median(ratios)  # some infiltrate it


def test_flair_suppresses_csf(cases: list[SyntheticCase]) -> None:
    # CSF (the brightest T2 voxels: ventricles) is dark on FLAIR, so its FLAIR/T2 ratio is
    # far below that of white matter.
    case = cases[0]
    t2 = case.images["t2"][_SUB].astype(np.float64)
    flair = case.images["flair"][_SUB].astype(np.float64)
    brain = (t2 > 0) & (case.tissue[_SUB] == 0)
    csf = brain & (t2 > np.percentile(t2[brain], 98))
    wm = _normal_wm(case)
    assert flair[csf].mean() / t2[csf].mean() < 0.5 * flair[wm].mean() / t2[wm].mean()


# --------------------------------------------------------------------------- variety


def test_variety(cases: list[SyntheticCase]) -> None:
    et = [int((c.tissue == Tissue.ET).sum()) for c in cases]
    ncr = [int((c.tissue == Tissue.NCR).sum()) for c in cases]
    wt = [int((c.tissue > 0).sum()) for c in cases]
    assert any(v == 0 for v in et), et  # low-grade-like cases without enhancing tumour
    assert sum(v > 0 for v in et) >= N_CASES // 2, et
    assert all(n > 0 for n, e in zip(ncr, et) if e == 0), (ncr, et)  # ET-free cases still have a core
    assert max(wt) > 4 * min(wt), wt  # lesion volumes vary
    assert min(wt) < 20_000, wt  # some small lesions (under 20 mL)
    # Lesions in different places: centroids spread over both hemispheres (x is left-right).
    centres = np.array([np.argwhere(c.tissue > 0).mean(0) for c in cases])
    assert centres[:, 0].min() < 120 < centres[:, 0].max(), centres


# --------------------------------------------------------------------------- writing


def _load(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = nib.load(path)
    return np.asanyarray(img.dataobj), img


@pytest.mark.parametrize(
    ("fmt", "suffixes", "et_value"),
    [
        ("brats2021", {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}, 4),
        ("brats2023", {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}, 3),
    ],
)
def test_write_case_per_contrast_layouts(
    cases: list[SyntheticCase], tmp_path: Path, fmt: str, suffixes: dict[str, str], et_value: int
) -> None:
    case = dataclasses.replace(cases[0], case_id=case_id_for(0, fmt))
    paths = write_case(case, tmp_path, fmt=fmt)
    sep = LAYOUTS[fmt].separator
    expected = {tmp_path / case.case_id / f"{case.case_id}{sep}{s}.nii.gz" for s in [*suffixes.values(), "seg"]}
    assert set(paths) == expected
    assert sorted(p.name for p in (tmp_path / case.case_id).iterdir()) == sorted(p.name for p in expected)
    for modality, suffix in suffixes.items():
        data, img = _load(tmp_path / case.case_id / f"{case.case_id}{sep}{suffix}.nii.gz")
        assert img.get_data_dtype() == np.int16
        assert data.shape == BRATS_SHAPE
        np.testing.assert_array_equal(img.affine, BRATS_AFFINE)
        np.testing.assert_array_equal(data, case.images[modality])
    seg, img = _load(tmp_path / case.case_id / f"{case.case_id}{sep}seg.nii.gz")
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(img.affine, BRATS_AFFINE)
    assert set(np.unique(seg)) == {0, 1, 2, et_value}
    np.testing.assert_array_equal(seg == et_value, case.tissue == Tissue.ET)
    np.testing.assert_array_equal(seg == 1, case.tissue == Tissue.NCR)
    np.testing.assert_array_equal(seg == 2, case.tissue == Tissue.ED)


def test_write_case_msd(cases: list[SyntheticCase], tmp_path: Path) -> None:
    case = dataclasses.replace(cases[0], case_id=case_id_for(0, "msd"))
    paths = write_case(case, tmp_path, fmt="msd")
    image_path = tmp_path / "imagesTr" / "BRATS_001.nii.gz"
    label_path = tmp_path / "labelsTr" / "BRATS_001.nii.gz"
    assert paths == [image_path, label_path]
    data, img = _load(image_path)
    assert data.shape == (*BRATS_SHAPE, 4)
    assert img.get_data_dtype() == np.int16
    np.testing.assert_array_equal(img.affine, BRATS_AFFINE)
    for channel, modality in enumerate(("flair", "t1", "t1ce", "t2")):
        np.testing.assert_array_equal(data[..., channel], case.images[modality])
    label, _ = _load(label_path)
    assert label.shape == BRATS_SHAPE
    # MSD: 1 edema, 2 non-enhancing/necrotic core, 3 enhancing tumour.
    np.testing.assert_array_equal(label == 1, case.tissue == Tissue.ED)
    np.testing.assert_array_equal(label == 2, case.tissue == Tissue.NCR)
    np.testing.assert_array_equal(label == 3, case.tissue == Tissue.ET)


def test_write_case_without_label(cases: list[SyntheticCase], tmp_path: Path) -> None:
    paths = write_case(cases[1], tmp_path, with_label=False)
    assert len(paths) == 4
    assert not (tmp_path / cases[1].case_id / f"{cases[1].case_id}_seg.nii.gz").exists()


def test_write_dataset_msd_and_rerun(
    cases: list[SyntheticCase], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    generated: list[SyntheticCase] = []
    real_generate = synthetic.generate_case

    def counting_generate(index: int, seed: int = 0, fmt: str = "brats2021") -> SyntheticCase:
        calls.append(index)
        generated.append(real_generate(index, seed=seed, fmt=fmt))
        return generated[-1]

    monkeypatch.setattr(synthetic, "generate_case", counting_generate)
    ids = write_dataset(tmp_path, 1, seed=5, fmt="msd")
    assert ids == ["BRATS_001"]
    assert calls == [0]
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
    assert meta["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert meta["numTraining"] == 1
    assert meta["training"] == [{"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}]
    assert "name" in meta
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert [p.relative_to(tmp_path).as_posix() for p in files] == [
        "dataset.json",
        "imagesTr/BRATS_001.nii.gz",
        "labelsTr/BRATS_001.nii.gz",
    ]
    mtimes = {p: p.stat().st_mtime_ns for p in files}

    # A re-run does no work: nothing generated, no file rewritten.
    assert write_dataset(tmp_path, 1, seed=5, fmt="msd") == ["BRATS_001"]
    assert calls == [0]
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes

    # The label is the generated case's, in MSD values; another seed gives another dataset.
    label, _ = _load(tmp_path / "labelsTr" / "BRATS_001.nii.gz")
    np.testing.assert_array_equal(label, tissue_to_release(generated[0].tissue, "msd"))
    assert not np.array_equal(generated[0].tissue, cases[0].tissue)


def test_write_dataset_skips_existing_cases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def fake_generate(index: int, seed: int = 0, fmt: str = "brats2021") -> SyntheticCase:
        calls.append(index)
        zeros = np.zeros((2, 2, 2), np.int16)
        return SyntheticCase(
            case_id_for(index, fmt), {m: zeros for m in MODALITIES}, np.zeros((2, 2, 2), np.uint8), BRATS_AFFINE
        )

    monkeypatch.setattr(synthetic, "generate_case", fake_generate)
    assert write_dataset(tmp_path, 2) == ["BraTS2021_00000", "BraTS2021_00001"]
    assert calls == [0, 1]
    # Case 1 loses a file: only it is generated again; a larger dataset adds the new cases.
    (tmp_path / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz").unlink()
    write_dataset(tmp_path, 3, progress=True)
    assert calls == [0, 1, 1, 2]


def test_write_dataset_with_workers_equals_one_worker(tmp_path: Path) -> None:
    one = write_dataset(tmp_path / "one", 2, seed=7, fmt="brats2023")
    two = write_dataset(tmp_path / "two", 2, seed=7, fmt="brats2023", workers=2)
    assert one == two == ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000"]
    for cid in one:
        for path in sorted((tmp_path / "one" / cid).iterdir()):
            a, _ = _load(path)
            b, _ = _load(tmp_path / "two" / cid / path.name)
            np.testing.assert_array_equal(a, b)
