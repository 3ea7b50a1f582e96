"""BraTS 2023+ tasks: each case is read, predicted and scored in its own task's label convention.

The paediatric task (``BraTS-PED-*``: 1 ET, 2 NETC, 3 CC, 4 ED) shares the GLI file names but
not its labels; the same tumour written as PED and as GLI must give the same regions at every
stage, and MEN-RT (one label) is refused by the region model with a message that says why.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brats_psp.config import load_config
from brats_psp.data.cache import CachedVolume, entry_dir
from brats_psp.data.discovery import discover_cases
from brats_psp.data.preprocess import preprocess_dataset
from brats_psp.evaluation import evaluate
from brats_psp.labels import RELEASES, Tissue, release_to_regions, tissue_to_release
from brats_psp.segment import segment_cases
from tests.conftest import REPO, untrained_checkpoint, write_case

GLI, PED = "BraTS-GLI-00003-000", "BraTS-PED-00003-000"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


def _same_tumour_as_gli_and_ped(root: Path) -> None:
    """One case written twice: ``gli/`` in the GLI convention, ``ped/`` in the paediatric one."""
    write_case(root / "gli", "brats2023", GLI, seed=3)
    write_case(root / "ped", "brats2023", PED, seed=3, labels="brats2023-ped")


def test_discovery_gives_each_case_its_task_convention(tmp_path: Path) -> None:
    write_case(tmp_path, "brats2023", GLI)
    write_case(tmp_path, "brats2023", PED, labels="brats2023-ped")
    write_case(tmp_path, "brats2023", "BraTS-MET-00110-000")
    write_case(tmp_path, "brats2023", "BraTS-XYZ-00001-000")  # a task nobody knows
    found = discover_cases(tmp_path)
    assert {c.case_id: c.labels for c in found.cases} == {GLI: "brats2023", PED: "brats2023-ped", "BraTS-MET-00110-000": "brats2023"}
    (failure,) = found.failures
    assert failure.case_id == "BraTS-XYZ-00001-000" and "force one with data.task=" in str(failure)
    forced = discover_cases(tmp_path, task="ped")  # every case read as paediatric
    assert {c.labels for c in forced.cases} == {"brats2023-ped"} and len(forced.cases) == 4
    # a datalist entry may name its convention
    entry = {"image": [str(p) for p in found.cases[0].images], "label": str(found.cases[0].label), "labels": "brats2023-ped"}
    (tmp_path / "list.json").write_text(json.dumps({"training": [entry]}))
    assert discover_cases(tmp_path / "list.json").cases[0].labels == "brats2023-ped"


def test_paediatric_cases_are_preprocessed_in_their_convention(tmp_path: Path) -> None:
    _same_tumour_as_gli_and_ped(tmp_path)
    cfg = load_config(REPO / "configs" / "smoke.yaml", ["data.spacing=[2.0,2.0,2.0]"]).data
    for name in ("gli", "ped"):
        result = preprocess_dataset(tmp_path / name, tmp_path / f"cache_{name}", cfg, progress=False)
        assert not result.failures
    gli = np.asarray(CachedVolume(entry_dir(tmp_path / "cache_gli", GLI)).label)
    ped = np.asarray(CachedVolume(entry_dir(tmp_path / "cache_ped", PED)).label)
    assert (gli == Tissue.ET).any() and (gli == Tissue.ED).any()
    np.testing.assert_array_equal(ped, gli)  # the same tissues, though the files' values differ


def test_paediatric_cases_are_predicted_and_scored_as_well_as_gli(checkpoint: Path, tmp_path: Path) -> None:
    _same_tumour_as_gli_and_ped(tmp_path)
    scores = {}
    for name, cid in (("gli", GLI), ("ped", PED)):
        result = segment_cases(str(checkpoint), tmp_path / name, tmp_path / f"pred_{name}", progress=False)
        assert not result.failures
        scores[name] = evaluate(tmp_path / f"pred_{name}", tmp_path / name, tmp_path / f"eval_{name}")
        assert not scores[name].failures
    gli_pred = np.asarray(nib.load(str(tmp_path / "pred_gli" / f"{GLI}.nii.gz")).dataobj)
    ped_pred = np.asarray(nib.load(str(tmp_path / "pred_ped" / f"{PED}.nii.gz")).dataobj)
    assert set(np.unique(ped_pred).tolist()) <= {0, 1, 2, 4}  # CC (3) is never predicted
    regions = release_to_regions(gli_pred, "brats2023")
    assert regions.any(axis=(1, 2, 3)).all(), "the test needs a prediction with every region"
    np.testing.assert_array_equal(release_to_regions(ped_pred, "brats2023-ped"), regions)
    np.testing.assert_array_equal(ped_pred, tissue_to_release(regions_tissue := _tissue(gli_pred), "brats2023-ped"))
    assert regions_tissue.max() <= Tissue.ET
    strip = lambda rows: [{k: v for k, v in r.items() if k != "case"} for r in rows]
    assert strip(scores["ped"].rows) == strip(scores["gli"].rows)
    # read with the GLI convention (what happened before tasks were known) the scores differ
    wrong = evaluate(tmp_path / "pred_ped", tmp_path / "ped", tmp_path / "eval_wrong", task="GLI")
    assert strip(wrong.rows) != strip(scores["gli"].rows)


def _tissue(label: np.ndarray) -> np.ndarray:
    from brats_psp.labels import release_to_tissue

    return release_to_tissue(label, "brats2023")


def test_paediatric_references_as_label_files_alone(checkpoint: Path, tmp_path: Path) -> None:
    _same_tumour_as_gli_and_ped(tmp_path)
    segment_cases(str(checkpoint), tmp_path / "ped", tmp_path / "pred", progress=False)
    flat = tmp_path / "labels"
    flat.mkdir()
    shutil.copy(tmp_path / "ped" / PED / f"{PED}-seg.nii.gz", flat)
    alone = evaluate(tmp_path / "pred", flat, tmp_path / "e1")
    full = evaluate(tmp_path / "pred", tmp_path / "ped", tmp_path / "e2")
    assert not alone.failures and alone.rows == full.rows


def test_msd_labels_folder_alone(checkpoint: Path, tmp_path: Path) -> None:
    write_case(tmp_path / "msd", "msd", "BRATS_001")
    segment_cases(str(checkpoint), tmp_path / "msd", tmp_path / "pred", progress=False)
    alone = evaluate(tmp_path / "pred", tmp_path / "msd" / "labelsTr", tmp_path / "e1")
    full = evaluate(tmp_path / "pred", tmp_path / "msd", tmp_path / "e2")
    assert not alone.failures and len(alone.rows) == 3 and alone.rows == full.rows


def test_men_rt_is_refused_by_the_region_model_with_a_reason(checkpoint: Path, tmp_path: Path) -> None:
    rt = "BraTS-MEN-RT-0001-1"
    case = write_case(tmp_path / "in", "brats2023", rt, with_label=False)
    label = (np.asarray(case["tissue"]) > 0).astype(np.uint8)  # 1 = GTV
    from brats_psp.io import save_nifti

    save_nifti(tmp_path / "in" / rt / f"{rt}-seg.nii.gz", label, np.asarray(nib.load(str(case["paths"]["t1"])).affine), dtype=np.uint8)
    assert RELEASES["brats2023-men-rt"].has_regions is False
    cfg = load_config(REPO / "configs" / "smoke.yaml", ["data.spacing=[2.0,2.0,2.0]"]).data
    pre = preprocess_dataset(tmp_path / "in", tmp_path / "cache", cfg, progress=False)
    (failure,) = pre.failures
    assert failure.case_id == rt and "MEN-RT" in str(failure) and "no WT/TC/ET regions" in str(failure)
    inferred = segment_cases(str(checkpoint), tmp_path / "in", tmp_path / "pred", progress=False)
    assert not inferred.written and "no WT/TC/ET regions" in str(inferred.failures[0])
    scored = evaluate(tmp_path / "pred", tmp_path / "in", tmp_path / "e")
    assert not scored.rows and "no WT/TC/ET regions" in str(scored.failures[0])
