"""Writing files so that a crash never leaves a half-written one behind.

Every output of brats_psp is written to a temporary name in the destination
folder and renamed into place (``os.replace`` is atomic on POSIX file systems).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` if the block succeeds.

    The temporary name keeps ``path``'s suffixes (``.nii.gz``, ``.npy``) so that writers
    that pick a format from the extension still do the right thing. On error the
    temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries of :func:`atomic_path` that a killed writer left in ``folder``.

    Call it only where no other process is writing (a run's checkpoint folder when the run
    starts or resumes). Returns what was removed.
    """
    folder = Path(folder)
    stale = [p for p in folder.glob(".*.tmp*") if p.is_file()] if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


class OutputFolderError(PermissionError):
    """An output folder cannot be created or written to (the message names the folder)."""


def ensure_writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``path`` if needed and prove it is writable by creating (and removing) a file in it.

    A real write, not ``os.access``: it also catches read-only mounts, and it is right for root,
    whom permission bits do not stop.

    Raises:
        OutputFolderError: naming the folder and the reason, before any work is done.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(prefix=".write-check.", dir=path):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        raise OutputFolderError(f"{what} {path} cannot be written ({reason}); nothing was written") from None
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write ``text`` to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Atomically save ``array`` in NumPy's ``.npy`` format."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)


def save_nifti(
    path: str | os.PathLike,
    array: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None = None,
    dtype: np.dtype | type | None = None,
) -> None:
    """Atomically save ``array`` as NIfTI-1 with ``affine`` (and ``header`` when given).

    ``dtype`` sets the on-disk data type (default: the array's). The scaling slope
    is reset so that integer labels and images are stored exactly.
    """
    dtype = np.dtype(dtype or array.dtype)
    hdr = header.copy() if header is not None else nib.Nifti1Header()
    img = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine, header=hdr)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def voxel_size(img: nib.spatialimages.SpatialImage) -> tuple[float, float, float]:
    """The voxel size in mm along the image's first three array axes (its header's zooms)."""
    return tuple(float(z) for z in img.header.get_zooms()[:3])
