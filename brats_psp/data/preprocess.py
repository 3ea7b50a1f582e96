"""The preprocess stage: run the volume transforms once per case and cache slices for training.

Cache layout (``OUT``)::

    OUT/cases/<case_id>/image.npy   float16 (Z, 4, X, Y): axial slices first, so one slice is one contiguous read
    OUT/cases/<case_id>/label.npy   uint8 (Z, X, Y) tissue codes (absent for unlabelled cases)
    OUT/cases/<case_id>/meta.json   sources, fingerprint, shapes, per-slice region presence, checksums
    OUT/datalist.json               MONAI-style datalist with a k-fold split ("fold" on every entry)
    OUT/summary.json                cases, shapes, spacings, voxels per region

Each case entry is written to a temporary folder and renamed into place. An entry is
reused only when its fingerprint (source files' sizes and times, preprocessing parameters,
cache version) matches and its files pass their size and checksum checks, so a second run
on unchanged inputs does no work and a corrupted entry is rebuilt, never used.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from brats_psp.config import DataConfig
from brats_psp.data.discovery import Case, discover_cases
from brats_psp.data.transforms import apply_transforms, preprocessing_params, volume_transforms
from brats_psp.errors import CaseError, check_case_id
from brats_psp.io import ensure_writable_dir, save_npy, write_json
from brats_psp.labels import REGION_NAMES, region_presence, tissue_to_regions

__all__ = ["CACHE_VERSION", "PreprocessResult", "preprocess_dataset", "preprocess_case", "load_cache_meta", "safe_case_dir", "kfold_assignment"]

log = logging.getLogger(__name__)

#: Bumped whenever the cache format or the transforms change meaning.
CACHE_VERSION = 1


@dataclass
class PreprocessResult:
    """What the preprocess stage did."""

    out_dir: Path
    datalist: Path
    summary: Path
    processed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failures: list[CaseError] = field(default_factory=list)


def safe_case_dir(root: Path, case_id: str) -> Path:
    """``root/cases/<case_id>``, refusing ids that would leave ``root/cases``."""
    return root / "cases" / check_case_id(case_id)


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fingerprint(case: Case, params: dict[str, Any]) -> str:
    sources = [*case.images, *([case.label] if case.label else [])]
    parts = [f"v{CACHE_VERSION}", json.dumps(params, sort_keys=True), case.layout]
    for path in sources:
        st = Path(path).stat()
        parts.append(f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()


def load_cache_meta(case_dir: Path, verify: bool = True) -> dict[str, Any] | None:
    """The entry's metadata if it is complete and intact, else ``None``.

    With ``verify`` the files' sizes and SHA-1 checksums are compared with the ones
    recorded when the entry was written.
    """
    meta_path = case_dir / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        for name, record in meta["files"].items():
            path = case_dir / name
            if path.stat().st_size != record["size"] or (verify and _sha1(path) != record["sha1"]):
                log.warning("cache entry %s: %s does not match its checksum; rebuilding", case_dir.name, name)
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta


def preprocess_case(case: Case, out_dir: Path, data_cfg: DataConfig, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the volume transforms on ``case`` and write its cache entry; return its metadata.

    Raises:
        CaseError: anything wrong with the case's files (named in the message).
    """
    params = params or preprocessing_params(data_cfg.spacing)
    final = safe_case_dir(out_dir, case.case_id)
    with_label = case.label is not None
    data = apply_transforms(volume_transforms(data_cfg.spacing, with_label=with_label), {"case": case})
    image = data["image"].numpy()  # (4, X, Y, Z)
    if not np.all(np.isfinite(image)):
        raise CaseError(case.case_id, case.images[0], "normalisation produced non-finite values (constant contrast?)")
    crop_op = next(op for op in data["image"].applied_operations if op["class"] == "CropForeground")
    tissue = data["label"].numpy()[0].astype(np.uint8) if with_label else None

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{case.case_id}.", dir=final.parent))
    try:
        save_npy(tmp / "image.npy", np.ascontiguousarray(image.transpose(3, 0, 1, 2), dtype=np.float16))
        meta: dict[str, Any] = {
            "cache_version": CACHE_VERSION,
            "case_id": case.case_id,
            "layout": case.layout,
            "source": case.to_json(),
            "fingerprint": _fingerprint(case, params),
            "params": params,
            "input_shape": [int(s) for s in data["image"].meta["spatial_shape"]],
            "input_spacing": [float(s) for s in np.linalg.norm(np.asarray(data["image"].meta["original_affine"])[:3, :3], axis=0)],
            "shape": list(image.shape[1:]),
            "crop_padding": [int(v) for v in np.asarray(crop_op["extra_info"]["cropped"]).ravel()],
            "affine": np.asarray(data["image"].affine).tolist(),
            "has_label": with_label,
        }
        if tissue is not None:
            save_npy(tmp / "label.npy", np.ascontiguousarray(tissue.transpose(2, 0, 1)))
            regions = tissue_to_regions(tissue)
            meta["presence"] = region_presence(regions).tolist()  # (Z, 3)
            meta["region_voxels"] = {r: int(regions[i].sum()) for i, r in enumerate(REGION_NAMES)}
        meta["files"] = {
            p.name: {"size": p.stat().st_size, "sha1": _sha1(p)} for p in sorted(tmp.glob("*.npy"))
        }
        write_json(tmp / "meta.json", meta)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def kfold_assignment(case_ids: list[str], folds: int, seed: int) -> dict[str, int]:
    """Deterministic fold of each case: shuffle the sorted ids with ``seed``, deal them round robin."""
    ids = sorted(case_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    return {ids[j]: int(i % folds) for i, j in enumerate(order)}


def _summary(metas: list[dict[str, Any]], failures: list[CaseError]) -> dict[str, Any]:
    def stats(values: list[float]) -> dict[str, float]:
        arr = np.asarray(values, dtype=float)
        return {"min": float(arr.min()), "median": float(np.median(arr)), "max": float(arr.max())} if arr.size else {}

    labelled = [m for m in metas if m.get("has_label")]
    return {
        "cases": len(metas),
        "labelled": len(labelled),
        "layouts": sorted({m["layout"] for m in metas}),
        "input_shapes": sorted({"x".join(map(str, m["input_shape"])) for m in metas}),
        "input_spacings": sorted({"x".join(f"{s:g}" for s in m["input_spacing"]) for m in metas}),
        "cropped_shape": {axis: stats([m["shape"][i] for m in metas]) for i, axis in enumerate("xyz")},
        "region_voxels": {r: stats([m["region_voxels"][r] for m in labelled]) for r in REGION_NAMES},
        "cases_without": {r: sum(1 for m in labelled if m["region_voxels"][r] == 0) for r in REGION_NAMES},
        "failed": [str(f) for f in failures],
    }


def _cache_entry(
    case: Case, out_dir: Path, data_cfg: DataConfig, params: dict[str, Any]
) -> tuple[bool, dict[str, Any]] | CaseError:
    """``(reused, meta)`` of ``case``'s cache entry, written when missing or stale, or the
    CaseError that stopped it (one worker's job: the error comes back as a value, by name)."""
    try:
        meta = load_cache_meta(safe_case_dir(out_dir, case.case_id))
        if meta is not None and meta.get("fingerprint") == _fingerprint(case, params):
            return True, meta
        return False, preprocess_case(case, out_dir, data_cfg, params)
    except CaseError as err:
        return err


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
) -> PreprocessResult:
    """Preprocess every case under ``data`` into the cache ``out``.

    Cases that fail are reported (:attr:`PreprocessResult.failures`) and the others go on.
    Running it again on unchanged inputs reuses every entry. ``workers`` > 1 preprocesses
    that many cases at a time in worker processes (spawned, one torch thread each, about
    1 GB of memory each for a BraTS case); the cache is the same as with one worker.
    """
    data_cfg = data_cfg or DataConfig()
    out_dir = ensure_writable_dir(out)  # before any case is read: an unwritable cache fails at once, by name
    found = discover_cases(data, data_cfg.layout)
    params = preprocessing_params(data_cfg.spacing)
    result = PreprocessResult(out_dir, out_dir / "datalist.json", out_dir / "summary.json", failures=list(found.failures))
    metas: list[dict[str, Any]] = []

    job = functools.partial(_cache_entry, out_dir=out_dir, data_cfg=data_cfg, params=params)
    workers = max(1, min(workers, len(found.cases)))
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

    folds = kfold_assignment([m["case_id"] for m in metas], data_cfg.folds, data_cfg.split_seed) if metas else {}
    entries = []
    for meta in sorted(metas, key=lambda m: m["case_id"]):
        entry = {**meta["source"], "cache": f"cases/{meta['case_id']}", "fold": folds[meta["case_id"]]}
        entries.append(entry)
    write_json(
        result.datalist,
        {
            "folds": data_cfg.folds,
            "fold": data_cfg.fold,
            "split_seed": data_cfg.split_seed,
            "training": [e for e in entries if e["fold"] != data_cfg.fold],
            "validation": [e for e in entries if e["fold"] == data_cfg.fold],
        },
    )
    write_json(result.summary, _summary(metas, result.failures))
    log.info(
        "preprocessed %d case(s), reused %d, failed %d -> %s",
        len(result.processed), len(result.reused), len(result.failures), out_dir,
    )
    return result
