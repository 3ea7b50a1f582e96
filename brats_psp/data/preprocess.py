"""The preprocess stage: run the volume transforms once per case and cache it for training.

Every case of a dataset goes through :func:`~brats_psp.data.transforms.volume_transforms`
(RAS, crop to the brain, resampling, z-score) once; the result is a cache entry
(:mod:`brats_psp.data.cache` owns the format: arrays, metadata, datalist, summary). A second
run on unchanged inputs reuses every entry, and a corrupted entry is rebuilt, never used.
Cases that fail are reported by name and the others go on; ``workers`` > 1 preprocesses
cases in parallel processes (``workers=0``: as many as pay for their start-up).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from brats_psp.config import DataConfig
from brats_psp.cpus import default_workers
from brats_psp.data.cache import (
    DATALIST_FILE,
    SUMMARY_FILE,
    entry_dir,
    fingerprint,
    load_entry_meta,
    summarise,
    write_datalist,
    write_entry,
)
from brats_psp.data.discovery import Case, discover_cases
from brats_psp.data.release import classes_path
from brats_psp.data.transforms import apply_transforms, preprocessing_params, volume_transforms
from brats_psp.errors import CaseError
from brats_psp.io import ensure_writable_dir, write_json

__all__ = ["PreprocessResult", "preprocess_dataset", "preprocess_case"]

log = logging.getLogger(__name__)


@dataclass
class PreprocessResult:
    """What the preprocess stage did."""

    out_dir: Path
    datalist: Path
    summary: Path
    processed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failures: list[CaseError] = field(default_factory=list)


def preprocess_case(
    case: Case, out_dir: Path, data_cfg: DataConfig, params: dict[str, Any] | None = None, classes: Path | None = None
) -> dict[str, Any]:
    """Run the volume transforms on ``case`` and write its cache entry; return its metadata.

    ``classes``: a synthetic case's appearance-class map (NIfTI), cropped and resampled with
    the label and stored in the entry (for :mod:`brats_psp.data.rerender`).

    Raises:
        CaseError: anything wrong with the case's files (named in the message).
    """
    params = params or preprocessing_params(data_cfg.spacing, data_cfg.intensity_percentiles)
    with_label = case.label is not None
    chain = volume_transforms(data_cfg.spacing, with_label=with_label, percentiles=data_cfg.intensity_percentiles, with_classes=classes is not None)
    data = apply_transforms(chain, {"case": case, **({"class_map_file": classes} if classes is not None else {})})
    image = data["image"].numpy()  # (4, X, Y, Z)
    if not np.all(np.isfinite(image)):
        raise CaseError(case.case_id, case.images[0], "normalisation produced non-finite values (constant contrast?)")
    crop_op = next(op for op in data["image"].applied_operations if op["class"] == "CropForeground")
    tissue = data["label"].numpy()[0].astype(np.uint8) if with_label else None
    meta = {
        "params": params,
        "input_shape": [int(s) for s in data["image"].meta["spatial_shape"]],
        "input_spacing": [float(s) for s in np.linalg.norm(np.asarray(data["image"].meta["original_affine"])[:3, :3], axis=0)],
        "shape": list(image.shape[1:]),
        "crop_padding": [int(v) for v in np.asarray(crop_op["extra_info"]["cropped"]).ravel()],
        "affine": np.asarray(data["image"].affine).tolist(),
    }
    class_map = data["classes"].numpy()[0].astype(np.uint8) if classes is not None else None
    return write_entry(out_dir, case, image, tissue, meta, class_map, classes)


def _cache_entry(
    case: Case, out_dir: Path, data_cfg: DataConfig, params: dict[str, Any], classes_dir: Path | None = None
) -> tuple[bool, dict[str, Any]] | CaseError:
    """``(reused, meta)`` of ``case``'s cache entry, written when missing or stale, or the
    CaseError that stopped it (one worker's job: the error comes back as a value, by name)."""
    try:
        classes = classes_path(case.case_id, classes_dir) if classes_dir is not None else None
        classes = classes if classes is not None and classes.is_file() else None
        meta = load_entry_meta(entry_dir(out_dir, case.case_id))
        if meta is not None and meta.get("fingerprint") == fingerprint(case, params, classes):
            return True, meta
        return False, preprocess_case(case, out_dir, data_cfg, params, classes)
    except CaseError as err:
        return err


#: Cases per worker process below which another process does not pay for itself: a spawned
#: worker takes about 4 s to start (it imports torch and MONAI; 4 tiny cases took 4.4 s with two
#: workers against 0.1-0.3 s with one), a BraTS case about 1.5 s to preprocess at 1.5 mm.
MIN_CASES_PER_WORKER = 4


def auto_workers(n_cases: int) -> int:
    """Worker processes for ``n_cases``: one per available core (at most 8), but no more than
    one per :data:`MIN_CASES_PER_WORKER` cases."""
    return max(1, min(default_workers(), n_cases // MIN_CASES_PER_WORKER))


def _one_thread_worker() -> None:
    """Worker processes share the cores: one torch thread each."""
    torch.set_num_threads(1)


def preprocess_dataset(
    data: str | os.PathLike,
    out: str | os.PathLike,
    data_cfg: DataConfig | None = None,
    progress: bool = True,
    on_case: Callable[[str], None] | None = None,
    workers: int = 1,
    classes_dir: str | os.PathLike | None = None,
) -> PreprocessResult:
    """Preprocess every case under ``data`` into the cache ``out``.

    Cases that fail are reported (:attr:`PreprocessResult.failures`) and the others go on.
    Running it again on unchanged inputs reuses every entry. ``workers`` > 1 preprocesses
    that many cases at a time in worker processes (spawned, one torch thread each, about
    1 GB of memory each for a BraTS case); the cache is the same as with one worker.
    ``workers=0`` picks the number (:func:`auto_workers`). ``classes_dir``: where the built-in
    set's appearance-class maps are (:func:`~brats_psp.data.release.classes_path`); each
    case's is stored in its entry when it is there.
    """
    data_cfg = data_cfg or DataConfig()
    out_dir = ensure_writable_dir(out)  # before any case is read: an unwritable cache fails at once, by name
    found = discover_cases(data, data_cfg.layout, task=data_cfg.task)
    params = preprocessing_params(data_cfg.spacing, data_cfg.intensity_percentiles)
    result = PreprocessResult(out_dir, out_dir / DATALIST_FILE, out_dir / SUMMARY_FILE, failures=list(found.failures))
    metas: list[dict[str, Any]] = []

    job = functools.partial(
        _cache_entry, out_dir=out_dir, data_cfg=data_cfg, params=params, classes_dir=Path(classes_dir) if classes_dir is not None else None
    )
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0: automatic), got {workers}")
    workers = auto_workers(len(found.cases)) if workers == 0 else max(1, min(workers, len(found.cases)))
    with contextlib.ExitStack() as stack:
        if workers == 1:
            outcomes: Iterator[tuple[bool, dict[str, Any]] | CaseError] = map(job, found.cases)
        else:
            ctx = multiprocessing.get_context("spawn")
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=ctx, initializer=_one_thread_worker))
            outcomes = pool.map(job, found.cases)  # results in discovery order, as with one worker
        for case, outcome in tqdm(zip(found.cases, outcomes), total=len(found.cases), desc="preprocess", unit="case", disable=not progress):
            if isinstance(outcome, CaseError):
                log.error("%s", outcome)
                result.failures.append(outcome)
            else:
                reused, meta = outcome
                (result.reused if reused else result.processed).append(case.case_id)
                metas.append(meta)
            if on_case is not None:
                on_case(case.case_id)

    write_datalist(out_dir, metas, data_cfg)
    write_json(result.summary, summarise(metas, result.failures))
    log.info(
        "preprocessed %d case(s), reused %d, failed %d -> %s",
        len(result.processed), len(result.reused), len(result.failures), out_dir,
    )
    return result
