"""More real scans with references, arranged from clones of BrainLesion/tutorials (and BrainLesion/BraTS).

    git clone https://github.com/BrainLesion/tutorials /tmp/tutorials      # by hand: nothing here downloads
    python benchmarks/brainles_cases.py --tutorials /tmp/tutorials --out /tmp/real2
    python benchmarks/real_scans.py --model M --real /tmp/real2 --out /tmp/real2_scores
    git clone https://github.com/BrainLesion/BraTS /tmp/brats                # optional: a third case
    python benchmarks/brainles_cases.py --tutorials /tmp/tutorials --brats-repo /tmp/brats --out /tmp/real2

The BraTS-Toolkit tutorial of that repository ships two TCGA gliomas already in BraTS space
(SRI-24, 240 x 240 x 155, 1 mm, skull-stripped: ``<case>_brainles/raw_bet/``), each with the
segmentations of five BraTS 2020 algorithms and their majority vote
(``<case>_brainles/fusion/mav.nii.gz``, labels 1 NCR, 2 ED, 4 ET):

===============  ==========================================  ========================================
case             what (reference volumes)                    source folder
===============  ==========================================  ========================================
``TCGA-DU-7294`` low-grade glioma: no enhancing tumour           ``BraTS-Toolkit/data/TCGA-DU-7294``
                 (WT 24.2 mL, TC 9.3 mL)
``TCGA-FG-6692`` enhancing glioma (WT 30.2, TC 9.3, ET 6.8 mL)   ``BraTS-Toolkit/data/OtherEXampleFromTCIA``
===============  ==========================================  ========================================

With ``--brats-repo`` (a clone of BrainLesion/BraTS, with its history), a third case: the test
case that commit ``528ab54`` of that repository added (``data/preprocessed_case/``, BraTS 2023
names, and ``outputs/segmentation.nii.gz``, one BraTS algorithm's output in labels 1, 2, 3),
a large enhancing glioma (WT 144.7, TC 36.2, ET 21.9 mL) whose skull strip cut away part of the
brain next to the tumour. It is written as ``BrainLesion-BraTS-528ab54`` with its reference
relabelled to the 2021 convention (3 -> 4), since the case id is not a BraTS 2023 one.

The TCGA pair are clinical acquisitions (2D, thick slices) of the TCGA collections, unlike the BraTS 2023
case in ``../shared/data/real``. The five algorithms agree with their vote to Dice 0.91-0.99
(WT, TC) and 0.93-0.99 (ET of the enhancing case), so the vote is a good reference, not an
expert's. This writes them in the BraTS 2021 layout, with the references in ``<out>/references``
as ``benchmarks/real_scans.py`` expects (copies, so the checkout may go).
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/brainles_cases.py` from anywhere
    sys.path.insert(0, str(ROOT))

from brats_psp.io import atomic_path, save_nifti  # noqa: E402

#: case id -> folder of the tutorial's BraTS-Toolkit data that holds it.
CASES: dict[str, str] = {"TCGA-DU-7294": "TCGA-DU-7294", "TCGA-FG-6692": "OtherEXampleFromTCIA"}

#: our modality name -> the tutorial's file tag (``<folder>_<tag>_bet.nii.gz``).
TAGS: dict[str, str] = {"t1": "t1", "t1ce": "t1c", "t2": "t2", "flair": "fla"}


#: The third case: a commit of BrainLesion/BraTS, its files, and our modality names.
BRATS_COMMIT, BRATS_CASE = "528ab54", "BrainLesion-BraTS-528ab54"
BRATS_FILES: dict[str, str] = {
    "t1": "data/preprocessed_case/t1n.nii.gz", "t1ce": "data/preprocessed_case/t1c.nii.gz",
    "t2": "data/preprocessed_case/t2w.nii.gz", "flair": "data/preprocessed_case/t2f.nii.gz",
    "seg": "outputs/segmentation.nii.gz",
}


def _write_atomic(dst: Path, data: bytes) -> None:
    with atomic_path(dst) as tmp:
        tmp.write_bytes(data)


def arrange_brats_case(brats_repo: Path, out: Path, commit: str = BRATS_COMMIT) -> str:
    """Write the test case of BrainLesion/BraTS at ``commit`` (read with ``git show`` from the
    clone ``brats_repo``) into ``out``, its reference relabelled 3 -> 4. Returns its id."""
    import subprocess

    import nibabel as nib
    import numpy as np

    blobs = {}
    for key, path in BRATS_FILES.items():
        proc = subprocess.run(["git", "-C", str(brats_repo), "show", f"{commit}:{path}"], capture_output=True)
        if proc.returncode != 0:
            raise FileNotFoundError(f"{brats_repo}: no {commit}:{path} (a full clone of BrainLesion/BraTS?)")
        blobs[key] = proc.stdout
    for modality in TAGS:
        _write_atomic(out / BRATS_CASE / f"{BRATS_CASE}_{modality}.nii.gz", blobs[modality])
    raw = blobs["seg"]
    seg = nib.Nifti1Image.from_bytes(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
    labels = np.asarray(seg.dataobj).astype(np.uint8)
    labels[labels == 3] = 4
    save_nifti(out / "references" / f"{BRATS_CASE}_seg.nii.gz", labels, seg.affine, seg.header, np.uint8)
    return BRATS_CASE


def arrange(tutorials: Path, out: Path) -> list[str]:
    """Copy the two cases of ``tutorials`` (a BrainLesion/tutorials checkout) into ``out``.

    Returns the case ids written. Raises ``FileNotFoundError`` naming every missing file
    before anything is written.
    """
    plan: list[tuple[Path, Path]] = []
    for case, folder in CASES.items():
        base = tutorials / "BraTS-Toolkit" / "data" / folder / f"{folder}_brainles"
        for modality, tag in TAGS.items():
            plan.append((base / "raw_bet" / f"{folder}_{tag}_bet.nii.gz", out / case / f"{case}_{modality}.nii.gz"))
        plan.append((base / "fusion" / "mav.nii.gz", out / "references" / f"{case}_seg.nii.gz"))
    missing = [str(src) for src, _ in plan if not src.is_file()]
    if missing:
        raise FileNotFoundError("not in the checkout (is it BrainLesion/tutorials?): " + ", ".join(missing))
    for src, dst in plan:
        _write_atomic(dst, src.read_bytes())
    return list(CASES)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tutorials", type=Path, required=True, help="a checkout of github.com/BrainLesion/tutorials")
    ap.add_argument("--brats-repo", type=Path, help="a clone of github.com/BrainLesion/BraTS: adds its test case")
    ap.add_argument("--out", type=Path, required=True, help="folder to write the cases and references/ into")
    args = ap.parse_args(argv)
    try:
        cases = arrange(args.tutorials, args.out)
        if args.brats_repo is not None:
            cases.append(arrange_brats_case(args.brats_repo, args.out))
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        return 1
    print(f"wrote {', '.join(cases)} and their references to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
