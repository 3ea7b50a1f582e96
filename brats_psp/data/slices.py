"""Preprocessed volumes -> 2D axial training slices.

* :class:`SliceDataset` reads one slice (and its 2.5D neighbours) from the cache with a
  memory map, builds the WT/TC/ET region masks and the per-slice presence targets of the
  auxiliary class head, and applies the 2D MONAI transforms of :func:`slice_transforms` (pad,
  and a random crop for training; the augmentations run on whole batches,
  :mod:`brats_psp.data.augment`).
* :class:`TumourRatioSampler` draws a fixed number of slices per epoch, a configured
  fraction of them from slices that contain tumour; sharded across processes for DDP.
  It yields ``(index, seed)`` pairs: the dataset reseeds its random transforms with each
  sample's seed (:func:`reseed`), so a sample's crop follows from (train seed, epoch,
  position) alone, whichever process, worker or resumed run draws it. That is what lets
  the loader keep its workers alive across epochs.

A sample is ``{"image": float32 (4·(2k+1), H, W), "label": float32 (3, H, W) region masks,
"presence": float32 (3,), "case_id": str, "z": int}``; with ``classes`` (``data.rerender``) also
``"classes"``, uint8 (2k+1, H, W) appearance-class codes cropped with the image, and
``"class_voxels"``, int64 (:data:`CLASS_CODES`,) the case's voxel count per code (all 0 for a
case without a class map).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from brats_psp import _monai  # noqa: F401, I001  (MONAI without the optional packages it probes: see there)
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    Randomizable,
    RandSpatialCropd,
    MapTransform,
    Transform,
)
from torch.utils.data import Dataset, Sampler

from brats_psp.config import DataConfig
from brats_psp.data.cache import CachedVolume
from brats_psp.data.geometry import PLANE_AXES, centre_pad
from brats_psp.data.synthetic.appearance import CLASS_NAMES
from brats_psp.labels import REGION_NAMES, tissue_to_regions

log = logging.getLogger(__name__)

#: Length of a sample's ``class_voxels`` (one count per appearance-class code).
CLASS_CODES = len(CLASS_NAMES)

__all__ = ["SliceDataset", "TumourRatioSampler", "PadToSize", "PadToSized", "random_states", "reseed", "slice_transforms"]


@contextlib.contextmanager
def _plain_tensors() -> Iterator[None]:
    """Run 2D transforms on plain tensors in one thread.

    Slices need no metadata (tracking it costs ~10x), and on tiny 2D tensors extra intra-op
    threads only add synchronisation (DataLoader workers already use one thread; this makes
    ``num_workers=0`` as fast).
    """
    previous, threads = get_track_meta(), torch.get_num_threads()
    set_track_meta(False)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        set_track_meta(previous)
        torch.set_num_threads(threads)


class PadToSize(Transform):
    """Zero-pad a (C, H, W) tensor to at least ``size``, split evenly before and after (MONAI's
    ``SpatialPad`` symmetric method) with one ``F.pad``: the same output (tested) in 0.30 against
    0.54 ms for an image and label slice."""

    def __init__(self, size: Sequence[int]) -> None:
        self.size = tuple(size)

    def __call__(self, img: Any) -> torch.Tensor:
        img = torch.as_tensor(img)
        pads = centre_pad(img.shape, self.size)
        return torch.nn.functional.pad(img, pads) if any(pads) else img


class PadToSized(MapTransform):
    """Dictionary twin of :class:`PadToSize` over ``keys``."""

    def __init__(self, keys: str | Sequence[str], size: Sequence[int], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.pad = PadToSize(size)

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.pad(d[key])
        return d


def slice_transforms(cfg: DataConfig, train: bool) -> Compose:
    """2D dictionary transforms on ``image`` (C, H, W) and ``label`` (3, H, W).

    Both pad to ``cfg.slice_size``; training crops at random, validation (or ``data.augment:
    false``) at the centre. The training augmentations (flips, rotation and scaling, intensity
    scale and shift, gamma, noise) run on whole batches: :class:`brats_psp.data.augment.BatchAugment`.
    """
    keys = ["image", "label", "classes"]  # classes: only in samples that carry an appearance-class map
    size = tuple(cfg.slice_size)
    steps: list[Any] = [PadToSized(keys=keys, size=size, allow_missing_keys=True)]
    if not train or not cfg.augment:
        steps.append(CenterSpatialCropd(keys=keys, roi_size=size, allow_missing_keys=True))
    else:
        steps.append(RandSpatialCropd(keys=keys, roi_size=size, random_size=False, allow_missing_keys=True))
    return Compose(steps)


def random_states(transform: Any) -> list[np.random.RandomState]:
    """Every random state ``transform`` draws from, nested transforms included, in a fixed order.

    MONAI's random transforms each hold a ``RandomState`` (``.R``), and some hold further
    random transforms (``RandAffined`` -> ``RandAffine`` -> ``RandAffineGrid``).
    """
    states: dict[int, np.random.RandomState] = {}
    seen: set[int] = set()

    def visit(obj: Any, depth: int) -> None:
        if id(obj) in seen or depth > 6:
            return
        seen.add(id(obj))
        if isinstance(obj, Compose):
            for t in obj.transforms:
                visit(t, depth + 1)
        if isinstance(obj, Randomizable):
            states.setdefault(id(obj.R), obj.R)
        for value in getattr(obj, "__dict__", {}).values():
            if isinstance(value, (Randomizable, Compose)):
                visit(value, depth + 1)

    visit(transform, 0)
    return list(states.values())


_STATES: weakref.WeakKeyDictionary[Any, tuple[tuple[int, ...], list[np.random.RandomState]]] = weakref.WeakKeyDictionary()


def reseed(transform: Compose, seed: int) -> None:
    """Seed every random state of ``transform`` from one ``seed``, in place.

    MONAI's ``set_random_state`` builds new ``RandomState`` objects (about 120 µs each on the
    2-core benchmark machine, 2 ms for a chain of MONAI's per-slice augmentations); reseeding
    the existing ones takes 2 µs each. The list of states is found once per chain and found
    again when ``set_random_state`` has replaced them.
    """
    key = tuple(id(t.R) for t in transform.transforms if isinstance(t, Randomizable))
    cached = _STATES.get(transform)
    if cached is None or cached[0] != key:
        cached = _STATES[transform] = (key, random_states(transform))
    for j, state in enumerate(cached[1]):
        state.seed((seed + j * 0x9E3779B9) % 2**32)  # an int seeds 7x faster than a sequence


class SliceDataset(Dataset):
    """2D slices of preprocessed cases, indexed flat over (case, plane, slice).

    ``planes`` chooses the slice directions (axial by default; all three for a tri-planar model).
    Samples are float32; with ``compact`` the image keeps the cache's float16 and the region
    masks are uint8 (the same values, in half the bytes or less: what a training loader's
    workers stack, share and pin; :func:`brats_psp.training.to_device` makes them float32 on
    the device).
    """

    def __init__(
        self,
        case_dirs: Sequence[str | Path],
        context_slices: int = 0,
        transform: Compose | None = None,
        planes: Sequence[str] = ("axial",),
        compact: bool = False,
        classes: bool = False,
    ) -> None:
        self.volumes = [CachedVolume(d) for d in case_dirs]
        self.context = context_slices
        self.compact = compact
        self.classes = classes
        if classes and (missing := [v.case_id for v in self.volumes if not v.has_classes]):
            log.warning(
                "%d of %d case(s) have no appearance-class map (only the built-in set has one), e.g. %s: "
                "their slices keep their own contrasts",
                len(missing), len(self.volumes), missing[0],
            )
        self.transform = transform
        self.axes = [PLANE_AXES[p] for p in planes]
        rows = [(v, a, i) for v, vol in enumerate(self.volumes) for a in self.axes for i in range(vol.length(a))]
        self.index = np.array(rows, dtype=np.int64).reshape(-1, 3)
        parts = [vol.presence_along(a) for vol in self.volumes for a in self.axes]
        self.presence = np.concatenate(parts) if parts else np.zeros((0, len(REGION_NAMES)), np.uint8)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def has_tumour(self) -> np.ndarray:
        """bool (N,): slice ``i`` contains whole tumour (before augmentation)."""
        return self.presence[:, REGION_NAMES.index("WT")].astype(bool)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        """Slice ``item``, or ``(index, seed)`` (as :class:`TumourRatioSampler` yields): the
        random transforms are reseeded with ``seed`` first, so the sample does not depend on
        what they drew before."""
        i, seed = (item, None) if isinstance(item, (int, np.integer)) else item
        v, axis, z = (int(x) for x in self.index[i])
        vol = self.volumes[v]
        if seed is not None and self.transform is not None:
            reseed(self.transform, seed)
        image_dtype, label_dtype = (torch.float16, torch.uint8) if self.compact else (torch.float32, torch.float32)
        sample = {
            "image": torch.from_numpy(vol.slab(z, self.context, axis, dtype=np.float16 if self.compact else np.float32)),
            "label": torch.from_numpy(tissue_to_regions(vol.label_slice(z, axis))).to(label_dtype),
        }
        if self.classes:
            codes = vol.classes_slab(z, self.context, axis) if vol.has_classes else np.zeros((2 * self.context + 1, *sample["label"].shape[1:]), np.uint8)
            sample["classes"] = torch.from_numpy(codes)
        if self.transform is not None:
            with _plain_tensors():
                sample = self.transform(sample)
        image = torch.as_tensor(sample["image"], dtype=image_dtype).contiguous()
        label = torch.as_tensor(sample["label"], dtype=label_dtype).contiguous()
        extra = {}
        if self.classes:
            extra["classes"] = torch.as_tensor(sample["classes"], dtype=torch.uint8).contiguous().as_subclass(torch.Tensor)
            extra["class_voxels"] = torch.tensor(vol.meta.get("class_voxels", [0]) + [0] * CLASS_CODES, dtype=torch.int64)[:CLASS_CODES]
        return {
            **extra,
            "image": image.as_subclass(torch.Tensor),
            "label": label.as_subclass(torch.Tensor),
            "presence": label.flatten(1).amax(dim=1).as_subclass(torch.Tensor),
            "case_id": vol.case_id,
            "z": z,
            "axis": axis,
        }


class TumourRatioSampler(Sampler[tuple[int, int]]):
    """Draw ``num_samples`` slices per epoch, a ``ratio`` of them from slices with tumour.

    The rest come from slices without tumour. Yields ``(index, seed)`` pairs, the seed being
    that sample's seed for the dataset's random transforms (see :meth:`SliceDataset.__getitem__`). With several
    processes each rank gets its own disjoint share of one shared draw (``num_samples`` in
    all). Call :meth:`set_epoch` at every epoch for a new draw; a given (seed, epoch) always
    gives the same pairs.
    """

    def __init__(
        self,
        has_tumour: np.ndarray,
        num_samples: int,
        ratio: float,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.tumour = np.flatnonzero(has_tumour)
        self.other = np.flatnonzero(~np.asarray(has_tumour, dtype=bool))
        if len(self.tumour) + len(self.other) == 0:
            raise ValueError("no slices to sample from")
        self.num_samples, self.ratio, self.seed = num_samples, ratio, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _draw(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        ratio = self.ratio if len(self.other) else 1.0
        ratio = ratio if len(self.tumour) else 0.0
        n_tumour = int(round(self.num_samples * ratio))
        picks = np.concatenate(
            [rng.choice(self.tumour, n_tumour), rng.choice(self.other, self.num_samples - n_tumour)]
            if 0 < n_tumour < self.num_samples
            else [rng.choice(self.tumour if n_tumour else self.other, self.num_samples)]
        )
        picks = rng.permutation(picks)
        return picks, rng.integers(0, 2**32, size=len(picks), dtype=np.uint64)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        picks, seeds = self._draw()
        share = slice(self.rank, None, self.world_size)
        return iter((int(i), int(s)) for i, s in zip(picks[share], seeds[share]))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))
