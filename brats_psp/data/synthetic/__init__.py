"""Synthetic BraTS-like cases: the project's built-in dataset, built to transfer to real MRI.

A case is drawn in three steps, each a module of its own:

* :mod:`~brats_psp.data.synthetic.anatomy`: the MNI ICBM152 brain (cerebrum, cerebellum,
  brainstem) deformed, atrophied, with vessels, venous sinuses, choroid plexus and dura;
* :mod:`~brats_psp.data.synthetic.lesion`: one or two gliomas (site, size, kind, core, rim,
  edema along white matter);
* :mod:`~brats_psp.data.synthetic.appearance`: the four contrasts drawn from the tissue
  and lesion maps with per-case, per-contrast intensities, curves, bias, blur, noise and
  skull-strip errors (SynthSeg's domain randomisation, keeping the radiological cues).

Cases lie on the BraTS grid (240 x 240 x 155 voxels, 1 mm, affine ``diag(-1, -1, 1)``
with translation ``(0, 239, 0)``). All randomness comes from
``np.random.default_rng([seed, index])``, so case ``i`` of seed ``S`` is the same whatever
the number of cases generated. Writing in a release layout is :mod:`brats_psp.data.release`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from brats_psp.data.layouts import LAYOUTS
from brats_psp.data.release import case_paths, classes_path, write_case, write_dataset
from brats_psp.data.synthetic.anatomy import STRUCTURES, Anatomy, load_template, random_geometry, warp_anatomy
from brats_psp.data.synthetic.appearance import class_map, draw_appearance, render, skull_strip_errors
from brats_psp.data.synthetic.grid import BRATS_AFFINE, BRATS_SHAPE, smooth_noise
from brats_psp.data.synthetic.lesion import LESION_CLASSES, LesionPlan, draw_lesion, plan_lesions
from brats_psp.labels import Tissue

__all__ = [
    "GENERATOR_VERSION",
    "BRATS_SHAPE",
    "BRATS_AFFINE",
    "SyntheticCase",
    "case_id_for",
    "generate_case",
    "write_case",
    "write_dataset",
    "case_paths",
    "classes_path",
]

logger = logging.getLogger(__name__)

#: Bumped whenever generated cases change for a given seed (the built-in cache is keyed on it).
#: 8-20 and 22-24 were trial generators, never the default (README, "More real scans";
#: docs/experiments.md); 21 spares the cortex in the edema's appearance.
GENERATOR_VERSION = 21

#: Merge order of overlapping lesions' labels: ET over NCR over ED over background.
_RANK = np.array([0, 2, 1, 3, 0], np.uint8)  # by tissue code 0 BG, 1 NCR, 2 ED, 3 ET, 4 RC
_FROM_RANK = np.array([Tissue.BACKGROUND, Tissue.ED, Tissue.NCR, Tissue.ET], np.uint8)


@dataclass
class SyntheticCase:
    """One synthetic case.

    Attributes:
        case_id: the case's identifier in its release's naming (see :func:`case_id_for`).
        images: modality (``MODALITIES``: t1, t1ce, t2, flair) -> int16 array of
            shape ``BRATS_SHAPE`` (240, 240, 155); 0 outside the brain.
        tissue: uint8 array of shape ``BRATS_SHAPE`` with tissue codes
            (0 background, 1 NCR, 2 ED, 3 ET; :class:`brats_psp.labels.Tissue`).
        affine: 4 x 4 float64 voxel -> world (mm) affine (``BRATS_AFFINE``).
        lesions: the plans of the case's lesions (kind, core, site, size), for inspection.
        classes: uint8 array of shape ``BRATS_SHAPE``: the appearance class each voxel was
            drawn as (:data:`~brats_psp.data.synthetic.appearance.CLASS_NAMES`).
    """

    case_id: str
    images: dict[str, np.ndarray]
    tissue: np.ndarray
    affine: np.ndarray
    lesions: tuple[LesionPlan, ...] = ()
    classes: np.ndarray | None = None


def case_id_for(index: int, fmt: str) -> str:
    """Case identifier of case ``index`` (0-based) in release layout ``fmt``.

    ``brats2021`` -> ``BraTS2021_00000``, ``brats2023`` -> ``BraTS-GLI-00000-000``,
    ``brats2023-ped`` -> ``BraTS-PED-00000-000``, ``msd`` -> ``BRATS_001`` (1-based, as in the Decathlon).
    """
    if index < 0:
        raise ValueError(f"case index must be >= 0, got {index}")
    if fmt == "brats2021":
        return f"BraTS2021_{index:05d}"
    if fmt == "brats2023":
        return f"BraTS-GLI-{index:05d}-000"
    if fmt == "brats2023-ped":
        return f"BraTS-PED-{index:05d}-000"
    if fmt == "msd":
        return f"BRATS_{index + 1:03d}"
    raise ValueError(f"unknown layout {fmt!r}; expected one of {sorted(LAYOUTS)}")


def _intersect(outer: tuple[slice, ...], inner: tuple[slice, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """Slices of the overlap of two boxes (full-grid slices), local to ``outer`` and to ``inner``."""
    lo = [max(a.start, b.start) for a, b in zip(outer, inner)]
    hi = [min(a.stop, b.stop) for a, b in zip(outer, inner)]
    if any(h <= lo_ for lo_, h in zip(lo, hi)):
        return None
    in_outer = tuple(slice(a - o.start, b - o.start) for a, b, o in zip(lo, hi, outer))
    in_inner = tuple(slice(a - i.start, b - i.start) for a, b, i in zip(lo, hi, inner))
    return in_outer, in_inner


def _paste_lesions(rng: np.random.Generator, plans: list[LesionPlan], anatomy: Anatomy) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Draw each lesion and paste it into the brain's box: the label rank map (uint8, the
    higher label wins where lesions meet), each appearance class's weight (the larger wins)
    and the heterogeneity texture (lesion textures added to a case-wide one)."""
    box, shape = anatomy.box, anatomy.brain.shape
    wm_full = anatomy.full(anatomy.wm)
    brain_full = anatomy.full(anatomy.brain)
    rank = np.zeros(shape, np.uint8)
    weights = {name: np.zeros(shape, np.float32) for name in LESION_CLASSES}
    texture = smooth_noise(rng, shape, float(rng.uniform(2.0, 6.0))) * np.float32(0.5)
    for plan in plans:
        les = draw_lesion(rng, plan, wm_full, brain_full)
        overlap = _intersect(box, les.box)
        if overlap is None:
            continue
        at, src = overlap
        np.maximum(rank[at], _RANK[les.tissue[src]], out=rank[at])
        for name in LESION_CLASSES:
            np.maximum(weights[name][at], les.weights[name][src], out=weights[name][at])
        texture[at] += les.texture[src]
    return rank, weights, texture


def generate_case(index: int, seed: int = 0, fmt: str = "brats2021") -> SyntheticCase:
    """Generate synthetic case ``index`` of the dataset with ``seed`` (see :func:`_generate_case`).

    The BLAS runs on one thread meanwhile: OpenBLAS's float32 products can round differently
    with two threads than with one, which changed a few voxels by one between a case drawn in
    the main process and the same case drawn in a worker process.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        return _generate_case(index, seed, fmt)


def _generate_case(index: int, seed: int = 0, fmt: str = "brats2021") -> SyntheticCase:
    """Generate synthetic case ``index`` of the dataset with ``seed``.

    Deterministic: uses ``np.random.default_rng([seed, index])`` only, so the result
    does not depend on which other cases were generated. ``fmt`` only sets the case id.

    Returns:
        a :class:`SyntheticCase` with four int16 contrasts and a uint8 tissue map,
        each of shape ``BRATS_SHAPE`` (240, 240, 155), 1 mm voxels, ``BRATS_AFFINE``.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    case_id = case_id_for(index, fmt)
    t0 = time.perf_counter()
    tpl = load_template()
    rng = np.random.default_rng([seed, index])

    # 1. Anatomy: geometry with the lesions' mass effect, atrophy, structures.
    geo = random_geometry(rng, tpl)
    plans = plan_lesions(rng, index, geo, tpl)
    anatomy = warp_anatomy(rng, tpl, geo, [(p.centre_vox, p.push, p.push_radius) for p in plans])
    t_anat = time.perf_counter()

    # 2. Lesions, pasted into the brain's box.
    rank, weights, texture = _paste_lesions(rng, plans, anatomy)
    t_les = time.perf_counter()

    # 3. Appearance: skull-strip errors, then the four contrasts.
    app = draw_appearance(rng)
    rim, bites = skull_strip_errors(rng, anatomy.brain)
    mask = (anatomy.brain | rim) & ~bites
    rank[bites] = 0
    structures = {"rim": rim.astype(np.float32), **{k: anatomy.structures[k] for k in STRUCTURES}}
    fractions = {"csf": anatomy.csf, "gm": anatomy.gm, "wm": anatomy.wm}
    box_images = render(rng, app, fractions, [structures, weights], texture, mask)
    classes = anatomy.full(class_map(fractions, [structures, weights], mask, rank > 0))

    images = {m: anatomy.full(img) for m, img in box_images.items()}
    tissue = anatomy.full(_FROM_RANK[rank])
    t_end = time.perf_counter()
    logger.debug(
        "case %s (%s): anatomy %.2f s, lesions %.2f s, contrasts %.2f s",
        case_id,
        ", ".join(f"{p.kind}/{p.interior} r={p.radii.mean():.1f} mm in {p.region}" for p in plans),
        t_anat - t0,
        t_les - t_anat,
        t_end - t_les,
    )
    return SyntheticCase(case_id=case_id, images=images, tissue=tissue, affine=BRATS_AFFINE.copy(), lesions=tuple(plans), classes=classes)
