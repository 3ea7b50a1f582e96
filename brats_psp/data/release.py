"""Writing cases in a BraTS release layout (the counterpart of :mod:`brats_psp.data.layouts`).

:func:`write_case` writes one case's four contrasts and label in the files and label values
of a *format*: a release (``brats2021``, ``brats2023`` = the 2023+ GLI task, ``msd``) or
``brats2023-ped`` (the 2023+ files of the paediatric task: ``BraTS-PED-*`` ids, labels 1 ET,
2 NETC, 3 CC, 4 ED); :func:`write_dataset` writes the built-in synthetic set
(:mod:`brats_psp.data.synthetic`), in worker processes when asked.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from brats_psp.data.layouts import MODALITIES, Layout, get_layout
from brats_psp.io import save_nifti, write_json
from brats_psp.labels import tissue_to_release

if TYPE_CHECKING:
    from brats_psp.data.synthetic import SyntheticCase

__all__ = ["FORMATS", "case_paths", "classes_path", "write_case", "write_dataset"]

logger = logging.getLogger(__name__)

#: Formats that can be written: name -> file layout (the name is also the label convention).
FORMATS: dict[str, str] = {"brats2021": "brats2021", "brats2023": "brats2023", "brats2023-ped": "brats2023", "msd": "msd"}


def _layout(fmt: str) -> Layout:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {list(FORMATS)}")
    return get_layout(FORMATS[fmt])


def case_paths(case_id: str, out_dir: str | Path, fmt: str = "brats2021", with_label: bool = True) -> list[Path]:
    """Files that :func:`write_case` writes for ``case_id`` (images first, label last)."""
    out_dir = Path(out_dir)
    layout = _layout(fmt)
    if layout.is_4d:
        paths = [out_dir / "imagesTr" / f"{case_id}.nii.gz"]
        if with_label:
            paths.append(out_dir / "labelsTr" / f"{case_id}.nii.gz")
        return paths
    names = list(MODALITIES) + (["seg"] if with_label else [])
    return [out_dir / case_id / layout.filename(case_id, m) for m in names]


def classes_path(case_id: str, classes_dir: str | Path) -> Path:
    """Where :func:`write_dataset` writes ``case_id``'s appearance-class map (uint8 NIfTI of
    :data:`~brats_psp.data.synthetic.appearance.CLASS_NAMES` codes): outside the release
    layout, so that discovery never sees it."""
    return Path(classes_dir) / f"{case_id}.nii.gz"


def write_case(case: SyntheticCase, out_dir: Path, fmt: str = "brats2021", with_label: bool = True) -> list[Path]:
    """Write ``case`` in release layout ``fmt`` under ``out_dir``; return the paths written.

    ``brats2021``/``brats2023``: ``out_dir/<case_id>/<Layout.filename(case_id, m)>`` for
    the four contrasts (int16) and ``seg`` (uint8). ``msd``: ``out_dir/imagesTr/<case_id>.nii.gz``,
    one 4D int16 image (240, 240, 155, 4) in ``LAYOUTS["msd"].channel_order``
    (FLAIR, T1, T1ce, T2), and ``out_dir/labelsTr/<case_id>.nii.gz`` (uint8). Labels are
    in the release's values (:func:`brats_psp.labels.tissue_to_release`). Every file
    is written atomically.
    """
    layout = _layout(fmt)
    paths = case_paths(case.case_id, out_dir, fmt, with_label)
    label = tissue_to_release(case.tissue, fmt) if with_label else None
    if layout.is_4d:
        stack = np.stack([case.images[m] for m in layout.channel_order], axis=-1).astype(np.int16)
        save_nifti(paths[0], stack, case.affine, dtype=np.int16)
        if label is not None:
            save_nifti(paths[1], label, case.affine, dtype=np.uint8)
    else:
        for path, modality in zip(paths, MODALITIES):
            save_nifti(path, case.images[modality], case.affine, dtype=np.int16)
        if label is not None:
            save_nifti(paths[-1], label, case.affine, dtype=np.uint8)
    return paths


def _msd_dataset_json(case_ids: list[str]) -> dict[str, Any]:
    """``dataset.json`` in the style of the Decathlon's Task01_BrainTumour."""
    return {
        "name": "BRATS",
        "description": "Synthetic BraTS-like gliomas on the MNI ICBM152 brain (brats_psp.data.synthetic)",
        "reference": "brats_psp",
        "licence": "CC-BY-SA 4.0",
        "release": "synthetic",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": len(case_ids),
        "numTest": 0,
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in case_ids],
        "test": [],
    }


def _write_one(index: int, seed: int, fmt: str, out_dir: Path, classes_dir: Path | None = None) -> str:
    """Generate and write case ``index`` (the job of one worker process)."""
    from brats_psp.data import synthetic

    case = synthetic.generate_case(index, seed=seed, fmt=fmt)
    write_case(case, out_dir, fmt)
    if classes_dir is not None and case.classes is not None:
        save_nifti(classes_path(case.case_id, classes_dir), case.classes, case.affine, dtype=np.uint8)
    return case.case_id


#: Environment of the worker processes: one BLAS/OpenMP thread each (the workers fill the cores).
_ONE_THREAD = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


@contextlib.contextmanager
def _one_thread_env() -> Iterator[None]:
    """Set ``_ONE_THREAD`` in this process's environment (inherited by processes spawned inside), then restore it."""
    saved = {k: os.environ.get(k) for k in _ONE_THREAD}
    os.environ.update(_ONE_THREAD)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def write_dataset(
    out_dir: str | Path,
    n_cases: int,
    seed: int = 0,
    fmt: str = "brats2021",
    progress: bool = False,
    workers: int = 1,
    classes_dir: str | Path | None = None,
) -> list[str]:
    """Write cases ``0 .. n_cases - 1`` of the synthetic dataset ``seed`` in layout ``fmt``.

    Cases whose files all exist already are skipped, so a re-run does no work (the
    existing files are not checked against ``seed``: use one folder per seed). For
    ``msd`` also writes ``out_dir/dataset.json`` (only when its content changes).
    Shows a tqdm progress bar when ``progress`` is true. ``workers`` > 1 generates cases
    in that many processes (spawned, one BLAS thread each; about 0.9 GB of memory each);
    every case is the same as with one worker, since each has its own random generator.
    With ``classes_dir`` each case's appearance-class map is written there too
    (:func:`classes_path`), for drawing new contrasts per training batch.

    Returns:
        the case ids, in index order.
    """
    from brats_psp.data import synthetic

    if n_cases < 0:
        raise ValueError(f"n_cases must be >= 0, got {n_cases}")
    _layout(fmt)
    out_dir = Path(out_dir)
    case_ids = [synthetic.case_id_for(i, fmt) for i in range(n_cases)]
    classes_dir = Path(classes_dir) if classes_dir is not None else None

    def written(cid: str) -> bool:
        extra = [classes_path(cid, classes_dir)] if classes_dir is not None else []
        return all(p.is_file() for p in case_paths(cid, out_dir, fmt) + extra)

    todo = [i for i, cid in enumerate(case_ids) if not written(cid)]
    if len(todo) < n_cases:
        logger.info("%d of %d synthetic cases already in %s", n_cases - len(todo), n_cases, out_dir)
    t0 = time.perf_counter()
    job = functools.partial(_write_one, seed=seed, fmt=fmt, out_dir=out_dir, classes_dir=classes_dir)
    workers = max(1, min(workers, len(todo)))
    with contextlib.ExitStack() as stack:
        if workers == 1:
            done: Iterator[str] = map(job, todo)
        else:
            stack.enter_context(_one_thread_env())  # read by the spawned workers when they start
            ctx = multiprocessing.get_context("spawn")
            done = stack.enter_context(ProcessPoolExecutor(workers, mp_context=ctx)).map(job, todo)
        for _ in tqdm(done, total=len(todo), desc="synthetic cases", unit="case", disable=not (progress and todo)):
            pass
    if todo:
        elapsed = time.perf_counter() - t0
        logger.info(
            "wrote %d synthetic %s cases to %s in %.1f s (%.2f s/case, %d worker(s))",
            len(todo), fmt, out_dir, elapsed, elapsed / len(todo), workers,
        )
    if _layout(fmt).is_4d:
        meta = _msd_dataset_json(case_ids)
        path = out_dir / "dataset.json"
        current = None
        if path.is_file():
            try:
                current = json.loads(path.read_text())
            except ValueError:
                current = None
        if current != meta:
            write_json(path, meta)
    return case_ids
