"""Start-up: ``infer`` on one scan as a whole process, against the floor of what it must do.

    python benchmarks/startup.py --model outputs/<run id>/checkpoints/best.pt --case ../shared/data/real/BraTS-GLI-00001-000
    python benchmarks/startup.py --model M --case C --against HEAD~1     # the same commands at another commit, alternating

Fresh processes, in alternating rounds (``--rounds``), each timed from outside:

* **floor**: a process that imports torch and nibabel, reads the case's four contrasts and
  writes one uint8 label volume of their shape (what any segmentation command must do,
  without the network);
* ``python pipelines/run.py --help``;
* ``python pipelines/run.py infer --model M --input CASE --output TMP`` (the default settings,
  or the ``infer.*`` overrides given as arguments);
* with ``--against REV``: that revision's ``infer`` on the same case (a git worktree), for a
  before/after ratio measured in the same rounds.

Prints the median seconds and the ratios (``infer`` over the floor: the issue's goal is at most
1.6; ``--help`` at most 0.5 s) and writes ``benchmarks/results/startup.json``. The case is
segmented every round; its own time (``seconds_per_case`` of ``inference.json``) is recorded
too, so start-up = process time - case time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, median, table, write_result

_FLOOR = """\
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch  # noqa: F401  (any segmentation command loads its framework)

paths = sorted(p for p in Path(sys.argv[1]).iterdir() if ".nii" in p.name)[:4]
images = [np.asanyarray(nib.load(str(p)).dataobj, dtype=np.float32) for p in paths]
ref = nib.load(str(paths[0]))
nib.save(nib.Nifti1Image(np.zeros(images[0].shape, np.uint8), ref.affine), sys.argv[2])
"""


def _timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])}...: {proc.stderr[-2000:]}")
    return elapsed


def _infer(tree: Path, model: str, case: Path, out: Path, overrides: list[str]) -> tuple[list[str], Path]:
    shutil.rmtree(out, ignore_errors=True)
    return [sys.executable, str(tree / "pipelines" / "run.py"), "infer", "--model", model, "--input", str(case), "--output", str(out), *overrides], out


def run(model: str, case: Path, rounds: int, against: str | None, overrides: list[str] | None = None) -> dict[str, Any]:
    times: dict[str, list[float]] = {"floor": [], "help": [], "infer": []}
    case_seconds: dict[str, list[float]] = {"infer": []}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        floor = tmp / "floor.py"
        floor.write_text(_FLOOR)
        trees = {"infer": ROOT}
        if against:
            tree = tmp / "against"
            subprocess.run(["git", "worktree", "add", "--detach", str(tree), against], cwd=ROOT, check=True, capture_output=True)
            trees[f"infer@{against}"] = tree
            times[f"infer@{against}"], case_seconds[f"infer@{against}"] = [], []
        try:
            for r in range(rounds):
                times["floor"].append(_timed([sys.executable, str(floor), str(case), str(tmp / "floor.nii.gz")], tmp))
                times["help"].append(_timed([sys.executable, str(ROOT / "pipelines" / "run.py"), "--help"], tmp))
                for name, tree in trees.items():
                    cmd, out = _infer(tree, model, case, tmp / name, overrides or [])
                    times[name].append(_timed(cmd, tmp))
                    info = json.loads((out / "inference.json").read_text())
                    case_seconds[name].append(sum(info["seconds_per_case"].values()))
                print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
        finally:
            if against:
                subprocess.run(["git", "worktree", "remove", "--force", str(trees[f"infer@{against}"])], cwd=ROOT, capture_output=True)
    med = {k: median(v) for k, v in times.items()}
    ratios = {"infer_over_floor": med["infer"] / med["floor"]}
    if against:
        ratios[f"infer_over_infer@{against}"] = median([a / b for a, b in zip(times["infer"], times[f"infer@{against}"])])
    return {"model": model, "case": str(case), "rounds": rounds, "against": against, "overrides": overrides or [], "seconds": times,
            "case_seconds": case_seconds, "median_seconds": med, "ratios": ratios}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint, run id or model URI")
    ap.add_argument("--case", type=Path, required=True, help="one case folder (four NIfTI contrasts)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--against", help="a git revision whose infer runs in the same rounds")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/startup.json)")
    ap.add_argument("overrides", nargs="*", help="infer overrides key=value, for both revisions' infer")
    args = ap.parse_args()
    result = run(args.model, args.case.resolve(), args.rounds, args.against, args.overrides)
    rows = [[k, v, median(result["case_seconds"][k]) if k in result["case_seconds"] else ""] for k, v in result["median_seconds"].items()]
    print(table(rows, ["command", "median s", "case s (inference.json)"]))
    print(", ".join(f"{k} {v:.2f}" for k, v in result["ratios"].items()))
    write_result("startup", result, args.out)


if __name__ == "__main__":
    main()
