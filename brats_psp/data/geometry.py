"""Slice geometry shared by the training loader and inference (neither imports the other for it)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["PLANE_AXES", "centre_pad"]

#: Slice axis (spatial, of a RAS volume X × Y × Z) of each plane.
PLANE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


def centre_pad(shape: Sequence[int], size: Sequence[int]) -> list[int]:
    """``F.pad`` widths that zero-pad the last ``len(size)`` axes of ``shape`` to at least ``size``,
    split evenly before and after with the odd voxel after (MONAI's ``SpatialPad`` symmetric method)."""
    pads: list[int] = []
    for n, want in zip(reversed(shape[-len(size):]), reversed(size)):  # F.pad lists the last axis first
        diff = max(want - n, 0)
        pads += [diff // 2, diff - diff // 2]
    return pads
