"""Label conventions of every BraTS release and task, and the evaluation regions, as data.

This module is the only place in brats_psp that knows what a label value means.
Everything else (data loading, losses, metrics, inference) asks it.

Internally a label map uses *tissue* codes (:class:`Tissue`)::

    0 background, 1 NCR (necrotic / non-enhancing core), 2 ED (edema / SNFH),
    3 ET (enhancing tumour), 4 RC (resection cavity, BraTS 2024; in no region),
    5 CC (cystic component, paediatric; in TC and WT), 6 GTV (MEN-RT; in no region)

and the network predicts the three nested BraTS *regions* (channel order
``REGION_NAMES``)::

    WT (whole tumour) = NCR | ED | ET | CC,  TC (tumour core) = NCR | ET | CC,  ET = ET

Label conventions (from ``shared/REFERENCE.md``, checked against the ``configs/`` of the
official ``brats-evaluation`` package; MSD from its ``dataset.json``):

====================  =====  =====  =====  =====  =================================
convention            NCR    ED     ET     CC     other
====================  =====  =====  =====  =====  =================================
brats2021             1      2      4             (3 unused)
brats2023             1      2      3             4 = RC (GLI 2024+)
brats2023-ped         2      4      1      3
brats2023-men-rt                                  1 = GTV (no regions)
msd                   2      1      3
====================  =====  =====  =====  =====  =================================

Since 2023 every BraTS task shares one file naming (``BraTS-<TASK>-<patient>-<timepoint>``)
but not one convention: the task in the case id picks it (:data:`TASKS`,
:func:`convention_for`), or ``data.task`` forces it. GLI, SSA, GoAT, MEN and MET use
``brats2023``; PED (paediatric: 1 ET, 2 NETC, 3 CC, 4 ED) ``brats2023-ped``; MEN-RT (one
label, the radiotherapy target) has no WT/TC/ET regions, so a region model refuses it
(:class:`NoRegionsError`). Predictions written in the PED convention use 1 (ET), 2 (the
tumour core without ET) and 4 (edema): the regions cannot tell a cyst from the rest of
the core, so 3 (CC) is never predicted.

MSD label 2 is *non-enhancing tumour* (part of TC), not enhancing tumour: a widely
copied tutorial gets this wrong; ``tests/test_labels.py`` pins it.
"""

from __future__ import annotations

import enum
import re
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
    "NoRegionsError",
    "UnknownTaskError",
    "TASKS",
    "task_of",
    "canonical_task",
    "convention_for",
]


class Tissue(enum.IntEnum):
    """Internal tissue codes, shared by every release."""

    BACKGROUND = 0
    NCR = 1
    ED = 2
    ET = 3
    RC = 4
    CC = 5
    GTV = 6


#: Regions scored by BraTS, in the channel order of the network output.
REGIONS: dict[str, tuple[Tissue, ...]] = {
    "WT": (Tissue.NCR, Tissue.ED, Tissue.ET, Tissue.CC),
    "TC": (Tissue.NCR, Tissue.ET, Tissue.CC),
    "ET": (Tissue.ET,),
}
REGION_NAMES: tuple[str, ...] = tuple(REGIONS)


class LabelValueError(ValueError):
    """A label map holds values outside its release's set."""


class NoRegionsError(LabelValueError):
    """A convention without WT/TC/ET regions (MEN-RT) met a region model."""


class UnknownTaskError(ValueError):
    """A BraTS 2023+ case id whose task is not known (the message says how to force one)."""


@dataclass(frozen=True)
class Release:
    """One release's label convention: release value -> tissue."""

    name: str
    to_tissue: Mapping[int, Tissue]
    has_regions: bool = True  # False: no WT/TC/ET (MEN-RT); region models refuse it

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
    "brats2023-ped": Release(
        "brats2023-ped",
        {0: Tissue.BACKGROUND, 1: Tissue.ET, 2: Tissue.NCR, 3: Tissue.CC, 4: Tissue.ED},
    ),
    "brats2023-men-rt": Release("brats2023-men-rt", {0: Tissue.BACKGROUND, 1: Tissue.GTV}, has_regions=False),
    "msd": Release(
        "msd",
        {0: Tissue.BACKGROUND, 1: Tissue.ED, 2: Tissue.NCR, 3: Tissue.ET},
    ),
}

#: BraTS 2023+ task (the second field of the case id) -> its label convention.
TASKS: dict[str, str] = {
    "GLI": "brats2023",
    "SSA": "brats2023",
    "GoAT": "brats2023",
    "MEN": "brats2023",
    "MET": "brats2023",
    "PED": "brats2023-ped",
    "MEN-RT": "brats2023-men-rt",
}

_TASK_ID = re.compile(r"^BraTS-(MEN-RT|[A-Za-z]+)-")


def _canonical_task(name: str) -> str | None:
    return next((t for t in TASKS if t.lower() == name.lower()), None)


def canonical_task(name: str) -> str:
    """A task as :data:`TASKS` spells it (``ped`` -> ``PED``), or :class:`UnknownTaskError`."""
    task = _canonical_task(name)
    if task is None:
        raise UnknownTaskError(f"unknown task {name!r} (data.task / --task); expected auto or one of {list(TASKS)}")
    return task


def task_of(case_id: str) -> str:
    """The BraTS 2023+ task of ``case_id`` (``BraTS-PED-00012-000`` -> ``PED``).

    Raises:
        UnknownTaskError: the id has no task field, or one not in :data:`TASKS`; the
            message says how to force the task.
    """
    match = _TASK_ID.match(case_id)
    task = _canonical_task(match.group(1)) if match else None
    if task is None:
        what = f"task {match.group(1)!r}" if match else "no BraTS-<TASK>- prefix"
        raise UnknownTaskError(
            f"case {case_id}: {what} in its id, so its label convention is unknown; "
            f"force one with data.task=<task> (infer/evaluate: --task), one of {list(TASKS)}"
        )
    return task


def convention_for(case_id: str, layout: str, task: str = "auto") -> str:
    """The label convention of a case: its layout's, or for BraTS 2023+ files its task's.

    Args:
        case_id: the case's id (for 2023+ files, ``BraTS-<TASK>-...`` names the task).
        layout: ``brats2021``, ``brats2023`` or ``msd``.
        task: ``auto`` (from the id), or a task of :data:`TASKS` to force (any case).

    Raises:
        UnknownTaskError: ``task`` is not a known task, or ``auto`` and the id names none.
        ValueError: a task other than GLI forced on brats2021 / MSD files (one convention each).
    """
    forced = None if task == "auto" else canonical_task(task)
    if layout != "brats2023":
        if forced not in (None, "GLI"):
            raise ValueError(f"case {case_id}: task {task} needs BraTS 2023+ files; {layout} files have one label convention")
        return layout
    return TASKS[forced or task_of(case_id)]


def get_release(name: str, regions: bool = False) -> Release:
    """Return the convention named ``name`` (a key of :data:`RELEASES`).

    With ``regions=True`` a convention without WT/TC/ET regions (MEN-RT) raises
    :class:`NoRegionsError`.
    """
    try:
        rel = RELEASES[name]
    except KeyError:
        raise ValueError(f"unknown label convention {name!r}; expected one of {sorted(RELEASES)}") from None
    if regions and not rel.has_regions:
        raise NoRegionsError(
            f"the {name} convention (MEN-RT: one label, 1 = GTV) has no WT/TC/ET regions; "
            "a region model cannot be trained, run or scored on it"
        )
    return rel


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
    rel = get_release(release, regions=True)
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

    Tissues a release cannot express (RC outside brats2023) become background; CC (a
    paediatric cyst) becomes NCR where the release has no CC.
    """
    rel = get_release(release, regions=True)
    mapping = {int(t): v for t, v in rel.from_tissue.items()}
    mapping.setdefault(int(Tissue.CC), rel.from_tissue[Tissue.NCR])
    table = _lookup_table(mapping, len(Tissue), 0)
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
