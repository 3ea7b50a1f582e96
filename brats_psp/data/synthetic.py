"""Synthetic BraTS-like cases built on a real brain: the project's built-in dataset.

Every case is a deformed copy of the MNI ICBM152 2009 template that nilearn ships
inside its package (T1, grey- and white-matter probability maps, 197 x 233 x 189,
1 mm, skull-stripped; nothing is downloaded), placed on the BraTS grid
(240 x 240 x 155 voxels, 1 mm, affine ``diag(-1, -1, 1)`` with translation
``(0, 239, 0)``), with a glioma-like lesion drawn into it and four contrasts
(T1, T1ce, T2, FLAIR) synthesised from the tissue maps.

How a case is made (all randomness from ``np.random.default_rng([seed, index])``,
so case ``i`` of seed ``S`` is the same whatever the number of cases generated):

1. **Anatomy.** A random affine (rotation up to +-10 degrees about each axis,
   isotropic scale +-8 % around 0.95 with +-3 % anisotropy, shift up to +-4 mm), a
   smooth elastic displacement (random control grid of ~40 mm spacing, cubic-spline
   upsampled, 1-2.5 mm standard deviation) and the lesion's mass effect (a radial
   push around its centre) are composed into one sampling map, evaluated on a 4 mm
   grid and trilinearly interpolated inside each 4 x 4 x 4 block (exact for the
   affine part). Each template map is then resampled once with
   :func:`scipy.ndimage.map_coordinates` (order 1), only in blocks that can hold
   brain. The brain is centred in-plane; its top is kept below slice 149 and the
   lower brainstem is cropped (the MNI brain is taller than 155 mm).
2. **Lesion.** A centre is drawn among deep supratentorial white-matter voxels of
   the template. The tumour core is an irregular ellipsoid (mean radius 3-24 mm)
   whose boundary is perturbed by a smooth random field; its type follows the case
   index (``_KIND_CYCLE``: in any 8 consecutive cases 4 are glioblastoma-like with
   a necrotic core in a 2-5 mm enhancing rim, 2 are solid enhancing and 2 are
   low-grade-like, a non-enhancing core with no enhancing tumour). Edema is the
   front of a Fisher-Kolmogorov (proliferation-invasion) process grown from the
   core, with a diffusivity ~25x higher in white matter than in grey matter and
   CSF, so it spreads along white matter and spares the cortex, cut with a noisy
   threshold (irregular front). Labels exist only inside the brain mask.
3. **Contrasts.** Each voxel's signal is the partial-volume mix of CSF/GM/WM
   intensities (T1: WM > GM > CSF; T2: CSF > GM > WM; FLAIR: CSF suppressed,
   GM > WM; T1ce like T1), replaced by lesion intensities (enhancing rim bright on
   T1ce; edema bright on T2 and FLAIR, dark on T1; necrosis dark on T1/T1ce,
   bright on T2), modulated by lesion heterogeneity and a smooth multiplicative
   bias field per contrast, scaled by a per-scan factor, with Rician noise
   (magnitude of complex Gaussian) and rounded to int16. Outside the brain every
   contrast is exactly 0; inside it every contrast is >= 1, so the four share the
   same non-zero mask (as in real BraTS).

Generating one case takes about 1.2 s of CPU on one core (plus ~1 s once per
process to load the template); writing it (gzip) about 1.5 s more.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from brats_psp.data.layouts import LAYOUTS, MODALITIES, get_layout
from brats_psp.io import save_nifti, write_json
from brats_psp.labels import Tissue, tissue_to_release

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
]

logger = logging.getLogger(__name__)

#: Voxel grid of every BraTS release (x, y, z), 1 mm isotropic.
#: Bumped whenever generated cases change for a given seed (the built-in cache is keyed on it).
GENERATOR_VERSION = 2

BRATS_SHAPE: tuple[int, int, int] = (240, 240, 155)

#: Voxel -> world (mm) affine of BraTS volumes: x and y flipped (LPS voxel axes).
BRATS_AFFINE: np.ndarray = np.array(
    [
        [-1.0, 0.0, 0.0, 0.0],
        [0.0, -1.0, 0.0, 239.0],
        [0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ],
    dtype=np.float64,
)

#: Lesion type by ``index % 8``: "gbm" necrotic core + enhancing rim, "solid"
#: enhancing (small or no necrosis), "lgg" non-enhancing core (no ET) + edema.
_KIND_CYCLE: tuple[str, ...] = ("gbm", "lgg", "gbm", "solid", "gbm", "solid", "lgg", "gbm")

#: Relative intensities (WM on T1 ~ 0.85) per contrast and tissue, before scaling.
_INTENSITY: dict[str, dict[str, float]] = {
    # ncr: necrosis (high-grade); net: non-enhancing tumour core (low-grade-like cases), drawn
    # with the T2-FLAIR mismatch sign of IDH-mutant astrocytomas (Patel et al., Clin Cancer Res
    # 2017): homogeneously bright on T2, relatively dark on FLAIR, darker than edema on T1
    "t1": {"csf": 0.30, "gm": 0.62, "wm": 0.85, "ncr": 0.26, "net": 0.42, "et": 0.60, "ed": 0.52},
    "t1ce": {"csf": 0.32, "gm": 0.64, "wm": 0.84, "ncr": 0.28, "net": 0.45, "et": 1.45, "ed": 0.56},
    "t2": {"csf": 1.60, "gm": 0.86, "wm": 0.62, "ncr": 1.40, "net": 1.55, "et": 0.95, "ed": 1.22},
    "flair": {"csf": 0.16, "gm": 0.80, "wm": 0.60, "ncr": 0.70, "net": 0.88, "et": 0.95, "ed": 1.25},
}

#: Typical scanner value of an intensity of 1.0, per contrast (multiplied per scan
#: by a log-uniform factor in [0.55, 1.8]).
_BASE_SCALE: dict[str, float] = {"t1": 1100.0, "t1ce": 1500.0, "t2": 650.0, "flair": 900.0}

_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

_BLOCK = 4  # side (voxels) of the blocks inside which the sampling map is interpolated
_COARSE_SHAPE = tuple(s // _BLOCK + 1 + (s % _BLOCK > 0) for s in BRATS_SHAPE)  # grid points (61, 61, 40)
_BLOCKS_SHAPE = tuple(s - 1 for s in _COARSE_SHAPE)  # (60, 60, 39)

#: Where the brain centre goes in the output grid (voxel indices) and which
#: template point (MNI mm) is the brain centre. Maps the top of the brain to
#: slice ~147 and crops ~7 mm of the lower brainstem.
_OUTPUT_CENTRE_VOX = np.array([119.5, 122.0, 73.0])
_TEMPLATE_CENTRE_MM = np.array([0.0, -17.0, 8.0])
_TOP_SLICE_MAX = 148.0  # highest slice the (undeformed) brain top may reach
#: The MNI ICBM152 brain is larger than most (1.89 l mask); shrink it a little on average
#: so that brain volumes (about 1.3-2.0 l) resemble those of BraTS cases.
_MEAN_SCALE = 0.95


# --------------------------------------------------------------------------- data types


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
    """

    case_id: str
    images: dict[str, np.ndarray]
    tissue: np.ndarray
    affine: np.ndarray


@dataclass(frozen=True)
class _Template:
    """The MNI template maps (float32 in [0, 1], template voxel grid) and derived data."""

    gm: np.ndarray
    wm: np.ndarray
    mask: np.ndarray  # 1.0 inside the skull-stripped brain
    mask_margin: np.ndarray  # the mask dilated by 2 voxels (to find blocks that may hold brain)
    vox_to_mm: np.ndarray  # 4 x 4
    mm_to_vox: np.ndarray  # 4 x 4
    lesion_sites: np.ndarray  # (K, 3) MNI mm of deep supratentorial white matter
    lesion_depth: np.ndarray  # (K,) distance (mm) of each site to the brain surface
    surface: np.ndarray  # (P, 3) MNI mm of a subsample of brain-surface points


# --------------------------------------------------------------------------- template


def _template_path(name: str) -> Path:
    """Path of a template file inside the installed nilearn package (no download)."""
    path = Path(str(importlib.resources.files("nilearn").joinpath("datasets", "data", _TEMPLATE_FILES[name])))
    if not path.is_file():
        raise FileNotFoundError(f"nilearn's packaged MNI template is missing: {path}")
    return path


@functools.lru_cache(maxsize=1)
def _load_template() -> _Template:
    """Load the nilearn MNI ICBM152 2009 maps once per process."""
    t0 = time.perf_counter()
    imgs = {name: nib.load(_template_path(name)) for name in _TEMPLATE_FILES}
    affine = imgs["t1"].affine.astype(np.float64)
    t1 = np.asarray(imgs["t1"].dataobj)
    mask = t1 > 0  # skull-stripped: the brain, ventricles included, is > 0
    gm = np.asarray(imgs["gm"].dataobj, dtype=np.float32) / np.float32(255.0)
    wm = np.asarray(imgs["wm"].dataobj, dtype=np.float32) / np.float32(255.0)
    gm *= mask
    wm *= mask

    # Candidate lesion centres: deep supratentorial white matter, on a 2 mm grid.
    m2 = mask[::2, ::2, ::2]
    depth = ndi.distance_transform_edt(m2, sampling=2.0)
    ijk = np.argwhere((wm[::2, ::2, ::2] > 0.7) & (depth >= 10.0)) * 2
    mm = ijk @ affine[:3, :3].T + affine[:3, 3]
    x, y, z = mm.T
    supratentorial = (z > 0.0) | ((y > -35.0) & (np.abs(x) > 22.0) & (z > -32.0))
    sites = mm[supratentorial]
    site_depth = depth[tuple((ijk[supratentorial] // 2).T)]

    # Brain-surface points (to keep the top of the brain inside the 155 slices).
    surf = np.argwhere(m2 & ~ndi.binary_erosion(m2)) * 2
    surf = surf[:: max(1, len(surf) // 4000)]
    surf_mm = surf @ affine[:3, :3].T + affine[:3, 3]

    logger.debug("loaded MNI template %s in %.2f s", t1.shape, time.perf_counter() - t0)
    return _Template(
        gm=np.ascontiguousarray(gm),
        wm=np.ascontiguousarray(wm),
        mask=mask.astype(np.float32),
        mask_margin=ndi.maximum_filter(mask.view(np.uint8), size=5).astype(np.float32),
        vox_to_mm=affine,
        mm_to_vox=np.linalg.inv(affine),
        lesion_sites=sites.astype(np.float64),
        lesion_depth=site_depth.astype(np.float64),
        surface=surf_mm.astype(np.float64),
    )


# --------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=64)
def _upsample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) cubic-spline interpolation matrix, end points aligned."""
    eye = np.eye(n_in)
    cols = [ndi.zoom(eye[i], n_out / n_in, order=3, mode="nearest") for i in range(n_in)]
    mat = np.stack(cols, axis=1)
    if mat.shape[0] != n_out:  # zoom rounds the output length
        mat = np.stack([np.interp(np.linspace(0, 1, n_out), np.linspace(0, 1, len(c)), c) for c in cols], axis=1)
    return mat.astype(np.float64)


def _upsample(low: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Separable cubic-spline upsampling of a small 3D array to ``shape`` (float32).

    Three matrix products, the last a single GEMM over the largest array.
    """
    low = np.asarray(low, dtype=np.float32)
    m0, m1, m2 = (_upsample_matrix(n, m).astype(np.float32) for n, m in zip(low.shape, shape))
    out = low @ m2.T  # (n0, n1, N2)
    out = m1 @ out  # (n0, N1, N2)
    return (m0 @ out.reshape(low.shape[0], -1)).reshape(shape)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], spacing: float) -> np.ndarray:
    """Smooth random field of ``shape`` (float32), correlation length ~``spacing`` voxels.

    Unit-variance Gaussian values on a grid of that spacing, cubic-spline interpolated
    (so the standard deviation is slightly below 1 between grid points).
    """
    low_shape = tuple(max(2, int(np.ceil(s / spacing)) + 1) for s in shape)
    return _upsample(rng.standard_normal(low_shape), shape)


def _rotation(angles: Iterable[float]) -> np.ndarray:
    """3 x 3 rotation matrix from angles (radians) about x, y, z."""
    ax, ay, az = angles
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


@functools.lru_cache(maxsize=1)
def _block_weights() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Trilinear weights of the 8 block corners for the 64 voxels of a block.

    Returns ``(corners (8, 3) int, offsets (64, 3) int, weights (8, 64) float32)``.
    """
    corners = np.array([(i, j, k) for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    offsets = np.array([(i, j, k) for i in range(_BLOCK) for j in range(_BLOCK) for k in range(_BLOCK)])
    t = offsets / _BLOCK  # (64, 3)
    w = np.where(corners[:, None, :] == 1, t[None], 1.0 - t[None]).prod(axis=-1)
    return corners, offsets, w.astype(np.float32)


class _Blocks:
    """The 4 x 4 x 4 blocks of the output grid that may hold brain, and their voxels.

    Fields on the coarse grid (``_COARSE_SHAPE``, one point every 4 voxels) are
    interpolated trilinearly to the kept voxels by :meth:`upsample`; ``index`` is the
    flat output-grid index of each kept voxel. :meth:`keep` narrows the kept voxels
    (to the brain, say).
    """

    def __init__(self, keep: np.ndarray) -> None:
        corners, offsets, weights = _block_weights()
        a, b, c = (v.astype(np.intp) for v in np.nonzero(keep))
        self._corner_index = np.ravel_multi_index(
            (a[:, None] + corners[None, :, 0], b[:, None] + corners[None, :, 1], c[:, None] + corners[None, :, 2]),
            _COARSE_SHAPE,
        )  # (B, 8)
        self._weights = weights
        strides = np.array([BRATS_SHAPE[1] * BRATS_SHAPE[2], BRATS_SHAPE[2], 1])
        base = (a * strides[0] + b * strides[1] + c * strides[2]) * _BLOCK  # first voxel of each block
        index = base[:, None] + (offsets @ strides)[None, :]  # (B, 64)
        # The last layer of blocks overhangs the grid (155 = 38 * 4 + 3 slices).
        outside = (c[:, None] * _BLOCK + offsets[None, :, 2]) >= BRATS_SHAPE[2]
        self._pos = np.flatnonzero(~outside.reshape(-1))  # positions in the (B, 64) layout
        self.index = index.reshape(-1)[self._pos]

    def __len__(self) -> int:
        return len(self.index)

    def keep(self, mask: np.ndarray) -> None:
        """Keep only the voxels where ``mask`` (bool, one per kept voxel) is true."""
        self._pos = self._pos[mask]
        self.index = self.index[mask]

    def upsample(self, coarse: np.ndarray) -> np.ndarray:
        """Coarse field (``_COARSE_SHAPE``) -> float32 values at the kept voxels."""
        vals = coarse.reshape(-1).astype(np.float32)[self._corner_index] @ self._weights  # (B, 64)
        return np.take(vals.reshape(-1), self._pos)


# --------------------------------------------------------------------------- geometry


def _output_world_coarse() -> np.ndarray:
    """World (mm) coordinates of the coarse grid points, shape (3, *_COARSE_SHAPE)."""
    grids = np.meshgrid(*(np.arange(n) * float(_BLOCK) for n in _COARSE_SHAPE), indexing="ij")
    vox = np.stack(grids).reshape(3, -1)
    world = BRATS_AFFINE[:3, :3] @ vox + BRATS_AFFINE[:3, 3:4]
    return world.reshape(3, *_COARSE_SHAPE)


@dataclass
class _Geometry:
    rot_scale: np.ndarray  # 3x3: output mm offsets -> template mm offsets
    out_centre: np.ndarray  # world mm in the output that the template centre maps to
    elastic: np.ndarray  # (3, *_COARSE_SHAPE) template-mm displacement

    def forward(self, template_mm: np.ndarray) -> np.ndarray:
        """Template mm (N, 3) -> output world mm (N, 3), affine part only."""
        inv = np.linalg.inv(self.rot_scale)
        return (template_mm - _TEMPLATE_CENTRE_MM) @ inv.T + self.out_centre


def _random_geometry(rng: np.random.Generator, tpl: _Template) -> _Geometry:
    angles = np.deg2rad(rng.uniform(-10.0, 10.0, size=3))
    scale = _MEAN_SCALE * rng.uniform(0.92, 1.08) * rng.uniform(0.97, 1.03, size=3)
    shift = rng.uniform(-4.0, 4.0, size=3)
    # rot_scale maps output offsets to template offsets: the brain appears scaled by ``scale``.
    rot_scale = _rotation(angles) @ np.diag(1.0 / scale)
    out_centre = BRATS_AFFINE[:3, :3] @ _OUTPUT_CENTRE_VOX + BRATS_AFFINE[:3, 3] + shift
    geo = _Geometry(rot_scale, out_centre, np.zeros((3, *_COARSE_SHAPE)))

    # Keep the brain inside the grid: the top below _TOP_SLICE_MAX, 4 voxels in-plane margin.
    surf_vox = _world_to_vox(geo.forward(tpl.surface))
    top = surf_vox[:, 2].max()
    if top > _TOP_SLICE_MAX:
        geo.out_centre[2] -= top - _TOP_SLICE_MAX  # BRATS z axis is not flipped
    for ax in (0, 1):
        lo, hi = surf_vox[:, ax].min(), surf_vox[:, ax].max()
        move = max(0.0, 4.0 - lo) - max(0.0, hi - (BRATS_SHAPE[ax] - 5.0))
        geo.out_centre[ax] += move * BRATS_AFFINE[ax, ax]

    # Smooth elastic displacement: random control grid, cubic upsampling.
    amp = rng.uniform(1.0, 2.5)  # mm, standard deviation at the control points
    ctrl = rng.standard_normal((3, 7, 7, 5)) * amp
    geo.elastic = np.stack([_upsample(c, _COARSE_SHAPE) for c in ctrl]).astype(np.float64)
    return geo


def _world_to_vox(world: np.ndarray) -> np.ndarray:
    """Output world mm (N, 3) -> output voxel coordinates (N, 3)."""
    inv = np.linalg.inv(BRATS_AFFINE)
    return world @ inv[:3, :3].T + inv[:3, 3]


def _sampling_map(geo: _Geometry, tpl: _Template, lesion_vox: np.ndarray, push: float, push_radius: float) -> np.ndarray:
    """Template voxel coordinates sampled by each coarse output grid point, (3, *_COARSE_SHAPE).

    Composes the lesion's mass effect (radial push of strength ``push`` and radius
    ``push_radius`` mm around ``lesion_vox``), the random affine and the elastic field.
    """
    world = _output_world_coarse().reshape(3, -1)
    centre_mm = BRATS_AFFINE[:3, :3] @ lesion_vox + BRATS_AFFINE[:3, 3]
    rel = world - centre_mm[:, None]
    r2 = (rel**2).sum(axis=0)
    world = world - push * rel * np.exp(-r2 / push_radius**2)
    tmm = geo.rot_scale @ (world - geo.out_centre[:, None]) + _TEMPLATE_CENTRE_MM[:, None]
    tmm = tmm + geo.elastic.reshape(3, -1)
    tvox = tpl.mm_to_vox[:3, :3] @ tmm + tpl.mm_to_vox[:3, 3:4]
    return tvox.reshape(3, *_COARSE_SHAPE)


# --------------------------------------------------------------------------- lesion


@dataclass
class _Lesion:
    """A lesion drawn in a box of the output grid (all arrays have the box's shape)."""

    box: tuple[slice, slice, slice]
    tissue: np.ndarray  # uint8 tissue codes
    ncr_w: np.ndarray  # float32 soft (partial-volume) weights of each class
    et_w: np.ndarray
    ed_w: np.ndarray
    texture: np.ndarray  # float32 smooth zero-mean field: lesion heterogeneity


@dataclass
class _LesionPlan:
    kind: str  # "gbm", "solid" or "lgg" (see _KIND_CYCLE)
    centre_vox: np.ndarray  # (3,) output voxel coordinates
    radii: np.ndarray  # (3,) core semi-axes, mm
    orientation: np.ndarray  # 3 x 3 rotation of the core ellipsoid
    edema_reach: float  # mm, typical extent of edema beyond the core
    push: float  # mass-effect strength (0: none)


def _plan_lesion(rng: np.random.Generator, index: int, geo: _Geometry, tpl: _Template) -> _LesionPlan:
    """Draw the lesion's type, size, orientation and site (deep white matter of the template)."""
    kind = _KIND_CYCLE[index % len(_KIND_CYCLE)]
    low, high = {"solid": (3.0, 14.0), "lgg": (5.0, 24.0), "gbm": (7.0, 24.0)}[kind]
    radius = float(np.exp(rng.uniform(np.log(low), np.log(high))))
    radii = radius * rng.uniform(0.75, 1.25, size=3)
    orientation = _rotation(rng.uniform(-np.pi, np.pi, size=3))
    # A site deep enough for the lesion's size (most of the core inside the brain).
    ok = tpl.lesion_depth >= min(0.6 * radius + 4.0, 20.0)
    sites = tpl.lesion_sites[ok] if ok.any() else tpl.lesion_sites
    site = sites[rng.integers(len(sites))] + rng.uniform(-1.0, 1.0, size=3)
    centre_vox = _world_to_vox(geo.forward(site[None]))[0]
    centre_vox = np.clip(centre_vox, 10, np.array(BRATS_SHAPE) - 11)
    reach_max = {"gbm": 30.0, "solid": 24.0, "lgg": 16.0}[kind]
    edema_reach = float(rng.uniform(2.0, reach_max)) * (0.6 + 0.4 * min(radius / 12.0, 1.5))
    push = float(rng.uniform(0.15, 0.4)) * min(radius / 15.0, 1.0)
    return _LesionPlan(kind, centre_vox, radii, orientation, edema_reach, push)


def _ellipsoid_radius(plan: _LesionPlan, lo: np.ndarray, shape: tuple[int, int, int], step: int) -> np.ndarray:
    """Normalised ellipsoidal radius (1 on the core's mean surface) on the grid
    ``lo + step * (i, j, k)`` of ``shape`` (output voxel coordinates), float32."""
    rel = [
        (lo[k] + step * np.arange(shape[k], dtype=np.float32)) - np.float32(plan.centre_vox[k]) for k in range(3)
    ]
    rot = (plan.orientation.T / plan.radii[:, None]).astype(np.float32)
    d2 = np.zeros(shape, np.float32)
    for row in rot:
        comp = row[0] * rel[0][:, None, None] + row[1] * rel[1][None, :, None] + row[2] * rel[2][None, None, :]
        d2 += comp * comp
    return np.sqrt(d2)


def _draw_lesion(rng: np.random.Generator, plan: _LesionPlan, wm: np.ndarray, brain: np.ndarray) -> _Lesion:
    """Draw the core (NCR/ET) and the edema of ``plan`` in a box of the output grid.

    ``wm`` (white-matter fraction, float32) and ``brain`` (bool) are full output-grid
    arrays. The edema is the front of a reaction-diffusion process grown from the
    core at 2 mm resolution (fast in white matter), cut with a noisy threshold; the
    core and the labels are drawn at 1 mm.
    """
    rmax = float(plan.radii.max())
    amp = float(rng.uniform(0.10, 0.25))  # boundary roughness, fraction of the radius
    half = int(np.ceil(rmax * (1.0 + 2.0 * amp) + 1.6 * plan.edema_reach + 8.0))
    centre = np.floor(plan.centre_vox).astype(int)
    lo = np.maximum(centre - half, 0)
    hi = np.minimum(centre + half + 1, BRATS_SHAPE)

    # Edema at half resolution over the whole box: the front of a proliferation-invasion
    # (Fisher-Kolmogorov) process from the core, u' = div(D grad u) + u (1 - u), with the
    # diffusivity D high in white matter, ~25x lower in grey matter and CSF, 0 outside the
    # brain, modulated by a random field (irregular, finger-like spread).
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    wm_h = wm[box][::2, ::2, ::2]
    brain_h = brain[box][::2, ::2, ::2]
    shape_h = wm_h.shape
    seed = (_ellipsoid_radius(plan, lo, shape_h, 2) < 1.0 + 0.5 * amp) & brain_h
    diffusivity = np.maximum(np.clip(wm_h, 0.0, 1.0) ** 1.5, 0.04) * brain_h
    diffusivity *= np.exp(0.35 * _smooth_noise(rng, shape_h, spacing=3.0))
    np.minimum(diffusivity, 1.0, out=diffusivity)
    u = seed.astype(np.float32)
    n_iter = int(np.clip(round(plan.edema_reach / 2.6) + 1, 1, 25))  # the front moves ~2.6 mm/step in WM
    for _ in range(n_iter):
        u += diffusivity * (ndi.gaussian_filter(u, 1.5, truncate=2.5) - u)  # sigma 3 mm
        u += u * (1.0 - u)
        np.maximum(u, seed, out=u)
    u = np.clip(u, 1e-4, 1.0 - 1e-4)
    score = np.log(u / (1.0 - u)) + 1.5 * _smooth_noise(rng, shape_h, spacing=3.0)  # noisy logit
    thr = np.float32(0.0)

    # Trim the box to the lesion's extent (+ margin), on even offsets.
    extent = (score > thr - 2.0) | (_ellipsoid_radius(plan, lo, shape_h, 2) < 1.0 + 3.0 * amp)
    nz = [np.flatnonzero(extent.any(axis=tuple(a for a in range(3) if a != k))) for k in range(3)]
    if any(len(v) == 0 for v in nz):  # lesion outside the brain: nothing to draw
        nz = [np.array([shape_h[k] // 2]) for k in range(3)]
    h_lo = np.array([max(int(v[0]) - 2, 0) for v in nz])
    h_hi = np.array([min(int(v[-1]) + 3, shape_h[k]) for k, v in enumerate(nz)])
    f_lo = lo + 2 * h_lo
    f_hi = np.minimum(lo + 2 * h_hi, hi)
    box = tuple(slice(int(a), int(b)) for a, b in zip(f_lo, f_hi))
    shape = tuple(int(v) for v in f_hi - f_lo)
    score = score[tuple(slice(int(a), int(b)) for a, b in zip(h_lo, h_hi))]
    brain_c = brain[box]

    # Core at full resolution: irregular ellipsoid with a ~1 mm soft edge.
    d = _ellipsoid_radius(plan, f_lo, shape, 1)
    rough = _smooth_noise(rng, shape, spacing=max(4.0, rmax / 2.0))
    mean_r = float(plan.radii.mean())
    core_w = np.clip(0.5 - (d - 1.0 - amp * rough) * mean_r, 0.0, 1.0)
    if plan.kind == "lgg":
        ncr_w = core_w.copy()
    else:
        if plan.kind == "gbm":
            inner = 1.0 - float(rng.uniform(2.0, 5.0)) / mean_r  # enhancing rim 2-5 mm
        else:  # solid enhancing, half of them with a small necrotic centre
            inner = float(rng.uniform(0.15, 0.4)) if rng.random() < 0.5 else -1.0
        rough2 = _smooth_noise(rng, shape, spacing=max(3.0, rmax / 3.0))
        ncr_w = np.minimum(np.clip(0.5 - (d - inner - 0.12 * rough2) * mean_r, 0.0, 1.0), core_w)
    et_w = core_w - ncr_w

    # Edema: soft front from the upsampled score, outside the core.
    ed_soft = np.clip((_upsample_half(score, shape) - thr) * 0.5 + 0.5, 0.0, 1.0)
    ed_w = ed_soft * (1.0 - core_w)

    # Hard labels, only inside the brain.
    tissue = np.zeros(shape, np.uint8)
    tissue[(ed_soft > 0.5) & brain_c] = Tissue.ED
    core = (core_w > 0.5) & brain_c
    tissue[core] = Tissue.NCR
    if plan.kind != "lgg":
        tissue[core & (et_w >= ncr_w)] = Tissue.ET
    texture = _smooth_noise(rng, shape, spacing=5.0)
    return _Lesion(box, tissue, ncr_w * brain_c, et_w * brain_c, ed_w * brain_c, texture)


def _upsample_half(low: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Linear 2x upsampling of a half-resolution array (``low`` = full[::2, ::2, ::2]) to ``shape``."""
    out = low
    for axis, n in enumerate(shape):
        c = np.arange(n, dtype=np.float32) / 2.0
        i0 = np.minimum(np.floor(c).astype(int), out.shape[axis] - 1)
        i1 = np.minimum(i0 + 1, out.shape[axis] - 1)
        t = (c - i0).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
        out = np.take(out, i0, axis=axis) * (1 - t) + np.take(out, i1, axis=axis) * t
    return out.astype(np.float32)


# --------------------------------------------------------------------------- public API


def case_id_for(index: int, fmt: str) -> str:
    """Case identifier of case ``index`` (0-based) in release layout ``fmt``.

    ``brats2021`` -> ``BraTS2021_00000``, ``brats2023`` -> ``BraTS-GLI-00000-000``,
    ``msd`` -> ``BRATS_001`` (1-based, as in the Decathlon).
    """
    if index < 0:
        raise ValueError(f"case index must be >= 0, got {index}")
    if fmt == "brats2021":
        return f"BraTS2021_{index:05d}"
    if fmt == "brats2023":
        return f"BraTS-GLI-{index:05d}-000"
    if fmt == "msd":
        return f"BRATS_{index + 1:03d}"
    raise ValueError(f"unknown layout {fmt!r}; expected one of {sorted(LAYOUTS)}")


def generate_case(index: int, seed: int = 0, fmt: str = "brats2021") -> SyntheticCase:
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
    tpl = _load_template()
    rng = np.random.default_rng([seed, index])

    # 1. Geometry: random affine + elastic + mass effect, one resampling per map.
    geo = _random_geometry(rng, tpl)
    plan = _plan_lesion(rng, index, geo, tpl)
    push_radius = float(plan.radii.mean()) * 1.4 + 4.0
    coarse = _sampling_map(geo, tpl, plan.centre_vox, plan.push, push_radius)
    # Blocks with a corner within ~2 mm of the brain (checked against resampling the full grid).
    near = ndi.map_coordinates(tpl.mask_margin, coarse.reshape(3, -1), order=1, cval=0.0).reshape(_COARSE_SHAPE) > 0
    nb = _BLOCKS_SHAPE
    corner_any = np.zeros(nb, bool)
    for di in (0, 1):
        for dj in (0, 1):
            for dk in (0, 1):
                corner_any |= near[di : di + nb[0], dj : dj + nb[1], dk : dk + nb[2]]
    blocks = _Blocks(corner_any)
    coords = np.stack([blocks.upsample(c) for c in coarse])  # (3, N) template voxel coordinates
    mask = ndi.map_coordinates(tpl.mask, coords, order=1, cval=0.0, output=np.float32)
    in_brain = mask > 0.5
    blocks.keep(in_brain)
    coords = coords[:, in_brain]
    mask = mask[in_brain]
    gm = ndi.map_coordinates(tpl.gm, coords, order=1, cval=0.0, output=np.float32)
    wm = ndi.map_coordinates(tpl.wm, coords, order=1, cval=0.0, output=np.float32)
    del coords
    # Tissue fractions (CSF = the rest of the brain mask), normalised to sum to 1.
    total = np.maximum(np.maximum(mask, gm + wm), np.float32(1e-3))
    gm /= total
    wm /= total
    idx = blocks.index
    t_geo = time.perf_counter()

    # 2. Lesion in a box around its centre.
    lookup = np.full(BRATS_SHAPE, -1, np.int32)  # output voxel -> brain voxel number
    lookup.reshape(-1)[idx] = np.arange(len(idx), dtype=np.int32)
    wm_full = np.zeros(BRATS_SHAPE, np.float32)
    wm_full.reshape(-1)[idx] = wm
    lesion = _draw_lesion(rng, plan, wm_full, lookup >= 0)
    del wm_full
    tissue = np.zeros(BRATS_SHAPE, np.uint8)
    tissue[lesion.box] = lesion.tissue
    box_lookup = lookup[lesion.box].reshape(-1)
    local = np.flatnonzero(box_lookup >= 0)  # brain voxels of the lesion box, box-local flat index
    in_box = box_lookup[local]  # ... and their brain voxel number
    del lookup
    ncr_w, et_w, ed_w, tex = (
        a.reshape(-1)[local] for a in (lesion.ncr_w, lesion.et_w, lesion.ed_w, lesion.texture)
    )
    core_w = ncr_w + et_w
    ncr_key = "net" if plan.kind == "lgg" else "ncr"
    t_les = time.perf_counter()

    # 3. Contrasts: tissue mix, lesion, bias field, per-scan scale, Rician noise.
    images: dict[str, np.ndarray] = {}
    for modality in MODALITIES:
        ti = {k: float(v * rng.uniform(0.95, 1.05)) for k, v in _INTENSITY[modality].items()}
        sig = gm * np.float32(ti["gm"] - ti["csf"])
        sig += wm * np.float32(ti["wm"] - ti["csf"])
        sig += np.float32(ti["csf"])
        les = sig[in_box]
        les = les * (1.0 - ed_w) + ed_w * ti["ed"] * (1.0 + 0.08 * tex)
        les = les * (1.0 - core_w) + ncr_w * ti[ncr_key] * (1.0 - 0.10 * tex) + et_w * ti["et"] * (1.0 + 0.12 * tex)
        sig[in_box] = les
        scale = _BASE_SCALE[modality] * float(np.exp(rng.uniform(np.log(0.55), np.log(1.8))))
        bias = np.exp(rng.uniform(0.05, 0.20) * _smooth_noise(rng, _COARSE_SHAPE, spacing=20.0)) * scale
        sig *= blocks.upsample(bias)
        noise_sd = np.float32(rng.uniform(0.015, 0.04) * scale * _INTENSITY[modality]["wm"])
        real = rng.standard_normal(sig.shape, dtype=np.float32)
        real *= noise_sd
        sig += real
        imag = rng.standard_normal(sig.shape, dtype=np.float32)
        imag *= noise_sd
        sig *= sig
        imag *= imag
        sig += imag
        np.sqrt(sig, out=sig)
        np.rint(sig, out=sig)
        np.clip(sig, 1, np.iinfo(np.int16).max, out=sig)
        vol = np.zeros(BRATS_SHAPE, np.int16)
        vol.reshape(-1)[idx] = sig.astype(np.int16)
        images[modality] = vol
    t_end = time.perf_counter()
    logger.debug(
        "case %s (%s, core radius %.1f mm, edema reach %.1f mm): geometry %.2f s, lesion %.2f s, contrasts %.2f s",
        case_id,
        plan.kind,
        float(plan.radii.mean()),
        plan.edema_reach,
        t_geo - t0,
        t_les - t_geo,
        t_end - t_les,
    )
    return SyntheticCase(case_id=case_id, images=images, tissue=tissue, affine=BRATS_AFFINE.copy())


def case_paths(case_id: str, out_dir: str | Path, fmt: str = "brats2021", with_label: bool = True) -> list[Path]:
    """Files that :func:`write_case` writes for ``case_id`` (images first, label last)."""
    out_dir = Path(out_dir)
    layout = get_layout(fmt)
    if layout.is_4d:
        paths = [out_dir / "imagesTr" / f"{case_id}.nii.gz"]
        if with_label:
            paths.append(out_dir / "labelsTr" / f"{case_id}.nii.gz")
        return paths
    names = list(MODALITIES) + (["seg"] if with_label else [])
    return [out_dir / case_id / layout.filename(case_id, m) for m in names]


def write_case(case: SyntheticCase, out_dir: Path, fmt: str = "brats2021", with_label: bool = True) -> list[Path]:
    """Write ``case`` in release layout ``fmt`` under ``out_dir``; return the paths written.

    ``brats2021``/``brats2023``: ``out_dir/<case_id>/<Layout.filename(case_id, m)>`` for
    the four contrasts (int16) and ``seg`` (uint8). ``msd``: ``out_dir/imagesTr/<case_id>.nii.gz``,
    one 4D int16 image (240, 240, 155, 4) in ``LAYOUTS["msd"].channel_order``
    (FLAIR, T1, T1ce, T2), and ``out_dir/labelsTr/<case_id>.nii.gz`` (uint8). Labels are
    in the release's values (:func:`brats_psp.labels.tissue_to_release`). Every file
    is written atomically.
    """
    layout = get_layout(fmt)
    paths = case_paths(case.case_id, out_dir, fmt, with_label)
    label = tissue_to_release(case.tissue, fmt) if with_label else None
    if layout.is_4d:
        stack = np.stack([case.images[m] for m in layout.channel_order], axis=-1).astype(np.int16)
        save_nifti(paths[0], stack, case.affine, dtype=np.int16)
        if label is not None:
            save_nifti(paths[1], label, case.affine, dtype=np.uint8)
    else:
        for path, modality in zip(paths, MODALITIES):
            save_nifti(path, case.images[modality], case.affine, dtype=np.int16)
        if label is not None:
            save_nifti(paths[-1], label, case.affine, dtype=np.uint8)
    return paths


def _msd_dataset_json(case_ids: list[str]) -> dict[str, Any]:
    """``dataset.json`` in the style of the Decathlon's Task01_BrainTumour."""
    return {
        "name": "BRATS",
        "description": "Synthetic BraTS-like gliomas on the MNI ICBM152 brain (brats_psp.data.synthetic)",
        "reference": "brats_psp",
        "licence": "CC-BY-SA 4.0",
        "release": "synthetic",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": len(case_ids),
        "numTest": 0,
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in case_ids],
        "test": [],
    }


def write_dataset(
    out_dir: str | Path, n_cases: int, seed: int = 0, fmt: str = "brats2021", progress: bool = False
) -> list[str]:
    """Write cases ``0 .. n_cases - 1`` of the synthetic dataset ``seed`` in layout ``fmt``.

    Cases whose files all exist already are skipped, so a re-run does no work (the
    existing files are not checked against ``seed``: use one folder per seed). For
    ``msd`` also writes ``out_dir/dataset.json`` (only when its content changes).
    Shows a tqdm progress bar when ``progress`` is true.

    Returns:
        the case ids, in index order.
    """
    if n_cases < 0:
        raise ValueError(f"n_cases must be >= 0, got {n_cases}")
    get_layout(fmt)
    out_dir = Path(out_dir)
    case_ids = [case_id_for(i, fmt) for i in range(n_cases)]
    todo = [i for i, cid in enumerate(case_ids) if not all(p.is_file() for p in case_paths(cid, out_dir, fmt))]
    if len(todo) < n_cases:
        logger.info("%d of %d synthetic cases already in %s", n_cases - len(todo), n_cases, out_dir)
    iterator: Iterable[int] = todo
    if progress and todo:
        from tqdm.auto import tqdm

        iterator = tqdm(todo, desc="synthetic cases", unit="case")
    t0 = time.perf_counter()
    for i in iterator:
        case = generate_case(i, seed=seed, fmt=fmt)
        write_case(case, out_dir, fmt)
    if todo:
        elapsed = time.perf_counter() - t0
        logger.info(
            "wrote %d synthetic %s cases to %s in %.1f s (%.2f s/case)", len(todo), fmt, out_dir, elapsed, elapsed / len(todo)
        )
    if get_layout(fmt).is_4d:
        meta = _msd_dataset_json(case_ids)
        path = out_dir / "dataset.json"
        current = None
        if path.is_file():
            try:
                current = json.loads(path.read_text())
            except ValueError:
                current = None
        if current != meta:
            write_json(path, meta)
    return case_ids
