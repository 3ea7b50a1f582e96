"""The built-in dataset: generated on first use into the cache folder and reused after.

``train`` without ``--data`` calls :func:`ensure_training_cache`, which writes
``data.demo_cases`` synthetic cases (seed ``data.demo_seed``, BraTS 2021 layout) and
preprocesses them; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from brats_psp.config import DataConfig
from brats_psp.cpus import default_workers
from brats_psp.data.transforms import preprocessing_params

__all__ = ["ensure_demo_dataset", "ensure_training_cache", "cache_folder_for", "classes_folder_for", "resolve_data_source", "write_with_class_maps"]

log = logging.getLogger(__name__)

_DONE = ".complete"


def ensure_demo_dataset(cfg: DataConfig) -> Path:
    """Folder of the built-in synthetic set for ``cfg`` (generated if missing or incomplete).

    Its cases' appearance-class maps go beside it (:func:`classes_folder_for`).
    """
    from brats_psp.data.synthetic import GENERATOR_VERSION

    raw = Path(cfg.cache_dir) / f"demo-v{GENERATOR_VERSION}-seed{cfg.demo_seed}-n{cfg.demo_cases}" / "raw"
    if not ((raw / _DONE).is_file() and (classes_folder_for(raw) / _DONE).is_file()):
        log.info("generating the built-in synthetic set (%d cases, seed %d) in %s", cfg.demo_cases, cfg.demo_seed, raw)
        write_with_class_maps(raw, cfg.demo_cases, seed=cfg.demo_seed, workers=default_workers())
        (raw / _DONE).write_text(json.dumps({"cases": cfg.demo_cases, "seed": cfg.demo_seed}))
    return raw


def write_with_class_maps(raw: Path, n_cases: int, seed: int = 0, fmt: str = "brats2021", workers: int = 1) -> list[str]:
    """:func:`~brats_psp.data.release.write_dataset` into ``raw``, with each case's
    appearance-class map in :func:`classes_folder_for` ``(raw)``, marked complete there so that
    :func:`ensure_training_cache` stores the maps (``data.rerender``). Returns the case ids."""
    from brats_psp.data.synthetic import write_dataset

    classes = classes_folder_for(raw)
    ids = write_dataset(raw, n_cases, seed=seed, fmt=fmt, progress=True, workers=workers, classes_dir=classes)
    classes.mkdir(parents=True, exist_ok=True)
    (classes / _DONE).write_text(json.dumps({"cases": n_cases, "seed": seed}))
    log.info("appearance-class maps of %d case(s) in %s", len(ids), classes)
    return ids


def classes_folder_for(raw: Path) -> Path:
    """Where the appearance-class maps of the built-in set in ``raw`` are (beside it, outside
    the release layout)."""
    return Path(raw).parent / "classes"


def cache_folder_for(data: Path, cfg: DataConfig) -> Path:
    """Where the preprocessed cache of ``data`` lives: one folder per (dataset, preprocessing)."""
    params = json.dumps(preprocessing_params(cfg.spacing, cfg.intensity_percentiles), sort_keys=True)
    key = hashlib.sha1(f"{Path(data).resolve()}|{params}|{cfg.layout}".encode()).hexdigest()[:10]
    return Path(cfg.cache_dir) / "preprocessed" / f"{Path(data).name}-{key}"


def resolve_data_source(cfg: DataConfig, data: str | Path | None = None) -> Path:
    """The dataset to train on: ``data``, else ``cfg.root``, else the built-in set (generated if needed)."""
    if data is not None:
        return Path(data).resolve()
    if cfg.root:
        return Path(cfg.root).resolve()
    return ensure_demo_dataset(cfg).resolve()


def ensure_training_cache(cfg: DataConfig, data: str | Path | None = None, progress: bool = True) -> Path:
    """Preprocessed cache for ``data`` (default: ``cfg.root``, else the built-in set)."""
    from brats_psp.data.preprocess import preprocess_dataset

    source = resolve_data_source(cfg, data)
    out = cache_folder_for(source, cfg)
    classes = classes_folder_for(source)
    classes_dir = classes if (classes / _DONE).is_file() else None
    result = preprocess_dataset(source, out, cfg, progress=progress, workers=0, classes_dir=classes_dir)
    if result.failures:
        log.warning("%d case(s) could not be preprocessed and are left out:", len(result.failures))
        for err in result.failures:
            log.warning("  %s", err)
    return out
