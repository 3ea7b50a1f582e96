"""MONAI transforms that turn a :class:`~brats_psp.data.discovery.Case` into a network-ready volume.

The chain (:func:`volume_transforms`)::

    LoadBratsCased        four contrasts -> image (4, X, Y, Z) in MODALITIES order, label -> tissue codes (1, X, Y, Z)
    LoadClassesd          optional: a synthetic case's appearance-class map -> classes (1, X, Y, Z)
    Orientationd          one canonical orientation (RAS)
    CropForegroundd       crop to the bounding box of the brain (voxels non-zero in any contrast)
    RequireBraind         refuse a case with fewer than MIN_BRAIN_VOXELS brain voxels (a CaseError)
    Spacingd              resample the brain's box to ``data.spacing`` mm (float32; a no-op at 1 mm)
    RequireBraind         refuse a case whose resampled volume has no brain voxel left
    ClipPercentilesd      optional (``data.intensity_percentiles``): each contrast's brain voxels
                          clipped to two percentiles of their own (bright vessels, sinuses)
    NormalizeIntensityd   per-channel z-score inside the non-zero mask

The project's own transforms follow MONAI's convention: the logic in an array transform
(:class:`LoadBratsCase`, :class:`RequireBrain`, :class:`ClipPercentiles`), a thin dictionary twin over keys.
Orientation, spacing and crop are MONAI invertible transforms: their inverse, applied to a
prediction in the preprocessed space, maps it back to the input's grid (used by inference).
Every problem with a file is a :class:`~brats_psp.errors.CaseError` naming case and file.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from brats_psp import _monai  # noqa: F401, I001  (MONAI without the optional packages it probes: see there)
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    Spacingd,
    Transform,
)

from brats_psp.data.discovery import Case
from brats_psp.data.layouts import ITK_EXTENSIONS, MODALITIES, get_layout
from brats_psp.errors import CaseError
from brats_psp.labels import LabelValueError, release_to_tissue

__all__ = [
    "AXCODES",
    "LoadBratsCase",
    "LoadBratsCased",
    "LoadClassesd",
    "RequireBrain",
    "RequireBraind",
    "ClipPercentiles",
    "ClipPercentilesd",
    "load_case_arrays",
    "read_nifti",
    "volume_transforms",
    "apply_transforms",
    "preprocessing_params",
    "nonzero_any",
]

log = logging.getLogger(__name__)

#: The canonical orientation every volume is brought to.
AXCODES = "RAS"
#: Axis names for the orientation codes (RAS+ world, as NIfTI).
_AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
#: Tolerance (mm) when comparing the affines of one case's contrasts.
AFFINE_ATOL = 1e-3


def open_nifti(case_id: str, path: Path) -> nib.Nifti1Image:
    """Open an image file, or raise a CaseError naming it.

    NIfTI is opened lazily (its header; the voxels are read later). NRRD and MetaImage files
    (:data:`~brats_psp.data.layouts.ITK_EXTENSIONS`) are read with SimpleITK into an in-memory
    NIfTI image with the same voxels and the equivalent RAS affine, so every later step is the
    same whatever the format.
    """
    if not path.is_file():
        raise CaseError(case_id, path, "file not found")
    itk = path.name.lower().endswith(ITK_EXTENSIONS)
    try:
        return _itk_as_nifti(path) if itk else nib.load(str(path))
    except Exception as err:  # nibabel, SimpleITK, gzip and OS errors all mean "unreadable"
        kind = "NRRD/MetaImage" if itk else "NIfTI"
        raise CaseError(case_id, path, f"not a readable {kind} file ({type(err).__name__}: {err})") from None


#: LPS (ITK's world) <-> RAS (NIfTI's world).
_LPS = np.diag([-1.0, -1.0, 1.0])


def _itk_as_nifti(path: Path) -> nib.Nifti1Image:
    """A NRRD / MetaImage file as a NIfTI image: voxels in (x, y, z[, t]) order, affine in RAS."""
    import SimpleITK as sitk  # only for these formats: NIfTI never pays its import

    img = sitk.ReadImage(str(path))
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{img.GetNumberOfComponentsPerPixel()} components per voxel; expected a scalar image")
    dim = img.GetDimension()
    if dim not in (3, 4):
        raise ValueError(f"{dim}D image; expected 3D (or 4D)")
    data = sitk.GetArrayFromImage(img).transpose(tuple(range(dim))[::-1])  # (z, y, x) -> (x, y, z)
    direction = np.array(img.GetDirection(), float).reshape(dim, dim)[:3, :3]
    affine = np.eye(4)
    affine[:3, :3] = _LPS @ direction @ np.diag(img.GetSpacing()[:3])
    affine[:3, 3] = _LPS @ np.array(img.GetOrigin()[:3], float)
    nii = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    nii.set_qform(affine, code=1)
    nii.set_sform(affine, code=1)
    return nii


def _spatial_shape(img: nib.Nifti1Image) -> tuple[int, ...]:
    shape = tuple(img.shape)
    return shape[:3] if len(shape) == 4 and shape[3] == 1 else shape  # a 4D file holding one volume is 3D


def _voxels(case_id: str, path: Path, img: nib.Nifti1Image, out: np.ndarray | None = None) -> np.ndarray:
    """The voxels of an opened file, scaling applied, as float32 (into ``out`` when given)."""
    try:
        raw = np.asanyarray(img.dataobj)  # on-disk type, or float where scl_slope/scl_inter apply
    except Exception as err:  # a truncated or corrupt gzip stream shows up here
        raise CaseError(case_id, path, f"not a readable NIfTI file ({type(err).__name__}: {err})") from None
    raw = raw.reshape(_spatial_shape(img))
    if out is None:
        return raw.astype(np.float32, copy=False)
    np.copyto(out, raw, casting="unsafe")
    return out


def read_nifti(case_id: str, path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Read one NIfTI file as float32 (scaling applied), or raise a CaseError naming it."""
    img = open_nifti(case_id, path)
    return img, _voxels(case_id, path, img)


def _finite_range(case_id: str, path: Path, data: np.ndarray) -> tuple[float, float]:
    """(min, max) of ``data``, or a CaseError when a voxel is NaN or infinite (refused, never repaired)."""
    low, high = float(data.min()), float(data.max())
    if not (np.isfinite(low) and np.isfinite(high)):  # NaN propagates through min, inf shows in min or max
        raise CaseError(case_id, path, f"{int(np.count_nonzero(~np.isfinite(data)))} voxel(s) are NaN or infinite")
    return low, high


def _read_contrast(case_id: str, path: Path, img: nib.Nifti1Image, out: np.ndarray) -> tuple[float, float]:
    """Read one contrast into ``out`` and check it; runs in a reader thread; returns (min, max)."""
    return _finite_range(case_id, path, _voxels(case_id, path, img, out))


def _check_not_empty(case_id: str, path: Path, modality: str, low: float, high: float) -> None:
    if low == high == 0:
        raise CaseError(case_id, path, f"the {modality} contrast is all zero (no brain)")
    if low == high:
        raise CaseError(case_id, path, f"the {modality} contrast is constant (every voxel is {low:g}): no brain to find")


def load_case_arrays(case: Case, with_label: bool = True) -> tuple[np.ndarray, np.ndarray | None, nib.Nifti1Image]:
    """Read and check a case.

    Returns:
        image: float32 (4, X, Y, Z) in ``MODALITIES`` order, in the file's voxel grid.
        tissue: uint8 (X, Y, Z) tissue codes (see :mod:`brats_psp.labels`), or ``None``.
        reference: the first contrast's NIfTI image (its affine and header describe the grid).

    Raises:
        CaseError: naming the case and the file: unreadable, wrong dimensionality, contrasts
            that disagree in shape or affine, NaN/inf voxels (refused, never repaired), an all-zero
            or constant contrast (no brain to find), label values outside the release's set or a
            label whose shape differs from the images.
    """
    layout = get_layout(case.layout)
    if layout.is_4d:
        (path,) = case.images
        ref, data = read_nifti(case.case_id, path)
        if data.ndim != 4 or data.shape[3] != len(layout.channel_order):
            raise CaseError(case.case_id, path, f"expected a 4D image with {len(layout.channel_order)} channels, got shape {data.shape}")
        _finite_range(case.case_id, path, data)
        order = [layout.channel_order.index(m) for m in MODALITIES]
        image = np.ascontiguousarray(np.moveaxis(data, 3, 0)[order])
        for modality, channel in zip(MODALITIES, image):
            _check_not_empty(case.case_id, path, modality, float(channel.min()), float(channel.max()))
        label = read_nifti(case.case_id, case.label)[1] if with_label and case.label is not None else None
    else:
        paths = list(case.images)
        imgs = [open_nifti(case.case_id, path) for path in paths]  # headers only
        ref, shape = imgs[0], _spatial_shape(imgs[0])
        for path, img in zip(paths, imgs):
            if len(_spatial_shape(img)) != 3:
                raise CaseError(case.case_id, path, f"expected a 3D image, got shape {img.shape}")
            if _spatial_shape(img) != shape:
                raise CaseError(case.case_id, path, f"shape {_spatial_shape(img)} differs from {paths[0].name} {shape}")
            if not np.allclose(img.affine, ref.affine, atol=AFFINE_ATOL):
                raise CaseError(
                    case.case_id, path,
                    f"affine differs from {paths[0].name} (contrasts are not co-registered):\n{img.affine}\nvs\n{ref.affine}",
                )
        # the contrasts are decompressed and converted in parallel, straight into one array
        # (gzip and numpy release the GIL); errors are raised in the order of the files
        image = np.empty((len(paths), *shape), np.float32)
        label_img = open_nifti(case.case_id, case.label) if with_label and case.label is not None else None
        with ThreadPoolExecutor(max_workers=len(paths) + 1, thread_name_prefix="nifti") as pool:
            reads = [pool.submit(_read_contrast, case.case_id, path, img, image[c]) for c, (path, img) in enumerate(zip(paths, imgs))]
            label_read = pool.submit(_voxels, case.case_id, case.label, label_img) if label_img is not None else None
            ranges = [r.result() for r in reads]
            label = label_read.result() if label_read is not None else None
        for modality, path, (low, high) in zip(MODALITIES, paths, ranges):
            _check_not_empty(case.case_id, path, modality, low, high)
    tissue = None
    if label is not None:
        assert case.label is not None
        if label.shape != image.shape[1:]:
            raise CaseError(case.case_id, case.label, f"label shape {label.shape} differs from image shape {image.shape[1:]}")
        try:
            tissue = release_to_tissue(label, case.labels)
        except LabelValueError as err:
            raise CaseError(case.case_id, case.label, str(err)) from None
    assert ref is not None
    return image, tissue, ref


class LoadBratsCase(Transform):
    """Load a :class:`~brats_psp.data.discovery.Case` into MONAI ``MetaTensor``s.

    Returns ``(image, label)``: image float32 (4, X, Y, Z), channels T1, T1ce, T2, FLAIR; label
    uint8 (1, X, Y, Z) tissue codes 0 background, 1 NCR, 2 ED, 3 ET, 4 RC (converted from the
    release's convention), or ``None`` when the case has none or ``with_label`` is false. Both
    carry the NIfTI affine and the case id.
    """

    def __init__(self, with_label: bool = True) -> None:
        self.with_label = with_label

    def __call__(self, case: Case) -> tuple[MetaTensor, MetaTensor | None]:
        image, tissue, ref = load_case_arrays(case, self.with_label)
        meta = {
            "affine": torch.as_tensor(ref.affine, dtype=torch.float64),
            "original_affine": ref.affine.copy(),
            "spatial_shape": np.asarray(image.shape[1:]),
            "filename_or_obj": str(case.images[0]),
            "case_id": case.case_id,
        }
        label = None if tissue is None else MetaTensor(torch.from_numpy(tissue[None]), meta=dict(meta))
        return MetaTensor(torch.from_numpy(image), meta=dict(meta)), label


class LoadBratsCased(MapTransform):
    """Dictionary twin of :class:`LoadBratsCase`: ``{"case": Case}`` -> adds ``"image"`` and,
    when there is one, ``"label"``."""

    def __init__(self, case_key: str = "case", with_label: bool = True) -> None:
        super().__init__(keys=[case_key])
        self.case_key = case_key
        self.loader = LoadBratsCase(with_label)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        d["image"], label = self.loader(d[self.case_key])
        if label is not None:
            d["label"] = label
        return d


def nonzero_any(image: torch.Tensor) -> torch.Tensor:
    """Brain mask for cropping: voxels non-zero in any channel (1 × spatial)."""
    return (image != 0).any(dim=0, keepdim=True)


class RequireBrain(Transform):
    """Return the (C, spatial) image as it is, or raise a :class:`CaseError` when fewer than
    ``min_voxels`` voxels are non-zero in any contrast (:func:`nonzero_any`).

    Runs after the foreground crop and after resampling: without it a "brain" of a few
    voxels, or one that resampling wipes out at a coarse ``data.spacing``, fails deep inside
    MONAI with a message that names neither the case nor the file (both come from the
    image's metadata).
    """

    def __init__(self, spacing: Sequence[float] | None = None, min_voxels: int = 1) -> None:
        self.spacing = None if spacing is None else [float(s) for s in spacing]
        self.min_voxels = min_voxels

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        n = int(nonzero_any(image).sum()) if image.numel() else 0
        if n < self.min_voxels:
            meta = getattr(image, "meta", {})
            where = f" after resampling to {self.spacing} mm" if self.spacing else ""
            what = "every contrast is zero, so the foreground crop is empty" if n == 0 else (
                f"only {n} voxel(s) are non-zero in any contrast, fewer than the {self.min_voxels} of even a tiny skull-stripped brain"
            )
            raise CaseError(str(meta.get("case_id", "?")), meta.get("filename_or_obj"), f"no brain voxel left{where}: {what}")
        return image


class RequireBraind(MapTransform):
    """Dictionary twin of :class:`RequireBrain` on ``key``."""

    def __init__(self, key: str = "image", spacing: Sequence[float] | None = None, min_voxels: int = 1) -> None:
        super().__init__(keys=[key])
        self.check = RequireBrain(spacing, min_voxels)

    def __call__(self, data: Mapping[Hashable, Any]) -> Mapping[Hashable, Any]:
        for key in self.key_iterator(dict(data)):
            self.check(data[key])
        return data


class ClipPercentiles(Transform):
    """Clip each channel's non-zero voxels to their own ``(low, high)`` percentiles (0-100).

    Zeros (outside the brain) stay zero, so the z-score that follows sees the same mask. The
    tails it cuts are what a z-score is most sensitive to on real MRI: vessels, sinuses and
    fat on T1ce, a few bright or dark artefact voxels.
    """

    def __init__(self, percentiles: Sequence[float]) -> None:
        low, high = (float(p) for p in percentiles)
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {list(percentiles)}")
        self.percentiles = (low, high)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        for channel in image:  # views: clipped in place
            inside = channel != 0
            values = channel[inside]
            if values.numel() == 0:
                continue
            low, high = np.percentile(values.cpu().numpy(), self.percentiles)
            channel[inside] = values.clamp(float(low), float(high))
        return image


class ClipPercentilesd(MapTransform):
    """Dictionary twin of :class:`ClipPercentiles` on ``key``."""

    def __init__(self, key: str = "image", percentiles: Sequence[float] = (0.5, 99.5)) -> None:
        super().__init__(keys=[key])
        self.clip = ClipPercentiles(percentiles)

    def __call__(self, data: Mapping[Hashable, Any]) -> Mapping[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.clip(d[key])
        return d


#: Fewer non-zero voxels than this (1 mL at 1 mm) is not a brain: the case is refused by name.
MIN_BRAIN_VOXELS = 1000


class LoadClassesd(MapTransform):
    """``{"case": Case, "class_map_file": Path}`` -> adds ``"classes"``: the uint8 (1, X, Y, Z)
    appearance-class map of a synthetic case (:func:`brats_psp.data.release.classes_path`),
    with the image's metadata, so that the spatial transforms after it move it as the label."""

    def __init__(self, path_key: str = "class_map_file", case_key: str = "case") -> None:
        super().__init__(keys=[path_key])
        self.path_key, self.case_key = path_key, case_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        case, path, image = d[self.case_key], Path(d.pop(self.path_key)), d["image"]
        img, values = read_nifti(case.case_id, path)
        if values.shape != tuple(image.shape[1:]):
            raise CaseError(case.case_id, path, f"class map shape {values.shape} differs from image shape {tuple(image.shape[1:])}")
        if values.min() < 0 or values.max() > 255:
            raise CaseError(case.case_id, path, f"class map values {values.min():g}..{values.max():g} are not uint8 codes")
        d["classes"] = MetaTensor(torch.from_numpy(values.astype(np.uint8)[None]), meta=dict(image.meta))
        return d


def volume_transforms(
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    with_label: bool = True,
    margin: int = 0,
    percentiles: Sequence[float] | None = None,
    with_classes: bool = False,
) -> Compose:
    """The volume chain from a ``{"case": Case}`` dict to a cropped, normalised image (and label);
    with ``percentiles`` (``data.intensity_percentiles``), each contrast clipped to them first;
    ``with_classes``: ``{"case", "class_map_file"}`` in, the class map moved with the label."""
    keys = ["image", "label"] if with_label else ["image"]
    modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
    if with_classes:
        keys, modes = [*keys, "classes"], [*modes, "nearest"]
    return Compose(
        [
            LoadBratsCased(with_label=with_label),
            *([LoadClassesd()] if with_classes else []),
            Orientationd(keys=keys, axcodes=AXCODES, labels=_AXIS_LABELS, allow_missing_keys=True),
            # crop before resampling: both directions of the resampling (here and its inverse
            # at inference) then touch the brain's box only, about 40 % of a BraTS volume. The
            # crop is never empty (an all-zero contrast is refused on loading) and keeps every
            # brain voxel, so the brain is counted in the box, not in the whole volume.
            CropForegroundd(
                keys=keys, source_key="image", select_fn=nonzero_any, margin=margin,
                allow_smaller=True, allow_missing_keys=True,
            ),
            RequireBraind("image", min_voxels=MIN_BRAIN_VOXELS),
            Spacingd(keys=keys, pixdim=tuple(float(s) for s in spacing), mode=modes, dtype=np.float32, allow_missing_keys=True),
            RequireBraind("image", spacing),
            *([ClipPercentilesd("image", percentiles)] if percentiles else []),
            NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
        ]
    )


def apply_transforms(transform: Compose, data: dict[str, Any]) -> dict[str, Any]:
    """Run a MONAI chain, re-raising a :class:`CaseError` that MONAI wrapped in a RuntimeError."""
    try:
        return transform(data)
    except RuntimeError as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, CaseError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def preprocessing_params(spacing: Sequence[float], percentiles: Sequence[float] | None = None) -> dict[str, Any]:
    """What inference must repeat to see data the way training saw it (stored in checkpoints)."""
    normalize = "z-score per channel inside the non-zero mask"
    if percentiles:
        normalize += f", after clipping each channel to its {float(percentiles[0])}-{float(percentiles[1])} percentiles there"
    return {
        "modalities": list(MODALITIES),
        "orientation": AXCODES,
        "crop": "nonzero bounding box, before resampling",
        "spacing": [float(s) for s in spacing],
        "normalize": normalize,
        "slice_axis": "axial (last spatial axis after orientation)",
    }
