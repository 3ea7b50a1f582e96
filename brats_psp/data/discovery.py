"""Find the cases in a folder of any BraTS release layout, in one case folder, or in a datalist.

A :class:`Case` names its four contrast files in the fixed :data:`MODALITIES` order (or
one 4D file for the Medical Segmentation Decathlon) and its label file when there is one.
Discovery never opens an image: it only looks at names, so it is cheap on big folders.
Each case carries its label convention (:attr:`Case.labels`): its release's, or for BraTS
2023+ files its task's (``BraTS-PED-*`` is paediatric; :func:`brats_psp.labels.convention_for`).
A case that misses a contrast, or whose task is unknown, is reported as a
:class:`~brats_psp.errors.CaseError` in :attr:`Discovery.failures`; the other cases go on.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from brats_psp.data.layouts import (
    IMAGE_EXTENSIONS,
    LAYOUTS,
    MODALITIES,
    NIFTI_EXTENSIONS,
    Layout,
    get_layout,
)
from brats_psp.errors import CaseError, DiscoveryError
from brats_psp.labels import UnknownTaskError, canonical_task, convention_for

__all__ = ["Case", "Discovery", "discover_cases", "detect_layout", "split_nifti_name", "resolve_inside", "label_files"]

log = logging.getLogger(__name__)

_MSD_IMAGE_DIRS = ("imagesTr", "imagesTs")


@dataclass(frozen=True)
class Case:
    """One patient: four contrasts (or one 4D image) and maybe a label.

    Attributes:
        case_id: the release's case identifier (``BraTS2021_00000``, ``BraTS-GLI-00001-000``, ``BRATS_001``).
        layout: the release layout (``brats2021``, ``brats2023``, ``msd``).
        images: four paths in ``MODALITIES`` order, or one 4D path (``msd``).
        label: the segmentation file, or ``None`` for inference-only cases.
        convention: the label convention (a key of :data:`brats_psp.labels.RELEASES`): the
            layout's, or for 2023+ files the task's (``brats2023-ped`` for ``BraTS-PED-*``);
            empty means the layout's.
    """

    case_id: str
    layout: str
    images: tuple[Path, ...]
    label: Path | None = None
    convention: str = ""

    @property
    def labels(self) -> str:
        """The case's label convention (:data:`brats_psp.labels.RELEASES` key)."""
        return self.convention or self.layout

    def to_json(self) -> dict[str, Any]:
        """MONAI-style datalist entry."""
        entry: dict[str, Any] = {"case_id": self.case_id, "layout": self.layout, "image": [str(p) for p in self.images]}
        if self.label is not None:
            entry["label"] = str(self.label)
        if self.convention and self.convention != self.layout:
            entry["labels"] = self.convention
        return entry


@dataclass
class Discovery:
    """What discovery found: the complete cases, and a named error for each incomplete one."""

    cases: list[Case]
    layout: str
    failures: list[CaseError] = field(default_factory=list)


def split_nifti_name(name: str) -> tuple[str, str] | None:
    """``"X_t1.nii.gz"`` -> ``("X_t1", ".nii.gz")``; ``None`` for a file that is not an image
    (NIfTI, or NRRD / MetaImage: :data:`~brats_psp.data.layouts.IMAGE_EXTENSIONS`)."""
    for ext in IMAGE_EXTENSIONS:
        if name.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], ext
    return None


def _match_file(stem: str, layout: Layout) -> tuple[str, str] | None:
    """(case id, modality or "seg") if ``stem`` is a file of ``layout``."""
    for modality, suffix in (*layout.suffixes, ("seg", layout.label_suffix)):
        tail = f"{layout.separator}{suffix}"
        if stem.endswith(tail) and len(stem) > len(tail):
            return stem[: -len(tail)], modality
    return None


def _image_files(root: Path, report: bool = False) -> list[Path]:
    """Image files under ``root``, following symbolically linked folders and files (a common way
    to assemble a dataset) once each: a link that leads back into a visited folder is not entered.
    With ``report``, every folder or file left out is logged with the reason."""
    say = log.info if report else log.debug
    found = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            say("skipped folder %s: a link to %s, already searched", dirpath, real)
            dirnames[:] = []
            continue
        visited.add(real)
        for hidden in sorted(d for d in dirnames if d.startswith(".")):
            say("skipped folder %s: hidden", Path(dirpath) / hidden)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or not split_nifti_name(name):
                continue
            if not path.exists():
                (log.warning if report else log.debug)("skipped file %s: a broken link (to %s)", path, os.readlink(path))
                continue
            found.append(path)
    return found


def label_files(root: str | os.PathLike, layout: str = "auto") -> dict[str, tuple[Path, str]] | None:
    """A folder of reference label files alone (as the challenge's evaluation tools take them):
    case id -> (label file, its layout), or ``None`` when ``root`` holds anything else (contrast
    images, files of no BraTS naming) or nothing.

    The names say the layout: ``<id>_seg.nii.gz`` is BraTS 2017-2021, ``<id>-seg.nii.gz`` BraTS
    2023+ (its label convention then depends on the task: :func:`brats_psp.labels.convention_for`);
    a folder named ``labelsTr`` holds the Decathlon's ``<id>.nii.gz``. ``layout`` forces one of them.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    if root.name == "labelsTr" and layout in ("auto", "msd"):  # the Decathlon's label folder
        msd = {split_nifti_name(p.name)[0]: (p, "msd") for p in _image_files(root)}  # type: ignore[index]
        return msd or None
    layouts = [LAYOUTS[layout]] if layout in ("brats2021", "brats2023") else [LAYOUTS["brats2021"], LAYOUTS["brats2023"]]
    found: dict[str, tuple[Path, str]] = {}
    for path in _image_files(root):
        stem = split_nifti_name(path.name)[0]  # type: ignore[index]
        matches = [(m, lay.name) for lay in layouts if (m := _match_file(stem, lay))]
        if not matches or any(modality != "seg" for (_, modality), _ in matches):
            return None  # a contrast image or an unknown file: not a folder of labels alone
        (case_id, _), release = matches[0]
        found[case_id] = (path, release)
    return found or None


def detect_layout(root: str | os.PathLike) -> str:
    """The layout of the NIfTI files under ``root``.

    Raises:
        DiscoveryError: no NIfTI file of any layout, or files of several layouts.
    """
    root = Path(root)
    counts: dict[str, int] = defaultdict(int)
    for path in _image_files(root):
        stem = split_nifti_name(path.name)[0]  # type: ignore[index]
        if path.parent.name in _MSD_IMAGE_DIRS or path.parent.name == "labelsTr":
            counts["msd"] += 1
            continue
        for layout in (LAYOUTS["brats2021"], LAYOUTS["brats2023"]):
            if _match_file(stem, layout):
                counts[layout.name] += 1
    if not counts:
        raise DiscoveryError(f"{root}: no BraTS case found (no NIfTI file named like any of {sorted(LAYOUTS)})")
    if len(counts) > 1:
        raise DiscoveryError(
            f"{root}: files of several layouts ({dict(counts)}); keep one release per folder or force data.layout"
        )
    return next(iter(counts))


def _discover_per_contrast(root: Path, layout: Layout) -> Discovery:
    groups: dict[tuple[Path, str], dict[str, Path]] = defaultdict(dict)
    unmatched: dict[Path, list[str]] = defaultdict(list)
    for path in _image_files(root, report=True):
        match = _match_file(split_nifti_name(path.name)[0], layout)  # type: ignore[index]
        if match:
            case_id, modality = match
            groups[(path.parent, case_id)][modality] = path
        else:
            unmatched[path.parent].append(path.name)
    for folder, names in sorted(unmatched.items()):
        if not any(f == folder for f, _ in groups):  # a folder with images but no case in them
            log.warning("skipped folder %s: its image files (%s) are not named as %s contrasts", folder, ", ".join(names[:4]), layout.name)
    cases, failures = [], []
    for (folder, case_id), files in sorted(groups.items(), key=lambda kv: kv[0][1]):
        missing = [m for m in MODALITIES if m not in files]
        if missing:
            expected = ", ".join(layout.filename(case_id, m) for m in missing)
            failures.append(CaseError(case_id, folder, f"missing contrast file(s): {expected}"))
            continue
        cases.append(Case(case_id, layout.name, tuple(files[m] for m in MODALITIES), files.get("seg")))
    return Discovery(cases, layout.name, failures)


def _discover_msd(root: Path) -> Discovery:
    cases = []
    image_dirs = [root / d for d in _MSD_IMAGE_DIRS if (root / d).is_dir()]
    if root.name in _MSD_IMAGE_DIRS:
        image_dirs, root = [root], root.parent
    for image_dir in image_dirs:
        for path in _image_files(image_dir):
            case_id, ext = split_nifti_name(path.name)  # type: ignore[misc]
            label = None
            if image_dir.name == "imagesTr":
                candidates = [root / "labelsTr" / f"{case_id}{e}" for e in NIFTI_EXTENSIONS]
                label = next((c for c in candidates if c.is_file()), None)
            cases.append(Case(case_id, "msd", (path,), label))
    return Discovery(sorted(cases, key=lambda c: c.case_id), "msd")


def resolve_inside(base: Path, relative: str, what: str) -> Path:
    """Resolve ``relative`` against ``base`` and refuse paths that leave ``base``."""
    path = (base / relative).resolve()
    if not path.is_relative_to(base.resolve()):
        raise DiscoveryError(f"{what}: path {relative!r} leaves the datalist's folder {base}")
    return path


def _classify(path: Path) -> tuple[str, str, str] | None:
    """(layout, case id, modality) of a per-contrast file name, whatever the release."""
    split = split_nifti_name(path.name)
    if split is None:
        return None
    for layout in (LAYOUTS["brats2021"], LAYOUTS["brats2023"]):
        match = _match_file(split[0], layout)
        if match:
            return layout.name, *match
    return None


def _discover_datalist(path: Path, section: str | None) -> Discovery:
    try:
        body = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DiscoveryError(f"{path}: not a readable JSON datalist: {err}") from None
    sections = [section] if section else [s for s in ("training", "validation", "testing") if s in body]
    if not sections or any(not isinstance(body.get(s), list) for s in sections):
        raise DiscoveryError(f"{path}: a datalist needs a list under 'training', 'validation' or 'testing'")
    base = path.parent
    cases, failures, layouts = [], [], set()
    for name in sections:
        for i, entry in enumerate(body[name]):
            entry = {"image": entry} if isinstance(entry, str) else entry
            images = entry.get("image")
            images = [images] if isinstance(images, str) else images
            case_id = entry.get("case_id") or f"{name}[{i}]"
            try:
                if not images:
                    raise CaseError(case_id, path, "datalist entry has no 'image'")
                paths = [resolve_inside(base, p, f"{path} entry {case_id}") for p in images]
                label = entry.get("label")
                label_path = resolve_inside(base, label, f"{path} entry {case_id}") if label else None
                if len(paths) == 1:
                    layout = entry.get("layout", "msd")
                    cid = entry.get("case_id") or split_nifti_name(paths[0].name)[0]  # type: ignore[index]
                    ordered = tuple(paths)
                else:
                    found = {}
                    for p in paths:
                        cls = _classify(p)
                        if cls is None:
                            raise CaseError(case_id, p, "cannot tell which contrast this file holds from its name")
                        layout, cid, modality = cls
                        found[modality] = p
                    missing = [m for m in MODALITIES if m not in found]
                    if missing:
                        raise CaseError(cid, paths[0].parent, f"datalist entry misses contrast(s) {missing}")
                    cid = entry.get("case_id") or cid
                    ordered = tuple(found[m] for m in MODALITIES)
                layouts.add(layout)
                cases.append(Case(cid, layout, ordered, label_path, entry.get("labels", "")))
            except CaseError as err:
                failures.append(err)
            except DiscoveryError as err:
                failures.append(CaseError(case_id, path, str(err)))
    return Discovery(cases, layouts.pop() if len(layouts) == 1 else "mixed", failures)


def _assign_conventions(found: Discovery, task: str) -> None:
    """Set each case's label convention; a case whose task is unknown becomes a failure."""
    if task != "auto":
        try:
            canonical_task(task)
        except UnknownTaskError as err:
            raise DiscoveryError(str(err)) from None
    cases = []
    for case in found.cases:
        if case.convention:  # named by a datalist entry
            cases.append(case)
            continue
        try:
            convention = convention_for(case.case_id, case.layout, task)
        except ValueError as err:  # UnknownTaskError, or a task forced on files of one convention
            found.failures.append(CaseError(case.case_id, case.images[0].parent, str(err)))
            continue
        cases.append(replace(case, convention=convention))
    found.cases = cases


def discover_cases(
    path: str | os.PathLike, layout: str = "auto", datalist_section: str | None = None, task: str = "auto"
) -> Discovery:
    """Find the cases under ``path``, each with its label convention.

    Args:
        path: a dataset folder (any supported layout, cases in sub-folders at any depth),
            one case folder, an MSD ``imagesTr``/``imagesTs`` folder, or a MONAI-style datalist JSON
            (entries ``{"image": [4 files] | 4D file, "label": file}``, paths relative to the JSON).
        layout: ``auto`` to detect, or force ``brats2021`` / ``brats2023`` / ``msd``.
        datalist_section: for a datalist, read only this section (default: all of them).
        task: ``auto`` (the BraTS 2023+ task from each case id) or a task to force
            (``data.task``; :data:`brats_psp.labels.TASKS`). A 2023+ case whose id names no
            known task is reported as a failure that says how to force it; the others go on.

    Raises:
        DiscoveryError: the path does not exist, holds no case, or mixes layouts; ``task``
            is not a known task.
    """
    path = Path(path)
    if not path.exists():
        raise DiscoveryError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix == ".json":
            found = _discover_datalist(path, datalist_section)
        else:
            raise DiscoveryError(f"{path}: expected a folder or a .json datalist, got a file")
    else:
        name = detect_layout(path) if layout == "auto" else get_layout(layout).name
        found = _discover_msd(path) if name == "msd" else _discover_per_contrast(path, LAYOUTS[name])
    _assign_conventions(found, task)
    if not found.cases and not found.failures:
        raise DiscoveryError(f"{path}: no {found.layout} case found")
    ids = [c.case_id for c in found.cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DiscoveryError(f"{path}: case ids found more than once: {duplicates}")
    log.info("found %d %s case(s) under %s (%d incomplete)", len(found.cases), found.layout, path, len(found.failures))
    return found
