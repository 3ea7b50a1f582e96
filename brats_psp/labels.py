"""Label conventions of every BraTS release and the evaluation regions, as data.

This module is the only place in brats_psp that knows what a label value means.
Everything else (data loading, losses, metrics, inference) asks it.

Internally a label map uses *tissue* codes (:class:`Tissue`)::

    0 background, 1 NCR (necrotic / non-enhancing core), 2 ED (edema / SNFH),
    3 ET (enhancing tumour), 4 RC (resection cavity, BraTS 2024; in no region)

and the network predicts the three nested BraTS *regions* (channel order
``REGION_NAMES``)::

    WT (whole tumour) = NCR | ED | ET,  TC (tumour core) = NCR | ET,  ET = ET

Release label values (from ``shared/REFERENCE.md``; MSD from its ``dataset.json``):

============  =====  =====  =====  ==========
release       NCR    ED     ET     other
============  =====  =====  =====  ==========
brats2021     1      2      4      (3 unused)
brats2023     1      2      3      4 = RC
msd           2      1      3
============  =====  =====  =====  ==========

MSD label 2 is *non-enhancing tumour* (part of TC), not enhancing tumour: a widely
copied tutorial gets this wrong; ``tests/test_labels.py`` pins it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Tissue",
    "Release",
    "RELEASES",
    "REGIONS",
    "REGION_NAMES",
    "get_release",
    "release_to_tissue",
    "tissue_to_release",
    "tissue_to_regions",
    "regions_to_tissue",
    "release_to_regions",
    "region_presence",
    "LabelValueError",
]


class Tissue(enum.IntEnum):
    """Internal tissue codes, shared by every release."""

    BACKGROUND = 0
    NCR = 1
    ED = 2
    ET = 3
    RC = 4


#: Regions scored by BraTS, in the channel order of the network output.
REGIONS: dict[str, tuple[Tissue, ...]] = {
    "WT": (Tissue.NCR, Tissue.ED, Tissue.ET),
    "TC": (Tissue.NCR, Tissue.ET),
    "ET": (Tissue.ET,),
}
REGION_NAMES: tuple[str, ...] = tuple(REGIONS)


class LabelValueError(ValueError):
    """A label map holds values outside its release's set."""


@dataclass(frozen=True)
class Release:
    """One release's label convention: release value -> tissue."""

    name: str
    to_tissue: Mapping[int, Tissue]

    @property
    def values(self) -> tuple[int, ...]:
        """The label values this release allows, background included."""
        return tuple(sorted(self.to_tissue))

    @property
    def from_tissue(self) -> dict[Tissue, int]:
        """Tissue -> release value (tissues the release cannot express are absent)."""
        return {t: v for v, t in self.to_tissue.items()}

    def region_values(self, region: str) -> tuple[int, ...]:
        """Release label values that make up ``region`` (e.g. WT -> (1, 2, 4) for brats2021)."""
        tissues = REGIONS[region]
        return tuple(sorted(v for v, t in self.to_tissue.items() if t in tissues))


RELEASES: dict[str, Release] = {
    "brats2021": Release(
        "brats2021",
        {0: Tissue.BACKGROUND, 1: Tissue.NCR, 2: Tissue.ED, 4: Tissue.ET},
    ),
    "brats2023": Release(
        "brats2023",
        {0: Tissue.BACKGROUND, 1: Tissue.NCR, 2: Tissue.ED, 3: Tissue.ET, 4: Tissue.RC},
    ),
    "msd": Release(
        "msd",
        {0: Tissue.BACKGROUND, 1: Tissue.ED, 2: Tissue.NCR, 3: Tissue.ET},
    ),
}


def get_release(name: str) -> Release:
    """Return the convention named ``name`` (``brats2021``, ``brats2023`` or ``msd``)."""
    try:
        return RELEASES[name]
    except KeyError:
        raise ValueError(f"unknown label convention {name!r}; expected one of {sorted(RELEASES)}") from None


def _lookup_table(mapping: Mapping[int, int], size: int, fill: int) -> np.ndarray:
    table = np.full(size, fill, dtype=np.int16)
    for src, dst in mapping.items():
        table[src] = dst
    return table


def release_to_tissue(label: np.ndarray, release: str) -> np.ndarray:
    """Map a release's label map to tissue codes (uint8, same shape).

    Raises :class:`LabelValueError` naming the offending values when ``label`` holds
    values outside the release's set (non-integers included).
    """
    rel = get_release(release)
    arr = np.asarray(label)
    if not np.issubdtype(arr.dtype, np.integer):
        rounded = np.rint(arr)
        if not np.all(np.isfinite(arr)) or np.any(rounded != arr):
            raise LabelValueError(f"label values are not integers (dtype {arr.dtype}); {rel.name} allows {rel.values}")
        arr = rounded.astype(np.int64)
    found = np.unique(arr)
    bad = sorted(int(v) for v in found if int(v) not in rel.to_tissue)
    if bad:
        raise LabelValueError(f"label values {bad} are outside the {rel.name} set {list(rel.values)}")
    table = _lookup_table({v: int(t) for v, t in rel.to_tissue.items()}, int(max(rel.values)) + 1, 0)
    return table[arr].astype(np.uint8)


def tissue_to_release(tissue: np.ndarray, release: str) -> np.ndarray:
    """Map tissue codes back to a release's label values (uint8).

    Tissues a release cannot express (RC outside brats2023) become background.
    """
    rel = get_release(release)
    table = _lookup_table({int(t): v for t, v in rel.from_tissue.items()}, len(Tissue), 0)
    return table[np.asarray(tissue, dtype=np.int64)].astype(np.uint8)


def tissue_to_regions(tissue: np.ndarray) -> np.ndarray:
    """Tissue map (...) -> boolean region masks (R, ...) in ``REGION_NAMES`` order."""
    tissue = np.asarray(tissue)
    return np.stack([np.isin(tissue, [int(t) for t in REGIONS[r]]) for r in REGION_NAMES])


def release_to_regions(label: np.ndarray, release: str) -> np.ndarray:
    """A release's label map (...) -> boolean region masks (R, ...)."""
    return tissue_to_regions(release_to_tissue(label, release))


def regions_to_tissue(regions: np.ndarray) -> np.ndarray:
    """Boolean region masks (R, ...) -> tissue map (uint8), the way BraTS submissions are built.

    ET wins over TC, TC over WT: a voxel in ET is ET; in TC but not ET it is NCR;
    in WT but not TC it is ED. Inconsistent masks (ET outside TC, say) are
    resolved the same way, so the result always has nested regions.
    """
    regions = np.asarray(regions).astype(bool)
    if regions.shape[0] != len(REGION_NAMES):
        raise ValueError(f"expected {len(REGION_NAMES)} region channels {REGION_NAMES}, got {regions.shape[0]}")
    wt, tc, et = (regions[REGION_NAMES.index(r)] for r in ("WT", "TC", "ET"))
    tissue = np.zeros(regions.shape[1:], dtype=np.uint8)
    tissue[wt] = Tissue.ED
    tissue[tc] = Tissue.NCR
    tissue[et] = Tissue.ET
    return tissue


def region_presence(regions: np.ndarray, axis: int = -1) -> np.ndarray:
    """Which regions are present in each slice along ``axis``.

    Args:
        regions: boolean masks (R, X, Y, Z).
        axis: the slice axis of the spatial dimensions (default: the last, axial).

    Returns:
        uint8 array (S, R): 1 where slice ``s`` contains a voxel of region ``r``.
    """
    regions = np.asarray(regions, dtype=bool)
    spatial_axis = axis % (regions.ndim - 1) + 1
    other = tuple(a for a in range(1, regions.ndim) if a != spatial_axis)
    return np.any(regions, axis=other).T.astype(np.uint8)
