"""Case discovery in every layout, a single case folder, a datalist, and the real BraTS 2023 case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from brats_psp.data.discovery import detect_layout, discover_cases
from brats_psp.data.layouts import MODALITIES
from brats_psp.errors import DiscoveryError
from tests.conftest import CASE_IDS, REAL_CASE, write_case


def test_discovers_every_layout(layout_dataset: tuple[str, Path]) -> None:
    layout, root = layout_dataset
    assert detect_layout(root) == layout
    found = discover_cases(root)
    assert found.layout == layout and not found.failures
    assert [c.case_id for c in found.cases] == CASE_IDS[layout]
    for case in found.cases:
        assert case.label is not None and case.label.is_file()
        assert len(case.images) == (1 if layout == "msd" else 4)
        assert all(p.is_file() for p in case.images)


@pytest.mark.parametrize("layout", ["brats2021", "brats2023"])
def test_contrasts_come_in_the_fixed_order(tmp_path: Path, layout: str) -> None:
    write_case(tmp_path, layout, CASE_IDS[layout][0])
    (case,) = discover_cases(tmp_path).cases
    names = {"brats2021": ["t1", "t1ce", "t2", "flair"], "brats2023": ["t1n", "t1c", "t2w", "t2f"]}[layout]
    sep = "_" if layout == "brats2021" else "-"
    assert [p.name for p in case.images] == [f"{case.case_id}{sep}{n}.nii.gz" for n in names]
    assert MODALITIES == ("t1", "t1ce", "t2", "flair")


def test_single_case_folder_uncompressed_and_unlabelled(tmp_path: Path) -> None:
    write_case(tmp_path, "brats2021", "BraTS20_Training_001", ext=".nii", with_label=False)
    found = discover_cases(tmp_path / "BraTS20_Training_001")
    (case,) = found.cases
    assert case.case_id == "BraTS20_Training_001" and case.label is None
    assert all(p.suffix == ".nii" for p in case.images)


def test_nested_release_folder(tmp_path: Path) -> None:
    for cid in CASE_IDS["brats2021"][:2]:
        write_case(tmp_path / "MICCAI_BraTS2021_TrainingData", "brats2021", cid)
    assert len(discover_cases(tmp_path).cases) == 2


def test_symbolically_linked_case_folders_are_found_once(tmp_path: Path) -> None:
    # a dataset assembled from links to case folders kept elsewhere; a link back to the dataset
    # itself (a loop) is not followed twice
    store = tmp_path / "store"
    for i in range(2):
        write_case(store, "brats2021", f"BraTS2021_{i:05d}")
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        (data / f"BraTS2021_{i:05d}").symlink_to(store / f"BraTS2021_{i:05d}", target_is_directory=True)
    (data / "loop").symlink_to(data, target_is_directory=True)
    found = discover_cases(data)
    assert sorted(c.case_id for c in found.cases) == ["BraTS2021_00000", "BraTS2021_00001"] and not found.failures


def test_msd_test_images_without_labels(tmp_path: Path) -> None:
    write_case(tmp_path, "msd", "BRATS_001")
    (tmp_path / "imagesTs").mkdir()
    (tmp_path / "imagesTr" / "BRATS_001.nii.gz").rename(tmp_path / "imagesTs" / "BRATS_999.nii.gz")
    cases = {c.case_id: c for c in discover_cases(tmp_path).cases}
    assert cases["BRATS_999"].label is None


def test_layout_can_be_forced(tmp_path: Path) -> None:
    write_case(tmp_path, "brats2023", "BraTS-GLI-00000-000")
    assert discover_cases(tmp_path, layout="brats2023").cases
    with pytest.raises(DiscoveryError, match="no brats2021 case found"):
        discover_cases(tmp_path, layout="brats2021")


def test_datalist(tmp_path: Path) -> None:
    a = write_case(tmp_path, "brats2021", "BraTS2021_00000")["paths"]
    b = write_case(tmp_path, "msd", "BRATS_001")["paths"]
    rel = lambda p: str(Path(p).relative_to(tmp_path))  # noqa: E731
    # contrasts listed in a shuffled order: discovery reads the modality from the name
    datalist = {
        "training": [
            {"image": [rel(a[m]) for m in ("flair", "t1", "t2", "t1ce")], "label": rel(a["seg"])},
            {"image": rel(b["image"]), "label": rel(b["seg"])},
        ]
    }
    (tmp_path / "list.json").write_text(json.dumps(datalist))
    found = discover_cases(tmp_path / "list.json")
    assert not found.failures
    by_id = {c.case_id: c for c in found.cases}
    assert [p.name for p in by_id["BraTS2021_00000"].images] == [Path(a[m]).name for m in MODALITIES]
    assert by_id["BRATS_001"].layout == "msd"


def test_datalist_paths_must_stay_in_its_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "list.json").write_text(json.dumps({"testing": [{"image": "../../etc/x.nii.gz", "case_id": "evil"}]}))
    found = discover_cases(tmp_path / "sub" / "list.json")
    assert not found.cases
    assert "leaves the datalist's folder" in str(found.failures[0]) and "evil" in str(found.failures[0])


@pytest.mark.skipif(not REAL_CASE.is_dir(), reason="shared/data/real is not present")
def test_real_brats2023_case() -> None:
    found = discover_cases(REAL_CASE)
    (case,) = found.cases
    assert found.layout == "brats2023" and case.case_id == "BraTS-GLI-00001-000" and case.label is None
    assert [p.name.split("-")[-1] for p in case.images] == ["t1n.nii.gz", "t1c.nii.gz", "t2w.nii.gz", "t2f.nii.gz"]


def test_skipped_folders_are_reported_with_the_reason_and_linked_files_are_followed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    store = tmp_path / "store"
    write_case(store, "brats2021", "BraTS2021_00000")
    data = tmp_path / "data"
    write_case(data, "brats2021", "BraTS2021_00001")
    linked = data / "BraTS2021_00000"
    linked.mkdir()
    for f in (store / "BraTS2021_00000").iterdir():  # a case assembled from links to files
        (linked / f.name).symlink_to(f)
    (data / "loop").symlink_to(data, target_is_directory=True)
    write_case(data / ".trash", "brats2021", "BraTS2021_00002")
    odd = data / "scans"
    odd.mkdir()
    (store / "BraTS2021_00000" / "BraTS2021_00000_t1.nii.gz").rename(odd / "patient_T1w.nii.gz")
    with caplog.at_level(logging.INFO, logger="brats_psp.data.discovery"):
        found = discover_cases(data)
    assert [c.case_id for c in found.cases] == ["BraTS2021_00001"] and [f.case_id for f in found.failures] == ["BraTS2021_00000"]
    assert "missing contrast file(s): BraTS2021_00000_t1.nii.gz" in str(found.failures[0])  # its t1 link is broken now
    assert f"skipped file {linked / 'BraTS2021_00000_t1.nii.gz'}: a broken link" in caplog.text
    assert caplog.text.count("hidden") == 1  # each skip said once
    assert f"skipped folder {data / 'loop'}: a link to {data.resolve()}, already searched" in caplog.text
    assert f"skipped folder {data / '.trash'}: hidden" in caplog.text
    assert f"skipped folder {odd}: its image files (patient_T1w.nii.gz) are not named as brats2021 contrasts" in caplog.text
