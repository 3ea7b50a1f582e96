"""Lesions of a synthetic case: where gliomas grow, how large, and what their parts are.

A case has one lesion, or (15 %) a second, smaller one elsewhere (multifocal). Each lesion
(:func:`plan_lesions`, :func:`draw_lesion`):

* **Site**: a white-matter point of the template drawn with the regional frequencies of
  gliomas (:data:`~brats_psp.data.synthetic.anatomy.SITE_WEIGHTS`: frontal and temporal
  lobes most often, then insula, parieto-occipital lobes, corpus callosum, cerebellum and
  brainstem), deep enough for the lesion's size.
* **Size**: the core is an irregular ellipsoid (mean radius 4-28 mm for a first lesion,
  log-uniform, as large as BraTS gliomas mostly are; 2.5-12 mm for a second focus; boundary
  perturbed by a smooth field); with edema the whole tumour spans about 1 to 250 mL.
* **Kind** (``KIND_CYCLE``: in any 8 consecutive cases 4 high-grade, 2 solid, 2 low-grade):

  - ``gbm``: an enhancing rim (thin 2 mm to thick 7 mm, smooth or nodular, complete or
    with gaps where the wall does not enhance) around a core that is necrotic, cystic
    (fluid) or haemorrhagic;
  - ``solid``: an enhancing mass, half with a small necrotic centre, some with a
    non-enhancing part;
  - ``lgg``: a non-enhancing core (no ET), sometimes with a cyst.
* **Edema**: the front of a Fisher-Kolmogorov (proliferation-invasion) process grown from
  the core, with a diffusivity ~25x higher in white matter than in grey matter and CSF, so
  it spreads along white-matter tracts with finger-like fronts and spares the cortex; cut
  with a noisy threshold. Its reach goes from almost none to 35 mm.

Labels: core parts (necrosis, cyst, haemorrhage, non-enhancing tumour) are NCR, the
enhancing parts ET, the edema ED, only inside the brain. The soft weights of each
*appearance class* (:data:`LESION_CLASSES`) go to :mod:`~brats_psp.data.synthetic.appearance`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from brats_psp.data.synthetic.anatomy import SITE_WEIGHTS, Geometry, Template
from brats_psp.data.synthetic.grid import BRATS_SHAPE, rotation, smooth_noise, upsample_half, world_to_vox
from brats_psp.labels import Tissue

__all__ = ["KIND_CYCLE", "LESION_CLASSES", "LesionPlan", "Lesion", "plan_lesions", "draw_lesion"]

#: Lesion type by ``index % 8`` (the first lesion of a case).
KIND_CYCLE: tuple[str, ...] = ("gbm", "lgg", "gbm", "solid", "gbm", "solid", "lgg", "gbm")

#: Appearance classes of lesion voxels (each gets its own intensities per contrast).
LESION_CLASSES: tuple[str, ...] = ("ed", "et", "ncr", "cyst", "haem", "net")

#: Probability that a case has a second lesion (multifocal glioma).
MULTIFOCAL_PROB = 0.15


@dataclass
class LesionPlan:
    kind: str  # "gbm", "solid" or "lgg"
    interior: str  # what fills the core: "necrotic", "cystic", "haemorrhagic", "solid", "net"
    centre_vox: np.ndarray  # (3,) output voxel coordinates
    radii: np.ndarray  # (3,) core semi-axes, mm
    orientation: np.ndarray  # 3 x 3 rotation of the core ellipsoid
    edema_reach: float  # mm, typical extent of edema beyond the core
    push: float  # mass-effect strength (0: none)
    region: str  # the site's region (a key of SITE_WEIGHTS)

    @property
    def push_radius(self) -> float:
        return float(self.radii.mean()) * 1.4 + 4.0


@dataclass
class Lesion:
    """A lesion drawn in a box of the output grid (all arrays have the box's shape)."""

    box: tuple[slice, slice, slice]
    tissue: np.ndarray  # uint8 tissue codes
    weights: dict[str, np.ndarray]  # appearance class (LESION_CLASSES) -> soft weight in [0, 1]
    texture: np.ndarray  # float32 smooth zero-mean field: lesion heterogeneity


def _plan_one(
    rng: np.random.Generator, kind: str, geo: Geometry, tpl: Template, radius_range: tuple[float, float] | None = None
) -> LesionPlan:
    low, high = radius_range or {"solid": (4.0, 18.0), "lgg": (6.0, 28.0), "gbm": (8.0, 28.0)}[kind]
    radius = float(np.exp(rng.uniform(np.log(low), np.log(high))))
    radii = radius * rng.uniform(0.7, 1.3, size=3)
    orientation = rotation(rng.uniform(-np.pi, np.pi, size=3))
    names = list(SITE_WEIGHTS)
    # A site deep enough for the lesion's size (most of the core inside the brain), by region frequency.
    ok = tpl.lesion_depth >= min(0.5 * radius + 3.0, 18.0)
    if not ok.any():
        ok = np.ones(len(tpl.lesion_depth), bool)
    weights = np.array([SITE_WEIGHTS[names[r]] for r in tpl.site_region[ok]])
    counts = np.bincount(tpl.site_region[ok], minlength=len(names)).astype(float)
    weights = weights / counts[tpl.site_region[ok]]  # region frequency, whatever its number of sites
    pick = rng.choice(np.flatnonzero(ok), p=weights / weights.sum())
    site = tpl.lesion_sites[pick] + rng.uniform(-1.0, 1.0, size=3)
    region = names[int(tpl.site_region[pick])]
    centre_vox = world_to_vox(geo.forward(site[None]))[0]
    centre_vox = np.clip(centre_vox, 10, np.array(BRATS_SHAPE) - 11)
    if kind == "gbm":
        interior = str(rng.choice(["necrotic", "cystic", "haemorrhagic"], p=[0.55, 0.27, 0.18]))
    elif kind == "solid":
        interior = "solid"
    else:
        interior = "net"
    reach_max = {"gbm": 35.0, "solid": 28.0, "lgg": 18.0}[kind]
    edema_reach = float(rng.uniform(0.5, reach_max)) * (0.6 + 0.4 * min(radius / 12.0, 1.5))
    push = float(rng.uniform(0.1, 0.45)) * min(radius / 15.0, 1.0)
    return LesionPlan(kind, interior, centre_vox, radii, orientation, edema_reach, push, region)


def plan_lesions(rng: np.random.Generator, index: int, geo: Geometry, tpl: Template) -> list[LesionPlan]:
    """The case's lesions: the first of ``KIND_CYCLE[index % 8]``, sometimes a second, smaller one."""
    kind = KIND_CYCLE[index % len(KIND_CYCLE)]
    plans = [_plan_one(rng, kind, geo, tpl)]
    if rng.random() < MULTIFOCAL_PROB:
        first = plans[0]
        for _ in range(20):  # a site away from the first lesion
            other = _plan_one(rng, str(rng.choice(["gbm", "solid", kind])), geo, tpl, (2.5, 12.0))
            gap = np.linalg.norm(other.centre_vox - first.centre_vox)
            if gap > first.radii.max() + other.radii.max() + 12.0:
                plans.append(other)
                break
    return plans


def _ellipsoid_radius(plan: LesionPlan, lo: np.ndarray, shape: tuple[int, int, int], step: int) -> np.ndarray:
    """Normalised ellipsoidal radius (1 on the core's mean surface) on the grid
    ``lo + step * (i, j, k)`` of ``shape`` (output voxel coordinates), float32."""
    rel = [(lo[k] + step * np.arange(shape[k], dtype=np.float32)) - np.float32(plan.centre_vox[k]) for k in range(3)]
    rot = (plan.orientation.T / plan.radii[:, None]).astype(np.float32)
    d2 = np.zeros(shape, np.float32)
    for row in rot:
        comp = row[0] * rel[0][:, None, None] + row[1] * rel[1][None, :, None] + row[2] * rel[2][None, None, :]
        d2 += comp * comp
    return np.sqrt(d2)


def _coverage(rng: np.random.Generator, shape: tuple[int, ...], spacing: float, fraction: float) -> np.ndarray:
    """Soft (about 1 voxel wide edges) random map in [0, 1] covering ~``fraction`` of the grid."""
    f = smooth_noise(rng, shape, spacing)
    thr = np.quantile(f[::2, ::2, ::2], 1.0 - fraction) if f.size > 64 else 0.0
    return np.clip((f - thr) * spacing * 0.5 + 0.5, 0.0, 1.0).astype(np.float32)


def _edema_score(
    rng: np.random.Generator, plan: LesionPlan, wm: np.ndarray, brain: np.ndarray, amp: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The edema's noisy logit at 2 mm over the lesion's box, and the box ``(lo, hi)`` (output
    voxels, trimmed to the lesion's extent + margin, on even offsets).

    The front of ``u' = div(D grad u) + u (1 - u)`` grown from the core, with ``D`` high in
    white matter, ~25x lower in grey matter and CSF, 0 outside the brain, modulated by a random
    field (irregular, finger-like spread along the tracts); edema is where the score is > 0.
    """
    rmax = float(plan.radii.max())
    half = int(np.ceil(rmax * (1.0 + 2.0 * amp) + 1.6 * plan.edema_reach + 8.0))
    centre = np.floor(plan.centre_vox).astype(int)
    lo = np.maximum(centre - half, 0)
    hi = np.minimum(centre + half + 1, BRATS_SHAPE)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    wm_h = wm[box][::2, ::2, ::2]
    brain_h = brain[box][::2, ::2, ::2]
    shape_h = wm_h.shape
    seed = (_ellipsoid_radius(plan, lo, shape_h, 2) < 1.0 + 0.5 * amp) & brain_h
    diffusivity = np.maximum(np.clip(wm_h, 0.0, 1.0) ** 1.5, 0.04) * brain_h
    diffusivity *= np.exp(float(rng.uniform(0.25, 0.6)) * smooth_noise(rng, shape_h, spacing=3.0))
    np.minimum(diffusivity, 1.0, out=diffusivity)
    u = seed.astype(np.float32)
    n_iter = int(np.clip(round(plan.edema_reach / 2.6) + 1, 1, 25))  # the front moves ~2.6 mm/step in WM
    for _ in range(n_iter):
        u += diffusivity * (ndi.gaussian_filter(u, 1.5, truncate=2.5) - u)  # sigma 3 mm
        u += u * (1.0 - u)
        np.maximum(u, seed, out=u)
    u = np.clip(u, 1e-4, 1.0 - 1e-4)
    score = np.log(u / (1.0 - u)) + 1.5 * smooth_noise(rng, shape_h, spacing=3.0)  # noisy logit

    # Trim the box to the lesion's extent (+ margin), on even offsets.
    extent = (score > -2.0) | (_ellipsoid_radius(plan, lo, shape_h, 2) < 1.0 + 3.0 * amp)
    nz = [np.flatnonzero(extent.any(axis=tuple(a for a in range(3) if a != k))) for k in range(3)]
    if any(len(v) == 0 for v in nz):  # lesion outside the brain: nothing to draw
        nz = [np.array([shape_h[k] // 2]) for k in range(3)]
    h_lo = np.array([max(int(v[0]) - 2, 0) for v in nz])
    h_hi = np.array([min(int(v[-1]) + 3, shape_h[k]) for k, v in enumerate(nz)])
    score = score[tuple(slice(int(a), int(b)) for a, b in zip(h_lo, h_hi))]
    return score, lo + 2 * h_lo, np.minimum(lo + 2 * h_hi, hi)


def _core_parts(rng: np.random.Generator, plan: LesionPlan, d: np.ndarray, amp: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The core's soft weight (an irregular ellipsoid with a ~1 mm edge; ``d`` is the normalised
    ellipsoidal radius on the box) and each appearance class's share of it, by lesion kind."""
    shape = d.shape
    rmax = float(plan.radii.max())
    rough = smooth_noise(rng, shape, spacing=max(4.0, rmax / 2.0))
    mean_r = float(plan.radii.mean())
    core_w = np.clip(0.5 - (d - 1.0 - amp * rough) * mean_r, 0.0, 1.0)
    zeros = np.zeros(shape, np.float32)
    w = {name: zeros.copy() for name in LESION_CLASSES}

    def inner_part(rim_mm: np.ndarray | float) -> np.ndarray:
        """Soft weight of the part of the core deeper than ``rim_mm`` from its surface."""
        inner = 1.0 - np.maximum(np.asarray(rim_mm, np.float32), 0.5) / mean_r
        inner = np.maximum(inner, 0.12)
        rough2 = smooth_noise(rng, shape, spacing=max(3.0, rmax / 3.0))
        return np.minimum(np.clip(0.5 - (d - inner - 0.10 * rough2) * mean_r, 0.0, 1.0), core_w)

    if plan.kind == "lgg":
        w["net"] = core_w.copy()
        if rng.random() < 0.3:  # a cyst inside the low-grade core
            cyst = inner_part(float(rng.uniform(2.0, max(2.0, 0.6 * mean_r))))
            w["cyst"], w["net"] = cyst, core_w - cyst
    elif plan.kind == "gbm":
        thick = float(rng.uniform(2.0, 4.0) if plan.interior == "cystic" else rng.uniform(2.0, 7.0))
        nodular = float(rng.choice([0.0, rng.uniform(0.3, 1.0)], p=[0.5, 0.5]))
        rim_mm = thick * (1.0 + nodular * np.abs(smooth_noise(rng, shape, spacing=max(4.0, mean_r / 2.0))))
        interior = inner_part(rim_mm)
        rim = core_w - interior
        if rng.random() < 0.35:  # incomplete enhancement: part of the wall does not enhance
            enh = _coverage(rng, shape, max(5.0, mean_r / 2.0), float(rng.uniform(0.5, 0.9)))
            w["et"], w["net"] = rim * enh, rim * (1.0 - enh)
        else:
            w["et"] = rim
        key = {"necrotic": "ncr", "cystic": "cyst", "haemorrhagic": "ncr"}[plan.interior]
        w[key] = interior
        if plan.interior == "haemorrhagic":  # blood products in patches of the core
            spots = _coverage(rng, shape, 3.0, float(rng.uniform(0.2, 0.5)))
            w["haem"], w["ncr"] = interior * spots, interior * (1.0 - spots)
    else:  # solid enhancing; half with a small necrotic centre, some with a non-enhancing part
        w["et"] = core_w.copy()
        if rng.random() < 0.5:
            nec = inner_part(float(rng.uniform(0.6, 0.85)) * mean_r)
            w["ncr"], w["et"] = nec, core_w - nec
        if rng.random() < 0.3:
            part = _coverage(rng, shape, max(4.0, mean_r), float(rng.uniform(0.15, 0.4)))
            moved = w["et"] * part
            w["et"], w["net"] = w["et"] - moved, moved
    return core_w, w


def draw_lesion(rng: np.random.Generator, plan: LesionPlan, wm: np.ndarray, brain: np.ndarray) -> Lesion:
    """Draw the core (NCR/ET parts) and the edema of ``plan`` in a box of the output grid.

    ``wm`` (white-matter fraction, float32) and ``brain`` (bool) are full output-grid
    arrays. The edema is the front of a reaction-diffusion process grown from the core at
    2 mm resolution (fast in white matter, :func:`_edema_score`), cut with a noisy threshold;
    the core (:func:`_core_parts`) and the labels are drawn at 1 mm.
    """
    amp = float(rng.uniform(0.10, 0.30))  # boundary roughness, fraction of the radius
    score, f_lo, f_hi = _edema_score(rng, plan, wm, brain, amp)
    box = tuple(slice(int(a), int(b)) for a, b in zip(f_lo, f_hi))
    shape = tuple(int(v) for v in f_hi - f_lo)
    brain_c = brain[box]
    core_w, w = _core_parts(rng, plan, _ellipsoid_radius(plan, f_lo, shape, 1), amp)

    # Edema: soft front from the upsampled score, outside the core. Vasogenic edema is water
    # in the white matter: most lesions' edema spares the cortex and the sulci (ribbons of grey
    # matter and CSF inside the edema's extent that are not tumour); an infiltrating one does not.
    ed_soft = np.clip(upsample_half(score, shape) * 0.5 + 0.5, 0.0, 1.0)
    cortex = float(rng.uniform(0.0, 0.35) if rng.random() < 0.7 else rng.uniform(0.5, 1.0))
    wm_c = np.clip(wm[box], 0.0, 1.0)
    w["ed"] = ed_soft * (wm_c + (1.0 - wm_c) * np.float32(cortex)) * (1.0 - core_w)  # labels: the whole front

    # Hard labels, only inside the brain: ET where enhancement dominates the core.
    tissue = np.zeros(shape, np.uint8)
    tissue[(ed_soft > 0.5) & brain_c] = Tissue.ED
    core = (core_w > 0.5) & brain_c
    tissue[core] = Tissue.NCR
    tissue[core & (w["et"] >= 0.5 * core_w)] = Tissue.ET
    texture = smooth_noise(rng, shape, spacing=float(rng.uniform(2.0, 6.0)))
    weights = {k: (v * brain_c).astype(np.float32) for k, v in w.items()}
    return Lesion(box, tissue, weights, texture)
