"""Reading a case's four NIfTI contrasts: nibabel (what brats_psp uses) against SimpleITK.

    python benchmarks/readers.py [--case ../shared/data/real/BraTS-GLI-00001-000] [--rounds 5]

:func:`brats_psp.data.transforms.load_case_arrays` (the four files read in parallel threads into
one float32 array, with its checks) as shipped, where nibabel decompresses the voxels, against
the same function with SimpleITK decompressing them (``sitk.ReadImage(path, sitkFloat32)``,
then the same copy into the array), and SimpleITK alone (four threads, no checks, no copy).
Both are timed in alternating rounds in one process and the median ratio is printed (the
machines are shared: ratios, not absolute times). The arrays are checked to be equal first.
Without ``--case``, a built-in synthetic case is written to a temporary folder.
Writes ``benchmarks/results/readers.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from brats_psp.data.discovery import discover_cases  # noqa: E402
from brats_psp.data.transforms import load_case_arrays  # noqa: E402


def _sitk_voxels(case_id: str, path: Path, img, out: np.ndarray | None = None) -> np.ndarray:  # noqa: ANN001
    import SimpleITK as sitk

    data = sitk.GetArrayFromImage(sitk.ReadImage(str(path), sitk.sitkFloat32)).transpose(2, 1, 0)
    if out is None:
        return data
    np.copyto(out, data)
    return out


def read_shipped(case) -> np.ndarray:  # noqa: ANN001
    return load_case_arrays(case, with_label=False)[0]


def read_sitk_in_pipeline(case) -> np.ndarray:  # noqa: ANN001
    from unittest import mock

    from brats_psp.data import transforms

    with mock.patch.object(transforms, "_voxels", _sitk_voxels):
        return load_case_arrays(case, with_label=False)[0]


def read_sitk_alone(case) -> np.ndarray:  # noqa: ANN001
    import SimpleITK as sitk

    def one(path: Path) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path), sitk.sitkFloat32)).transpose(2, 1, 0)

    with ThreadPoolExecutor(len(case.images)) as pool:
        return np.stack(list(pool.map(one, case.images)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", type=Path, help="a case folder (default: a built-in synthetic case)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "readers.json")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.case
        if folder is None:
            from brats_psp.data.synthetic import write_dataset

            write_dataset(tmp, 1, seed=0)
            folder = Path(tmp)
        (case,) = discover_cases(folder).cases[:1]
        readers = {"nibabel (shipped)": read_shipped, "SimpleITK in the pipeline": read_sitk_in_pipeline, "SimpleITK alone": read_sitk_alone}
        first = read_shipped(case)
        assert all(np.array_equal(first, read(case)) for read in readers.values()), "the readers disagree"
        times: dict[str, list[float]] = {name: [] for name in readers}
        for _ in range(args.rounds):
            for name, read in readers.items():
                start = time.perf_counter()
                read(case)
                times[name].append(time.perf_counter() - start)
    base = times["nibabel (shipped)"]
    ratios = {name: statistics.median(t / b for t, b in zip(ts, base)) for name, ts in times.items()}
    result = {"case": case.case_id, "shape": list(first.shape), "seconds": times, "median_ratio_over_shipped": ratios}
    print(f"{case.case_id} {first.shape}, median of {args.rounds} alternating rounds:")
    for name, ts in times.items():
        print(f"  {name:<28} {statistics.median(ts):.3f} s   x{ratios[name]:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
