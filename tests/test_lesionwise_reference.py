"""``evaluate --lesionwise`` against the two reference implementations, each run in its own
environment (they pin packages this project does not):

* the official package ``brats-evaluation`` (panoptica): ``BRATS_EVAL_PYTHON`` = a Python that
  has it (``tests/official_brats_eval.py --lesionwise`` runs there);
* the BraTS 2023 challenge script: ``BRATS2023_PYTHON`` = a Python with its pins and
  ``BRATS2023_METRICS`` = the folder of its ``metrics.py`` (``tests/brats2023_metrics.py``);
* the package's sample cases (``example/sample_data`` of BraTS/BraTS_evaluation, four
  metastasis cases): ``BRATS_EVAL_SAMPLES`` = a folder with their ``pred/`` and ``ref/``.

Each test skips when what it needs is absent. Counts must agree exactly and Dice to 1e-6; the
panoptica HD95 and NSD too where the voxels are isotropic (the package applies anisotropic
spacing to swapped axes). The 2023 script's HD95 is DeepMind's surface-element HD95, not
compared (see :mod:`brats_psp.lesionwise`).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brats_psp.evaluation import evaluate
from brats_psp.io import save_nifti, voxel_size
from brats_psp.labels import Tissue, tissue_to_release
from tests.conftest import BRATS_AFFINE

HERE = Path(__file__).parent
SHAPE = (64, 64, 48)
PANOPTICA_CONFIG = {"GLI": "gli", "SSA": "gli", "MET": "mets", "PED": "ped", "MEN": "MenPre", "GoAT": "GoAT"}


def _python(variable: str, probe: str) -> str | None:
    python = os.environ.get(variable)
    if python and subprocess.run([python, "-c", probe], capture_output=True, env={**os.environ}).returncode == 0:
        return python
    return None


def _panoptica_python() -> str | None:
    return _python("BRATS_EVAL_PYTHON", "import brats_evaluation, panoptica") or (
        sys.executable if subprocess.run([sys.executable, "-c", "import brats_evaluation, panoptica"], capture_output=True).returncode == 0 else None
    )


def _brats2023_python() -> str | None:
    folder = os.environ.get("BRATS2023_METRICS")
    if not folder or not (Path(folder) / "metrics.py").is_file():
        return None
    return _python("BRATS2023_PYTHON", f"import sys; sys.path.insert(0, {folder!r}); import metrics")


def _run(cmd: list[str]) -> list[dict]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _hand_made(root: Path) -> list[tuple[str, Path, Path]]:
    """(case id, prediction, reference) of hand-made GLI cases: a missed lesion and a false-positive
    speck, two lesions merged by one prediction, a lesion predicted as nothing, and a shifted one."""
    cases = []

    def lesion(t: np.ndarray, corner: tuple[int, int, int], size: int) -> None:
        x, y, z = corner
        t[x : x + size + 4, y : y + size + 4, z : z + size + 4] = np.maximum(t[x : x + size + 4, y : y + size + 4, z : z + size + 4], Tissue.ED)
        t[x + 2 : x + size + 2, y + 2 : y + size + 2, z + 2 : z + size + 2] = Tissue.ET
        t[x + 3 : x + size + 1, y + 3 : y + size + 1, z + 3 : z + size + 1] = Tissue.NCR

    def add(name: str, ref: np.ndarray, pred: np.ndarray) -> None:
        cid = f"BraTS-GLI-{len(cases):05d}-000"
        paths = root / f"{cid}-pred.nii.gz", root / f"{cid}-seg.nii.gz"
        for path, tissue in zip(paths, (pred, ref)):
            save_nifti(path, tissue_to_release(tissue, "brats2023"), BRATS_AFFINE, dtype=np.uint8)
        cases.append((cid, *paths))

    ref, pred = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    lesion(ref, (5, 5, 5), 8)
    lesion(ref, (40, 40, 28), 6)  # missed
    lesion(pred, (5, 5, 5), 8)
    pred[50:52, 8:10, 40:42] = Tissue.ET  # a false-positive speck
    add("missed and speck", ref, pred)
    ref, pred = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    lesion(ref, (10, 10, 10), 8)
    lesion(ref, (26, 10, 10), 6)  # 4 voxels of edema apart
    pred[12:34, 12:22, 12:22] = Tissue.ET
    add("merged", ref, pred)
    ref = np.zeros(SHAPE, np.uint8)
    lesion(ref, (20, 20, 20), 10)
    add("nothing predicted", ref, np.zeros(SHAPE, np.uint8))
    ref, pred = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    lesion(ref, (20, 20, 20), 10)
    lesion(pred, (22, 21, 19), 10)
    add("shifted", ref, pred)
    return cases


def _ours(cases: list[tuple[str, Path, Path]], tmp_path: Path, task: str) -> dict[str, dict[str, dict]]:
    """Our lesion-wise rows by case and region, through ``evaluate``."""
    pred_dir, ref_dir = tmp_path / "ours_pred", tmp_path / "ours_ref"
    for cid, pred, ref in cases:
        for folder, src, name in ((pred_dir, pred, f"{cid}.nii.gz"), (ref_dir, ref, f"{cid}-seg.nii.gz")):
            folder.mkdir(exist_ok=True)
            (folder / name).symlink_to(src.resolve())
    result = evaluate(pred_dir, ref_dir, tmp_path / "ours", lesionwise=True, task=task)
    assert not result.failures
    out: dict[str, dict[str, dict]] = {}
    for row in result.lesion_rows:
        out.setdefault(row["case"], {})[row["region"]] = row
    return out


def _isotropic(path: Path) -> bool:
    zooms = voxel_size(nib.load(str(path)))
    return max(zooms) - min(zooms) < 1e-6


def _ours_and_theirs(
    python: str | None, missing: str, cases: list[tuple[str, Path, Path]], tmp_path: Path, task: str, command: list[str]
) -> tuple[dict[str, dict[str, dict]], list[dict]]:
    """Our rows by case and region, and the reference's JSON for the same pairs (``command`` + the
    pairs, run with ``python``); skips with ``missing`` when the reference is not set up."""
    if python is None:
        pytest.skip(missing)
    pairs = [str(p) for _, pred, ref in cases for p in (pred, ref)]
    return _ours(cases, tmp_path, task), _run([python, *command, *pairs])


def _check_panoptica(cases: list[tuple[str, Path, Path]], tmp_path: Path, task: str) -> None:
    ours, official = _ours_and_theirs(
        _panoptica_python(), "brats-evaluation is not installed (set BRATS_EVAL_PYTHON to a Python that has it)",
        cases, tmp_path, task, [str(HERE / "official_brats_eval.py"), "--lesionwise", PANOPTICA_CONFIG[task]],
    )
    for (cid, _, ref), theirs in zip(cases, official):
        for region in ("WT", "TC", "ET"):
            row, ref_row = ours[cid][region], theirs[region.lower()]
            assert (row["tp"], row["fp"], row["fn"]) == (ref_row["tp"], ref_row["fp"], ref_row["fn"]), (cid, region)
            keys = ("rq", "sq_dsc", "sq_hd95", "sq_nsd") if _isotropic(ref) else ("rq", "sq_dsc")
            for ours_key, key in zip(("f1", "dice", "hd95", "nsd"), keys):
                expected = ref_row[key]
                if expected is None:
                    assert math.isnan(row[ours_key]), (cid, region, key)
                elif expected == "inf":
                    assert row[ours_key] == math.inf, (cid, region, key)
                else:
                    assert row[ours_key] == pytest.approx(expected, abs=1e-6), (cid, region, key)


def _check_2023(cases: list[tuple[str, Path, Path]], tmp_path: Path, task: str) -> None:
    ours, script = _ours_and_theirs(
        _brats2023_python(), "the BraTS 2023 metrics script is not set up (BRATS2023_PYTHON and BRATS2023_METRICS)",
        cases, tmp_path, task, [str(HERE / "brats2023_metrics.py"), f"BraTS-{task}"],
    )
    for (cid, _, _), theirs in zip(cases, script):
        for region in ("WT", "TC", "ET"):
            row, ref_row = ours[cid][region], theirs[region]
            assert (row["tp_2023"], row["fp_2023"], row["fn_2023"]) == (ref_row["Num_TP"], ref_row["Num_FP"], ref_row["Num_FN"]), (cid, region)
            assert row["dice_2023"] == pytest.approx(ref_row["LesionWise_Score_Dice"], abs=1e-6), (cid, region)
            if ref_row["LesionWise_Score_Dice"] in (0.0, 1.0):  # nothing found or nothing to find: only penalties
                assert row["hd95_2023"] == pytest.approx(ref_row["LesionWise_Score_HD95"], abs=1e-6), (cid, region)


def _samples() -> list[tuple[str, Path, Path]]:
    folder = os.environ.get("BRATS_EVAL_SAMPLES")
    if not folder or not (Path(folder) / "ref").is_dir():
        pytest.skip("the package's sample cases are not available (BRATS_EVAL_SAMPLES = a folder with pred/ and ref/)")
    cases = []
    for ref in sorted((Path(folder) / "ref").glob("*-seg.nii.gz")):
        key = re.search(r"(\d{5}-\d{3})-seg", ref.name).group(1)  # type: ignore[union-attr]
        (pred,) = [p for p in (Path(folder) / "pred").glob("*.nii.gz") if p.name.endswith(f"{key}.nii.gz")]
        cases.append((ref.name.removesuffix("-seg.nii.gz"), pred, ref))
    return cases


def test_hand_made_cases_agree_with_the_official_package(tmp_path: Path) -> None:
    _check_panoptica(_hand_made(tmp_path), tmp_path, "GLI")


def test_hand_made_cases_agree_with_the_2023_challenge_script(tmp_path: Path) -> None:
    _check_2023(_hand_made(tmp_path), tmp_path, "GLI")


def test_the_package_sample_cases_agree_with_the_official_package(tmp_path: Path) -> None:
    _check_panoptica(_samples(), tmp_path, "MET")


def test_the_package_sample_cases_agree_with_the_2023_challenge_script(tmp_path: Path) -> None:
    _check_2023(_samples(), tmp_path, "MET")


def test_label_conventions_match_the_official_package_configs() -> None:
    """The regions of every task convention (``brats_psp.labels``) are the label groups of the
    package's per-task config files."""
    import yaml

    from brats_psp.labels import RELEASES, TASKS

    python = _panoptica_python()
    if python is None:
        pytest.skip("brats-evaluation is not installed (set BRATS_EVAL_PYTHON to a Python that has it)")
    probe = "from importlib.resources import files; print(files('brats_evaluation').joinpath('configs'))"
    configs = Path(subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout.strip())

    class AnyTag(yaml.SafeLoader):
        pass

    def untagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> object:
        if isinstance(node, yaml.MappingNode):
            return loader.construct_mapping(node, deep=True)
        if isinstance(node, yaml.SequenceNode):
            return loader.construct_sequence(node, deep=True)
        return loader.construct_scalar(node)  # type: ignore[arg-type]

    AnyTag.add_multi_constructor("!", untagged)
    checked = 0
    for task, config in PANOPTICA_CONFIG.items():
        path = configs / f"config_{config}.yaml"
        groups = yaml.load(path.read_text(), Loader=AnyTag)["segmentation_class_groups"]["groups"]  # noqa: S506 (tags only)
        release = RELEASES[TASKS[task]]
        for region in ("WT", "TC", "ET"):
            assert tuple(sorted(groups[region.lower()]["value_labels"])) == release.region_values(region), (task, region, path.name)
        checked += 1
    rt = yaml.load((configs / "config_MenRT.yaml").read_text(), Loader=AnyTag)["segmentation_class_groups"]["groups"]  # noqa: S506
    assert list(rt) == ["gtv"] and rt["gtv"]["value_labels"] == [1] and not RELEASES[TASKS["MEN-RT"]].has_regions
    assert checked == len(PANOPTICA_CONFIG)
