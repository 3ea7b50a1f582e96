"""Two more real scans with references, arranged from a checkout of BrainLesion/tutorials.

    git clone https://github.com/BrainLesion/tutorials /tmp/tutorials      # by hand: nothing here downloads
    python benchmarks/brainles_cases.py --tutorials /tmp/tutorials --out /tmp/real2
    python benchmarks/real_scans.py --model M --real /tmp/real2 --out /tmp/real2_scores

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

Both are clinical acquisitions (2D, thick slices) of the TCGA collections, unlike the BraTS 2023
case in ``../shared/data/real``. The five algorithms agree with their vote to Dice 0.91-0.99
(WT, TC) and 0.93-0.99 (ET of the enhancing case), so the vote is a good reference, not an
expert's. This writes them in the BraTS 2021 layout, with the references in ``<out>/references``
as ``benchmarks/real_scans.py`` expects (copies, so the checkout may go).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

#: case id -> folder of the tutorial's BraTS-Toolkit data that holds it.
CASES: dict[str, str] = {"TCGA-DU-7294": "TCGA-DU-7294", "TCGA-FG-6692": "OtherEXampleFromTCIA"}

#: our modality name -> the tutorial's file tag (``<folder>_<tag>_bet.nii.gz``).
TAGS: dict[str, str] = {"t1": "t1", "t1ce": "t1c", "t2": "t2", "flair": "fla"}


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
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".part")
        shutil.copyfile(src, tmp)
        tmp.replace(dst)
    return list(CASES)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tutorials", type=Path, required=True, help="a checkout of github.com/BrainLesion/tutorials")
    ap.add_argument("--out", type=Path, required=True, help="folder to write the cases and references/ into")
    args = ap.parse_args(argv)
    try:
        cases = arrange(args.tutorials, args.out)
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        return 1
    print(f"wrote {', '.join(cases)} and their references to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
