"""Anatomy of a synthetic case: a deformed, atrophied copy of the MNI brain, with the
structures that enhance on T1ce without being tumour.

The MNI ICBM152 2009 maps that nilearn ships inside its package (T1, grey- and
white-matter probability maps, 197 x 233 x 189, 1 mm, skull-stripped; nothing is
downloaded) give the whole brain: cerebrum, cerebellum and brainstem. Per case:

1. **Geometry** (:func:`random_geometry`, :func:`warp_anatomy`): a random affine
   (rotation up to +-12 degrees about each axis, isotropic scale 0.95 x U(0.88, 1.12) with
   +-4 % anisotropy, shift up to +-5 mm), a smooth elastic displacement (control grid of
   ~40 mm, 1-4 mm standard deviation) and the lesion's mass effect are composed into one
   sampling map, evaluated on a 4 mm grid and trilinearly interpolated inside each
   4 x 4 x 4 block. The brain is centred in-plane; its top is kept below slice 149 and the
   lower brainstem is cropped, as in BraTS.
2. **Atrophy** (:func:`atrophy`): the CSF fraction is grown into the neighbouring grey
   and white matter by 0-2.2 voxels (grey-value dilation), so sulci and ventricles vary from
   a young to an atrophic brain.
3. **Structures that are background** (:func:`structures`): white-matter hyperintensities
   (FLAIR-bright patches of deep white matter, in half of the cases), cortical vessels in the sulci
   (curves where a smooth random field crosses zero inside sulcal CSF) and a few deep
   vessels (where two fields cross zero together), the venous sinuses (superior sagittal
   along the top of the midline, transverse at the occipital base, from the template),
   the choroid plexus (patches in the ventricles' atria), and dura (patches of the
   brain's outer shell). They are drawn as soft weights; appearance makes them bright on
   T1ce (:mod:`brats_psp.data.synthetic.appearance`); their label is background.

Everything after the geometry works in the box around the brain (:class:`Anatomy.box`).
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from brats_psp.data.synthetic.grid import (
    BLOCK,
    BLOCKS_SHAPE,
    BRATS_AFFINE,
    BRATS_SHAPE,
    COARSE_SHAPE,
    Blocks,
    rotation,
    smooth_noise,
    upsample,
    world_to_vox,
)

__all__ = ["Template", "Geometry", "Anatomy", "load_template", "random_geometry", "warp_anatomy", "STRUCTURES"]

logger = logging.getLogger(__name__)

#: The non-tumour structures drawn per case (soft weights; label background).
STRUCTURES: tuple[str, ...] = ("wmh", "vessel", "sinus", "choroid", "dura")

_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

#: Where the brain centre goes in the output grid (voxel indices) and which template
#: point (MNI mm) is the brain centre. Maps the top of the brain to slice ~147 and crops
#: ~7 mm of the lower brainstem.
_OUTPUT_CENTRE_VOX = np.array([119.5, 122.0, 73.0])
_TEMPLATE_CENTRE_MM = np.array([0.0, -17.0, 8.0])
_TOP_SLICE_MAX = 148.0  # highest slice the (undeformed) brain top may reach
#: The MNI ICBM152 brain is larger than most (1.89 l mask); shrink it a little on average
#: so that brain volumes (about 1.3-2.0 l) resemble those of BraTS cases.
_MEAN_SCALE = 0.95

#: Relative frequency of glioma sites by region (frontal and temporal lobes most often;
#: insula, corpus callosum, parieto-occipital lobes, cerebellum and brainstem less).
SITE_WEIGHTS: dict[str, float] = {
    "frontal": 3.0,
    "temporal": 2.5,
    "insula": 1.5,
    "callosum": 0.8,
    "parietal_occipital": 1.5,
    "cerebellum": 0.35,
    "brainstem": 0.25,
}


@dataclass(frozen=True)
class Template:
    """The MNI template maps (float32 in [0, 1], template voxel grid) and derived data."""

    gm: np.ndarray
    wm: np.ndarray
    mask: np.ndarray  # 1.0 inside the skull-stripped brain
    mask_margin: np.ndarray  # the mask dilated by 2 voxels (to find blocks that may hold brain)
    sinus: np.ndarray  # 1.0 on the venous sinuses (superior sagittal, transverse)
    choroid: np.ndarray  # 1.0 where choroid plexus may lie (ventricular atria, third ventricle roof)
    vox_to_mm: np.ndarray  # 4 x 4
    mm_to_vox: np.ndarray  # 4 x 4
    lesion_sites: np.ndarray  # (K, 3) MNI mm of white-matter points where a glioma may grow
    lesion_depth: np.ndarray  # (K,) distance (mm) of each site to the brain surface
    site_region: np.ndarray  # (K,) index into SITE_WEIGHTS of each site's region
    surface: np.ndarray  # (P, 3) MNI mm of a subsample of brain-surface points


def _template_path(name: str) -> Path:
    """Path of a template file inside the installed nilearn package (no download)."""
    path = Path(str(importlib.resources.files("nilearn").joinpath("datasets", "data", _TEMPLATE_FILES[name])))
    if not path.is_file():
        raise FileNotFoundError(f"nilearn's packaged MNI template is missing: {path}")
    return path


def _site_regions(mm: np.ndarray) -> np.ndarray:
    """Region index (into ``SITE_WEIGHTS``) of MNI points (N, 3)."""
    x, y, z = mm.T
    ax = np.abs(x)
    names = list(SITE_WEIGHTS)
    region = np.full(len(mm), names.index("parietal_occipital"))
    region[(y > -5.0) & (z > -12.0)] = names.index("frontal")
    region[(z < 2.0) & (ax > 28.0) & (y > -60.0) & (y < 25.0)] = names.index("temporal")
    region[(ax > 26.0) & (ax < 42.0) & (y > -25.0) & (y < 22.0) & (z > -8.0) & (z < 22.0)] = names.index("insula")
    region[(ax < 14.0) & (z > 8.0) & (z < 32.0) & (y > -42.0) & (y < 32.0)] = names.index("callosum")
    infra = (z < -18.0) & (y < -38.0)
    region[infra] = names.index("cerebellum")
    region[infra & (ax < 12.0) & (y > -48.0)] = names.index("brainstem")
    region[(z < -30.0) & (ax < 12.0) & (y > -45.0)] = names.index("brainstem")
    return region


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """Load the nilearn MNI ICBM152 2009 maps once per process and derive the site and structure maps."""
    t0 = time.perf_counter()
    imgs = {name: nib.load(_template_path(name)) for name in _TEMPLATE_FILES}
    affine = imgs["t1"].affine.astype(np.float64)
    t1 = np.asarray(imgs["t1"].dataobj)
    mask = t1 > 0  # skull-stripped: the brain, ventricles included, is > 0
    gm = np.asarray(imgs["gm"].dataobj, dtype=np.float32) / np.float32(255.0)
    wm = np.asarray(imgs["wm"].dataobj, dtype=np.float32) / np.float32(255.0)
    gm *= mask
    wm *= mask
    csf = np.clip(mask - gm - wm, 0.0, 1.0)

    # Candidate lesion centres: white matter anywhere (cerebrum, cerebellum, brainstem), 2 mm grid.
    m2 = mask[::2, ::2, ::2]
    depth2 = ndi.distance_transform_edt(m2, sampling=2.0)
    ijk = np.argwhere((wm[::2, ::2, ::2] > 0.55) & (depth2 >= 4.0)) * 2
    mm = ijk @ affine[:3, :3].T + affine[:3, 3]
    site_depth = depth2[tuple((ijk // 2).T)]

    # Voxel world coordinates of the template (for the structure maps).
    grid = np.indices(mask.shape, dtype=np.float32).reshape(3, -1)
    world = (affine[:3, :3].astype(np.float32) @ grid + affine[:3, 3:4].astype(np.float32)).reshape(3, *mask.shape)
    x, y, z = world
    depth = ndi.distance_transform_edt(mask)
    shell = mask & (depth <= 3.5)
    # Superior sagittal sinus: the top of the midline shell (within 12 mm of the vertex line).
    mid = shell & (np.abs(x) < 5.0) & (z > -5.0)
    top = np.where(mask & (np.abs(x) < 5.0), z, -np.inf).max(axis=(0, 2))  # vertex height per y
    sinus = mid & (z > top[None, :, None] - 12.0) & (y > -100.0)
    # Transverse sinuses: the occipital base, lateral.
    sinus |= shell & (y < -70.0) & (z > -28.0) & (z < 2.0) & (np.abs(x) > 8.0)
    # Choroid plexus: deep CSF (ventricles) in the atria and the third ventricle's roof.
    ventricles = mask & (csf > 0.6) & (depth > 12.0) & (np.abs(x) < 35.0) & (z > -12.0) & (z < 35.0)
    choroid = ventricles & (((y < -22.0) & (y > -50.0)) | ((np.abs(x) < 4.0) & (y > -25.0) & (y < 0.0)))

    surf = np.argwhere(m2 & ~ndi.binary_erosion(m2)) * 2
    surf = surf[:: max(1, len(surf) // 4000)]
    surf_mm = surf @ affine[:3, :3].T + affine[:3, 3]

    logger.debug("loaded MNI template %s in %.2f s", t1.shape, time.perf_counter() - t0)
    return Template(
        gm=np.ascontiguousarray(gm),
        wm=np.ascontiguousarray(wm),
        mask=mask.astype(np.float32),
        mask_margin=ndi.maximum_filter(mask.view(np.uint8), size=5).astype(np.float32),
        sinus=sinus.astype(np.float32),
        choroid=choroid.astype(np.float32),
        vox_to_mm=affine,
        mm_to_vox=np.linalg.inv(affine),
        lesion_sites=mm.astype(np.float64),
        lesion_depth=site_depth.astype(np.float64),
        site_region=_site_regions(mm),
        surface=surf_mm.astype(np.float64),
    )


# --------------------------------------------------------------------------- geometry


def _output_world_coarse() -> np.ndarray:
    """World (mm) coordinates of the coarse grid points, shape (3, *COARSE_SHAPE)."""
    grids = np.meshgrid(*(np.arange(n) * float(BLOCK) for n in COARSE_SHAPE), indexing="ij")
    vox = np.stack(grids).reshape(3, -1)
    world = BRATS_AFFINE[:3, :3] @ vox + BRATS_AFFINE[:3, 3:4]
    return world.reshape(3, *COARSE_SHAPE)


@dataclass
class Geometry:
    rot_scale: np.ndarray  # 3x3: output mm offsets -> template mm offsets
    out_centre: np.ndarray  # world mm in the output that the template centre maps to
    elastic: np.ndarray  # (3, *COARSE_SHAPE) template-mm displacement

    def forward(self, template_mm: np.ndarray) -> np.ndarray:
        """Template mm (N, 3) -> output world mm (N, 3), affine part only."""
        inv = np.linalg.inv(self.rot_scale)
        return (template_mm - _TEMPLATE_CENTRE_MM) @ inv.T + self.out_centre


def random_geometry(rng: np.random.Generator, tpl: Template) -> Geometry:
    """A random affine and elastic deformation that keeps the brain inside the BraTS grid."""
    angles = np.deg2rad(rng.uniform(-12.0, 12.0, size=3))
    scale = _MEAN_SCALE * rng.uniform(0.88, 1.12) * rng.uniform(0.96, 1.04, size=3)
    shift = rng.uniform(-5.0, 5.0, size=3)
    # rot_scale maps output offsets to template offsets: the brain appears scaled by ``scale``.
    rot_scale = rotation(angles) @ np.diag(1.0 / scale)
    out_centre = BRATS_AFFINE[:3, :3] @ _OUTPUT_CENTRE_VOX + BRATS_AFFINE[:3, 3] + shift
    geo = Geometry(rot_scale, out_centre, np.zeros((3, *COARSE_SHAPE)))

    # Keep the brain inside the grid: the top below _TOP_SLICE_MAX, 4 voxels in-plane margin.
    surf_vox = world_to_vox(geo.forward(tpl.surface))
    top = surf_vox[:, 2].max()
    if top > _TOP_SLICE_MAX:
        geo.out_centre[2] -= top - _TOP_SLICE_MAX  # BRATS z axis is not flipped
    for ax in (0, 1):
        lo, hi = surf_vox[:, ax].min(), surf_vox[:, ax].max()
        move = max(0.0, 4.0 - lo) - max(0.0, hi - (BRATS_SHAPE[ax] - 5.0))
        geo.out_centre[ax] += move * BRATS_AFFINE[ax, ax]

    # Smooth elastic displacement: random control grid, cubic upsampling.
    amp = rng.uniform(1.0, 4.0)  # mm, standard deviation at the control points
    ctrl = rng.standard_normal((3, 7, 7, 5)) * amp
    geo.elastic = np.stack([upsample(c, COARSE_SHAPE) for c in ctrl]).astype(np.float64)
    return geo


def _sampling_map(geo: Geometry, tpl: Template, pushes: list[tuple[np.ndarray, float, float]]) -> np.ndarray:
    """Template voxel coordinates sampled by each coarse output grid point, (3, *COARSE_SHAPE).

    Composes the lesions' mass effect (for each ``(centre_vox, strength, radius_mm)`` a
    radial push around the centre), the random affine and the elastic field.
    """
    world = _output_world_coarse().reshape(3, -1)
    for centre_vox, push, push_radius in pushes:
        centre_mm = BRATS_AFFINE[:3, :3] @ centre_vox + BRATS_AFFINE[:3, 3]
        rel = world - centre_mm[:, None]
        r2 = (rel**2).sum(axis=0)
        world = world - push * rel * np.exp(-r2 / push_radius**2)
    tmm = geo.rot_scale @ (world - geo.out_centre[:, None]) + _TEMPLATE_CENTRE_MM[:, None]
    tmm = tmm + geo.elastic.reshape(3, -1)
    tvox = tpl.mm_to_vox[:3, :3] @ tmm + tpl.mm_to_vox[:3, 3:4]
    return tvox.reshape(3, *COARSE_SHAPE)


# --------------------------------------------------------------------------- anatomy


@dataclass
class Anatomy:
    """A case's brain in the box ``box`` of the output grid (every array has the box's shape).

    ``csf + gm + wm == 1`` inside ``brain``, 0 outside; ``structures`` holds the soft
    weights (0-1) of :data:`STRUCTURES`.
    """

    box: tuple[slice, slice, slice]
    brain: np.ndarray  # bool
    csf: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    structures: dict[str, np.ndarray] = field(default_factory=dict)

    def full(self, array: np.ndarray, dtype: type | np.dtype | None = None) -> np.ndarray:
        """``array`` (box-shaped) placed in a zero array of the whole grid."""
        out = np.zeros(BRATS_SHAPE, dtype or array.dtype)
        out[self.box] = array
        return out


def warp_anatomy(
    rng: np.random.Generator, tpl: Template, geo: Geometry, pushes: list[tuple[np.ndarray, float, float]]
) -> Anatomy:
    """Resample the template through ``geo`` (plus mass effect), then atrophy and draw the structures."""
    coarse = _sampling_map(geo, tpl, pushes)
    # Blocks with a corner within ~2 mm of the brain.
    near = ndi.map_coordinates(tpl.mask_margin, coarse.reshape(3, -1), order=1, cval=0.0).reshape(COARSE_SHAPE) > 0
    nb = BLOCKS_SHAPE
    corner_any = np.zeros(nb, bool)
    for di in (0, 1):
        for dj in (0, 1):
            for dk in (0, 1):
                corner_any |= near[di : di + nb[0], dj : dj + nb[1], dk : dk + nb[2]]
    blocks = Blocks(corner_any)
    coords = np.stack([blocks.upsample(c) for c in coarse])  # (3, N) template voxel coordinates
    mask = ndi.map_coordinates(tpl.mask, coords, order=1, cval=0.0, output=np.float32)
    in_brain = mask > 0.5
    blocks.keep(in_brain)
    coords = coords[:, in_brain]
    mask = mask[in_brain]
    maps = {
        name: ndi.map_coordinates(getattr(tpl, name), coords, order=1, cval=0.0, output=np.float32)
        for name in ("gm", "wm", "sinus", "choroid")
    }
    del coords
    total = np.maximum(np.maximum(mask, maps["gm"] + maps["wm"]), np.float32(1e-3))

    # The box around the brain, and the maps in it.
    ijk = np.unravel_index(blocks.index, BRATS_SHAPE)
    lo = [max(int(a.min()) - 3, 0) for a in ijk]  # 3 voxels of margin: room for a skull-strip rim
    hi = [min(int(a.max()) + 4, n) for a, n in zip(ijk, BRATS_SHAPE)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    shape = tuple(b - a for a, b in zip(lo, hi))
    local = np.ravel_multi_index(tuple(a - o for a, o in zip(ijk, lo)), shape)

    def in_box(values: np.ndarray) -> np.ndarray:
        out = np.zeros(shape, np.float32)
        out.reshape(-1)[local] = values
        return out

    brain = np.zeros(shape, bool)
    brain.reshape(-1)[local] = True
    gm = in_box(maps["gm"] / total)
    wm = in_box(maps["wm"] / total)
    csf = np.where(brain, np.clip(1.0 - gm - wm, 0.0, 1.0), np.float32(0.0)).astype(np.float32)
    anatomy = Anatomy(box, brain, csf, gm, wm)
    atrophy(rng, anatomy)
    anatomy.structures = structures(rng, anatomy, in_box(maps["sinus"]), in_box(maps["choroid"]))
    return anatomy


def atrophy(rng: np.random.Generator, anatomy: Anatomy, level: float | None = None) -> float:
    """Grow the CSF (sulci, ventricles) into the tissue around it, in place; return the level used.

    ``level`` (0 none, 1 one voxel, 2 two voxels of grey-value dilation; fractional values
    interpolate) is drawn per case when not given: 20 % none, 50 % 0.3-1.2, 30 % 1.2-2.2 voxels
    (the template is an average brain: its sulci are thinner than most patients').
    """
    if level is None:
        level = float(rng.choice([0.0, rng.uniform(0.3, 1.2), rng.uniform(1.2, 2.2)], p=[0.2, 0.5, 0.3]))
    if level <= 0.0:
        return 0.0
    csf = anatomy.csf
    grown = csf
    for step in range(int(np.ceil(level))):
        dil = ndi.grey_dilation(grown, size=(3, 3, 3))
        frac = min(1.0, level - step)
        grown = grown + np.float32(frac) * (dil - grown)
    # Only where there is already some CSF nearby; keep the brain mask as is.
    new = np.where(anatomy.brain, np.maximum(csf, grown * np.float32(0.9)), np.float32(0.0)).astype(np.float32)
    tissue = anatomy.gm + anatomy.wm
    keep = np.where(tissue > 1e-6, (1.0 - new) / np.maximum(tissue, 1e-6), 0.0).astype(np.float32)
    anatomy.gm *= keep
    anatomy.wm *= keep
    anatomy.csf = new
    return level


def _patches(rng: np.random.Generator, shape: tuple[int, ...], spacing: float, coverage: float) -> np.ndarray:
    """A random bool map that covers about ``coverage`` of the grid in blobs of ~``spacing`` voxels."""
    field_ = smooth_noise(rng, shape, spacing)
    thr = np.quantile(field_[::4, ::4, ::4], 1.0 - coverage)
    return field_ > thr


def structures(
    rng: np.random.Generator, anatomy: Anatomy, sinus: np.ndarray, choroid: np.ndarray
) -> dict[str, np.ndarray]:
    """Soft weights of the non-tumour structures (vessels, sinuses, choroid plexus, dura) in the box."""
    brain, csf = anatomy.brain, anatomy.csf
    shape = brain.shape
    out: dict[str, np.ndarray] = {}

    # Cortical vessels: a ~1-2 voxel band where a smooth field crosses zero, inside sulcal CSF.
    spacing = float(rng.uniform(6.0, 12.0))
    f = smooth_noise(rng, shape, spacing)
    band = np.float32(rng.uniform(0.6, 1.4) / spacing)
    vessel = np.clip(1.0 - np.abs(f) / band, 0.0, 1.0) * np.clip((csf - 0.25) * 3.0, 0.0, 1.0)
    vessel *= _patches(rng, shape, 20.0, float(rng.uniform(0.3, 0.9)))
    # A few deep vessels: curves where two fields cross zero together (thin tubes anywhere).
    g = smooth_noise(rng, shape, 14.0)
    h = smooth_noise(rng, shape, 14.0)
    tube = np.float32(rng.uniform(0.04, 0.09))
    deep = np.clip(1.0 - np.maximum(np.abs(g), np.abs(h)) / tube, 0.0, 1.0)
    deep *= _patches(rng, shape, 25.0, float(rng.uniform(0.1, 0.5)))
    out["vessel"] = (np.maximum(vessel, deep) * brain).astype(np.float32)

    # Venous sinuses (from the template), sometimes only partly visible.
    out["sinus"] = (np.clip(sinus, 0.0, 1.0) * _patches(rng, shape, 30.0, float(rng.uniform(0.5, 1.0)))).astype(
        np.float32
    )
    # Choroid plexus: patches of the candidate region in the ventricles.
    out["choroid"] = (np.clip(choroid * 1.5, 0.0, 1.0) * _patches(rng, shape, 6.0, float(rng.uniform(0.3, 0.8)))).astype(
        np.float32
    ) * brain
    # White-matter hyperintensities (small-vessel disease), half of the cases: FLAIR/T2-bright
    # patches of deep white matter that are not tumour.
    if rng.random() < 0.5:
        spots = _patches(rng, shape, float(rng.uniform(3.0, 6.0)), float(rng.uniform(0.01, 0.06)))
        out["wmh"] = (spots * np.clip((anatomy.wm - 0.6) * 2.5, 0.0, 1.0)).astype(np.float32)
    else:
        out["wmh"] = np.zeros(shape, np.float32)
    # Dura: patches of the brain's outer shell, 1-2 voxels thick.
    thick = int(rng.integers(1, 3))
    shell = brain & ~ndi.binary_erosion(brain, iterations=thick)
    out["dura"] = (shell & _patches(rng, shape, 15.0, float(rng.uniform(0.05, 0.5)))).astype(np.float32)
    return out
