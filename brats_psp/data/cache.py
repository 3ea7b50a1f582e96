"""The preprocessed cache: its format, written and read here alone.

Layout of a cache folder ``OUT`` (:func:`brats_psp.data.preprocess.preprocess_dataset` fills it,
the training loader and validation read it)::

    OUT/cases/<case_id>/image.npy   float16 (Z, 4, X, Y): axial slices first, so one slice is one contiguous read
    OUT/cases/<case_id>/label.npy   uint8 (Z, X, Y) tissue codes (absent for unlabelled cases)
    OUT/cases/<case_id>/meta.json   sources, fingerprint, shapes, per-slice region presence, checksums
    OUT/datalist.json               MONAI-style datalist with a k-fold split ("fold" on every entry)
    OUT/summary.json                cases, shapes, spacings, voxels per region

An entry is written to a temporary folder and renamed into place (:func:`write_entry`). It is
reused only when its :func:`fingerprint` (source files' sizes and times, preprocessing
parameters, :data:`CACHE_VERSION`) matches and its files pass their size and checksum checks
(:func:`load_entry_meta`), so a corrupted entry is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from brats_psp.config import DataConfig
from brats_psp.data.discovery import Case
from brats_psp.errors import CaseError, check_case_id
from brats_psp.io import save_npy, write_json
from brats_psp.labels import REGION_NAMES, region_presence, tissue_to_regions

__all__ = [
    "CACHE_VERSION",
    "IMAGE_FILE",
    "LABEL_FILE",
    "CLASSES_FILE",
    "META_FILE",
    "DATALIST_FILE",
    "SUMMARY_FILE",
    "CachedVolume",
    "entry_dir",
    "fingerprint",
    "load_entry_meta",
    "write_entry",
    "kfold_assignment",
    "write_datalist",
    "read_datalist",
    "split_cases",
    "summarise",
    "read_summary",
]

log = logging.getLogger(__name__)

#: Bumped whenever the cache format or the transforms change meaning.
CACHE_VERSION = 1
IMAGE_FILE, LABEL_FILE, META_FILE = "image.npy", "label.npy", "meta.json"
#: A synthetic case's appearance-class map (uint8, Z first), when the cache was built with one.
CLASSES_FILE = "classes.npy"
DATALIST_FILE, SUMMARY_FILE = "datalist.json", "summary.json"


# --------------------------------------------------------------------------- entries


def entry_dir(root: Path, case_id: str) -> Path:
    """``root/cases/<case_id>``, refusing ids that would leave ``root/cases``."""
    return root / "cases" / check_case_id(case_id)


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(case: Case, params: dict[str, Any], classes: Path | None = None) -> str:
    """What an entry of ``case`` was built from: the source files (resolved path, size,
    modification time; the appearance-class map's too when given), the preprocessing
    parameters, the layout and :data:`CACHE_VERSION`."""
    sources = [*case.images, *([case.label] if case.label else []), *([classes] if classes else [])]
    parts = [f"v{CACHE_VERSION}", json.dumps(params, sort_keys=True), case.layout]
    if case.labels != case.layout:  # a task's own convention (entries of the layout's keep their fingerprint)
        parts.append(case.labels)
    for path in sources:
        st = Path(path).stat()
        parts.append(f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()


def load_entry_meta(case_dir: Path, verify: bool = True) -> dict[str, Any] | None:
    """The entry's metadata if it is complete and intact, else ``None``.

    With ``verify`` the files' sizes and SHA-1 checksums are compared with the ones
    recorded when the entry was written.
    """
    meta_path = case_dir / META_FILE
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


def write_entry(
    out_dir: Path,
    case: Case,
    image: np.ndarray,
    tissue: np.ndarray | None,
    meta: dict[str, Any],
    classes: np.ndarray | None = None,
    classes_source: Path | None = None,
) -> dict[str, Any]:
    """Write ``case``'s entry atomically and return its full metadata.

    Args:
        image: float (4, X, Y, Z) preprocessed contrasts (stored float16, Z first).
        tissue: uint8 (X, Y, Z) tissue codes, or ``None`` for an unlabelled case.
        classes: uint8 (X, Y, Z) appearance-class codes of a synthetic case (read from
            ``classes_source``), or ``None``; stored with each code's voxel count.
        meta: what the preprocessing knows (shapes, spacing, crop, affine, params); the
            version, fingerprint, region presence and file checksums are added here.
    """
    final = entry_dir(out_dir, case.case_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{case.case_id}.", dir=final.parent))
    try:
        save_npy(tmp / IMAGE_FILE, np.ascontiguousarray(image.transpose(3, 0, 1, 2), dtype=np.float16))
        meta = {
            "cache_version": CACHE_VERSION,
            "case_id": case.case_id,
            "layout": case.layout,
            "source": case.to_json(),
            "fingerprint": fingerprint(case, meta["params"], classes_source),
            **meta,
            "has_label": tissue is not None,
        }
        if tissue is not None:
            save_npy(tmp / LABEL_FILE, np.ascontiguousarray(tissue.transpose(2, 0, 1)))
            regions = tissue_to_regions(tissue)
            meta["presence"] = region_presence(regions).tolist()  # (Z, 3)
            meta["region_voxels"] = {r: int(regions[i].sum()) for i, r in enumerate(REGION_NAMES)}
        if classes is not None:
            save_npy(tmp / CLASSES_FILE, np.ascontiguousarray(classes.transpose(2, 0, 1), dtype=np.uint8))
            meta["class_voxels"] = np.bincount(classes.ravel()).tolist()  # by code
        meta["files"] = {p.name: {"size": p.stat().st_size, "sha1": _sha1(p)} for p in sorted(tmp.glob("*.npy"))}
        write_json(tmp / META_FILE, meta)
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


class CachedVolume:
    """One preprocessed case, opened lazily as memory maps (safe to pickle into workers)."""

    def __init__(self, case_dir: str | Path) -> None:
        self.case_dir = Path(case_dir)
        self.meta: dict[str, Any] = json.loads((self.case_dir / META_FILE).read_text())
        self.case_id: str = self.meta["case_id"]
        self.num_slices: int = int(self.meta["shape"][2])
        self._image: np.ndarray | None = None
        self._label: np.ndarray | None = None
        self._classes: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_image": None, "_label": None, "_classes": None}

    @property
    def image(self) -> np.ndarray:
        """float16 (Z, 4, X, Y) memory map."""
        if self._image is None:
            self._image = np.load(self.case_dir / IMAGE_FILE, mmap_mode="r")
        return self._image

    @property
    def label(self) -> np.ndarray:
        """uint8 (Z, X, Y) tissue codes, memory map."""
        if self._label is None:
            self._label = np.load(self.case_dir / LABEL_FILE, mmap_mode="r")
        return self._label

    @property
    def has_classes(self) -> bool:
        """Whether the entry holds an appearance-class map (built-in synthetic cases)."""
        return "class_voxels" in self.meta

    @property
    def classes(self) -> np.ndarray:
        """uint8 (Z, X, Y) appearance-class codes, memory map (see :attr:`has_classes`)."""
        if self._classes is None:
            self._classes = np.load(self.case_dir / CLASSES_FILE, mmap_mode="r")
        return self._classes

    @property
    def presence(self) -> np.ndarray:
        """uint8 (Z, 3): which regions each axial slice contains."""
        return np.asarray(self.meta["presence"], dtype=np.uint8).reshape(self.num_slices, len(REGION_NAMES))

    def length(self, axis: int) -> int:
        """Number of slices along spatial ``axis`` (0 sagittal X, 1 coronal Y, 2 axial Z)."""
        x, y, z = self.meta["shape"]
        return (x, y, z)[axis]

    def slab(self, i: int, context: int, axis: int = 2, dtype: Any = np.float32) -> np.ndarray:
        """(4·(2k+1), A, B) in ``dtype``: slice ``i`` along spatial ``axis`` with ``context``
        neighbours each side (edges repeated); (A, B) are the other two axes in X, Y, Z order,
        as :class:`~monai.inferers.SliceInferer` cuts them."""
        idx = np.clip(np.arange(i - context, i + context + 1), 0, self.length(axis) - 1)
        if axis == 2:  # axial: contiguous rows of the (Z, C, X, Y) cache
            slab = np.array(self.image[idx] if context else self.image[i : i + 1], dtype=dtype)  # a copy: writable, off the memmap
        elif axis == 1:  # coronal: (Z, C, X, k) -> (k, C, X, Z)
            slab = np.asarray(self.image[:, :, :, idx], dtype=dtype).transpose(3, 1, 2, 0)
        else:  # sagittal: (Z, C, k, Y) -> (k, C, Y, Z)
            slab = np.asarray(self.image[:, :, idx, :], dtype=dtype).transpose(2, 1, 3, 0)
        return np.ascontiguousarray(slab).reshape(-1, *slab.shape[2:])

    def classes_slab(self, i: int, context: int, axis: int = 2) -> np.ndarray:
        """uint8 (2k+1, A, B): the appearance-class codes of the slices of :meth:`slab`."""
        idx = np.clip(np.arange(i - context, i + context + 1), 0, self.length(axis) - 1)
        if axis == 2:
            return np.array(self.classes[idx])
        if axis == 1:  # (Z, X, k) -> (k, X, Z)
            return np.ascontiguousarray(np.asarray(self.classes[:, :, idx]).transpose(2, 1, 0))
        return np.ascontiguousarray(np.asarray(self.classes[:, idx, :]).transpose(1, 2, 0))  # (Z, k, Y) -> (k, Y, Z)

    def label_slice(self, i: int, axis: int = 2) -> np.ndarray:
        """uint8 (A, B) tissue codes of slice ``i`` along spatial ``axis``."""
        if axis == 2:
            return np.asarray(self.label[i])
        return np.asarray(self.label[:, :, i] if axis == 1 else self.label[:, i, :]).T

    def presence_along(self, axis: int) -> np.ndarray:
        """uint8 (N, 3): which regions each slice along ``axis`` contains."""
        if axis == 2:
            return self.presence
        regions = tissue_to_regions(np.asarray(self.label).transpose(1, 2, 0))  # (3, X, Y, Z)
        return region_presence(regions, axis=axis)


# --------------------------------------------------------------------------- the datalist and summary


def kfold_assignment(case_ids: list[str], folds: int, seed: int) -> dict[str, int]:
    """Deterministic fold of each case: shuffle the sorted ids with ``seed``, deal them round robin."""
    ids = sorted(case_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    return {ids[j]: int(i % folds) for i, j in enumerate(order)}


def write_datalist(out_dir: Path, metas: list[dict[str, Any]], data_cfg: DataConfig) -> Path:
    """``OUT/datalist.json``: every entry with its fold, split into training and validation."""
    folds = kfold_assignment([m["case_id"] for m in metas], data_cfg.folds, data_cfg.split_seed) if metas else {}
    entries = [
        {**meta["source"], "cache": f"cases/{meta['case_id']}", "fold": folds[meta["case_id"]]}
        for meta in sorted(metas, key=lambda m: m["case_id"])
    ]
    path = Path(out_dir) / DATALIST_FILE
    write_json(
        path,
        {
            "folds": data_cfg.folds,
            "fold": data_cfg.fold,
            "split_seed": data_cfg.split_seed,
            "training": [e for e in entries if e["fold"] != data_cfg.fold],
            "validation": [e for e in entries if e["fold"] == data_cfg.fold],
        },
    )
    return path


def read_datalist(cache_dir: str | Path) -> list[dict[str, Any]]:
    """All entries (training and validation) of a preprocessed cache's datalist."""
    body = json.loads((Path(cache_dir) / DATALIST_FILE).read_text())
    return [*body.get("training", []), *body.get("validation", [])]


def split_cases(cache_dir: str | Path, fold: int) -> tuple[list[Path], list[Path]]:
    """Cache folders of the training and validation cases for ``fold`` (labelled cases only)."""
    cache_dir = Path(cache_dir)
    entries = sorted(read_datalist(cache_dir), key=lambda e: e["case_id"])
    labelled = [e for e in entries if e.get("label")]
    train = [cache_dir / e["cache"] for e in labelled if e["fold"] != fold]
    val = [cache_dir / e["cache"] for e in labelled if e["fold"] == fold]
    return train, val


def summarise(metas: list[dict[str, Any]], failures: list[CaseError]) -> dict[str, Any]:
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


def read_summary(cache_dir: str | Path) -> dict[str, Any]:
    """``OUT/summary.json``, or ``{}`` when it is missing or unreadable."""
    try:
        return json.loads((Path(cache_dir) / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return {}
