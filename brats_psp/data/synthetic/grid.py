"""The BraTS voxel grid and the small numerical tools the generator's modules share.

* the grid: 240 x 240 x 155 voxels of 1 mm with the BraTS affine (x and y flipped);
* smooth random fields (:func:`smooth_noise`: unit-variance Gaussian values on a coarse
  grid, cubic-spline upsampled with three matrix products);
* :class:`Blocks`: the 4 x 4 x 4 blocks of the grid that may hold brain, so that the
  anatomy is resampled only where it can be non-zero.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "BRATS_SHAPE",
    "BRATS_AFFINE",
    "BLOCK",
    "COARSE_SHAPE",
    "BLOCKS_SHAPE",
    "Blocks",
    "rotation",
    "smooth_noise",
    "upsample",
    "upsample_half",
    "world_to_vox",
]

#: Voxel grid of every BraTS release (x, y, z), 1 mm isotropic.
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

BLOCK = 4  # side (voxels) of the blocks inside which the sampling map is interpolated
COARSE_SHAPE = tuple(s // BLOCK + 1 + (s % BLOCK > 0) for s in BRATS_SHAPE)  # grid points (61, 61, 40)
BLOCKS_SHAPE = tuple(s - 1 for s in COARSE_SHAPE)  # (60, 60, 39)


@functools.lru_cache(maxsize=64)
def _upsample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) cubic-spline interpolation matrix, end points aligned."""
    eye = np.eye(n_in)
    cols = [ndi.zoom(eye[i], n_out / n_in, order=3, mode="nearest") for i in range(n_in)]
    mat = np.stack(cols, axis=1)
    if mat.shape[0] != n_out:  # zoom rounds the output length
        mat = np.stack([np.interp(np.linspace(0, 1, n_out), np.linspace(0, 1, len(c)), c) for c in cols], axis=1)
    return mat.astype(np.float64)


def upsample(low: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Separable cubic-spline upsampling of a small 3D array to ``shape`` (float32).

    Three matrix products, the last a single GEMM over the largest array.
    """
    low = np.asarray(low, dtype=np.float32)
    m0, m1, m2 = (_upsample_matrix(n, m).astype(np.float32) for n, m in zip(low.shape, shape))
    out = low @ m2.T  # (n0, n1, N2)
    out = m1 @ out  # (n0, N1, N2)
    return (m0 @ out.reshape(low.shape[0], -1)).reshape(shape)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], spacing: float) -> np.ndarray:
    """Smooth random field of ``shape`` (float32), correlation length ~``spacing`` voxels.

    Unit-variance Gaussian values on a grid of that spacing, cubic-spline interpolated
    (so the standard deviation is slightly below 1 between grid points).
    """
    low_shape = tuple(max(2, int(np.ceil(s / spacing)) + 1) for s in shape)
    return upsample(rng.standard_normal(low_shape), shape)


def upsample_half(low: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Linear 2x upsampling of a half-resolution array (``low`` = full[::2, ::2, ::2]) to ``shape``."""
    out = low
    for axis, n in enumerate(shape):
        c = np.arange(n, dtype=np.float32) / 2.0
        i0 = np.minimum(np.floor(c).astype(int), out.shape[axis] - 1)
        i1 = np.minimum(i0 + 1, out.shape[axis] - 1)
        t = (c - i0).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
        out = np.take(out, i0, axis=axis) * (1 - t) + np.take(out, i1, axis=axis) * t
    return out.astype(np.float32)


def rotation(angles: Iterable[float]) -> np.ndarray:
    """3 x 3 rotation matrix from angles (radians) about x, y, z."""
    ax, ay, az = angles
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def world_to_vox(world: np.ndarray) -> np.ndarray:
    """Output world mm (N, 3) -> output voxel coordinates (N, 3)."""
    inv = np.linalg.inv(BRATS_AFFINE)
    return world @ inv[:3, :3].T + inv[:3, 3]


@functools.lru_cache(maxsize=1)
def _block_weights() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Trilinear weights of the 8 block corners for the 64 voxels of a block.

    Returns ``(corners (8, 3) int, offsets (64, 3) int, weights (8, 64) float32)``.
    """
    corners = np.array([(i, j, k) for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    offsets = np.array([(i, j, k) for i in range(BLOCK) for j in range(BLOCK) for k in range(BLOCK)])
    t = offsets / BLOCK  # (64, 3)
    w = np.where(corners[:, None, :] == 1, t[None], 1.0 - t[None]).prod(axis=-1)
    return corners, offsets, w.astype(np.float32)


class Blocks:
    """The 4 x 4 x 4 blocks of the output grid that may hold brain, and their voxels.

    Fields on the coarse grid (``COARSE_SHAPE``, one point every 4 voxels) are
    interpolated trilinearly to the kept voxels by :meth:`upsample`; ``index`` is the
    flat output-grid index of each kept voxel. :meth:`keep` narrows the kept voxels
    (to the brain, say).
    """

    def __init__(self, keep: np.ndarray) -> None:
        corners, offsets, weights = _block_weights()
        a, b, c = (v.astype(np.intp) for v in np.nonzero(keep))
        self._corner_index = np.ravel_multi_index(
            (a[:, None] + corners[None, :, 0], b[:, None] + corners[None, :, 1], c[:, None] + corners[None, :, 2]),
            COARSE_SHAPE,
        )  # (B, 8)
        self._weights = weights
        strides = np.array([BRATS_SHAPE[1] * BRATS_SHAPE[2], BRATS_SHAPE[2], 1])
        base = (a * strides[0] + b * strides[1] + c * strides[2]) * BLOCK  # first voxel of each block
        index = base[:, None] + (offsets @ strides)[None, :]  # (B, 64)
        # The last layer of blocks overhangs the grid (155 = 38 * 4 + 3 slices).
        outside = (c[:, None] * BLOCK + offsets[None, :, 2]) >= BRATS_SHAPE[2]
        self._pos = np.flatnonzero(~outside.reshape(-1))  # positions in the (B, 64) layout
        self.index = index.reshape(-1)[self._pos]

    def __len__(self) -> int:
        return len(self.index)

    def keep(self, mask: np.ndarray) -> None:
        """Keep only the voxels where ``mask`` (bool, one per kept voxel) is true."""
        self._pos = self._pos[mask]
        self.index = self.index[mask]

    def upsample(self, coarse: np.ndarray) -> np.ndarray:
        """Coarse field (``COARSE_SHAPE``) -> float32 values at the kept voxels."""
        vals = coarse.reshape(-1).astype(np.float32)[self._corner_index] @ self._weights  # (B, 64)
        return np.take(vals.reshape(-1), self._pos)
