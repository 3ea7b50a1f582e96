"""The infer stage: segment whole NIfTI cases with a trained model, written in the input's geometry.

For each case: the preprocessing stored in the checkpoint (the training transforms: RAS,
crop to the brain, resampling, z-score) -> :func:`brats_psp.inference.predict_volume`
(slice-wise sliding windows) -> the MONAI inverse of resampling (bilinear, on the region
probabilities in the box around the tumour, see :func:`tissue_on_input_grid`) -> threshold ->
the inverse crop and orientation -> BraTS postprocessing -> label map in
the requested release's convention -> ``OUT/<case>.nii.gz`` (uint8, the input's shape,
affine and header), written atomically. A case that fails is reported by name; the others go on.

``MODEL`` may be a checkpoint file, an MLflow run ID, or an MLflow model URI
(``runs:/<run id>/model``, ``models:/<name>/<version>``), resolved to the run's
``checkpoints/best.pt`` by :func:`brats_psp.checkpoint.load_model`, so every path loads with
``weights_only=True``.

Several models (``infer --model A --model B``: the folds or seeds of a recipe, as nnU-Net
ensembles its five folds) segment as one: each predicts the region probabilities with its own
output mode and 2.5D context, and their mean is thresholded (:func:`load_models`,
:func:`ensemble_config`). They must preprocess alike (the same ``data.spacing`` and
``data.intensity_percentiles``).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import itertools
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from brats_psp import _monai  # noqa: F401, I001  (MONAI without the optional packages it probes: see there)
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, Spacingd, SpatialResample
from monai.utils import TraceKeys
from scipy import ndimage
from tqdm.auto import tqdm

from brats_psp.checkpoint import LoadedModel, load_model
from brats_psp.config import Config, InferConfig
from brats_psp.data.discovery import Case, discover_cases
from brats_psp.data.transforms import apply_transforms, open_nifti, volume_transforms
from brats_psp.errors import CaseError, CheckpointError, check_case_id
from brats_psp.inference import above_threshold, predict_volume, probabilities_to_tissue
from brats_psp.io import ensure_writable_dir, save_nifti, voxel_size, write_json
from brats_psp.labels import NoRegionsError, Tissue, get_release, tissue_to_release
from brats_psp.runtime import Runtime, setup_runtime

__all__ = [
    "PreparedCase", "SegmentResult", "ensemble_config", "fill_core", "fill_rim_hull", "load_models", "postprocess", "predict_case", "prepare_case",
    "probabilities_on_input_grid", "segment_case",
    "segment_cases", "write_case",
]

log = logging.getLogger(__name__)

#: What ``segment_cases`` takes as its model: one, or several segmenting as an ensemble.
ModelSpec = str | os.PathLike | LoadedModel
Models = ModelSpec | Sequence[ModelSpec]


def load_models(model: Models, tracking_uri: str | None = None) -> list[LoadedModel]:
    """One model, or the models of an ensemble, loaded (:func:`~brats_psp.checkpoint.load_model`).

    Raises:
        CheckpointError: no model, or models that preprocess differently (``data.spacing``,
            ``data.intensity_percentiles``): one preprocessed volume feeds them all.
    """
    items = [model] if isinstance(model, (str, os.PathLike, LoadedModel)) else list(model)
    if not items:
        raise CheckpointError("no model given")
    loaded = [m if isinstance(m, LoadedModel) else load_model(m, tracking_uri) for m in items]
    for key, unit in (("spacing", " mm"), ("intensity_percentiles", "")):  # what the volume chain depends on
        values = [getattr(m.config.data, key) for m in loaded]
        if len({None if v is None else tuple(float(x) for x in v) for v in values}) > 1:
            got = ", ".join(f"{m.checkpoint}: {v}{unit}" for m, v in zip(loaded, values))
            raise CheckpointError(f"the models of an ensemble must be trained with the same data.{key}; got {got}")
    return loaded


def ensemble_config(models: Sequence[LoadedModel]) -> Config:
    """The config that one model, or an ensemble, segments with: the first model's, for an
    ensemble with each region's threshold the mean of the models' (their calibrated
    ``infer.region_thresholds``, else ``infer.threshold``). ``infer.*`` overrides go on top."""
    cfg = models[0].config
    per_model = [m.config.infer.thresholds for m in models]
    if all(t == per_model[0] for t in per_model):
        return cfg
    thresholds = [round(float(np.mean(t)), 4) for t in zip(*per_model)]
    return dataclasses.replace(cfg, infer=dataclasses.replace(cfg.infer, region_thresholds=thresholds))


@dataclass
class SegmentResult:
    """What the infer stage wrote and what failed."""

    written: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    failures: list[CaseError] = field(default_factory=list)


def postprocess(tissue: np.ndarray, cfg: InferConfig, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """BraTS postprocessing of a tissue map (in place and returned).

    * ``min_component_voxels``: tumour components (WT, 26-connected) smaller than this are removed.
    * ``min_component_fraction``: tumour components smaller than this fraction of the largest one
      are removed (stray false positives far from the lesion; a multifocal tumour's large foci stay).
    * ``core_component_fraction``: core components (NCR + ET, 26-connected) smaller than this
      fraction of the largest one become edema (a stray core or enhancing spot in the edema).
    * ``core_neck_mm``: with it, a part of the core joined to the rest only through a neck
      narrower than twice this many mm counts as a component of its own for that rule
      (:func:`necked_components`; ``spacing``: the voxel size in mm).
    * ``small_et_voxels``: when the whole prediction has fewer ET voxels than this, they become NCR
      (the rule that wins points on cases without enhancing tumour).
    * ``fill_core``: tumour enclosed by the core becomes necrosis (:func:`fill_core`).
    * ``rim_hull``: edema inside an enhancing rim's convex hull becomes necrosis (:func:`fill_rim_hull`).
    """
    box = foreground_box(tissue > 0)
    if box is not None:
        sub = tissue[box]  # every component lies inside the tumour's box: labelled there, a fraction of the volume
        if cfg.min_component_voxels > 0 or cfg.min_component_fraction > 0:
            sub[small_components(sub > 0, cfg.min_component_voxels, cfg.min_component_fraction)] = Tissue.BACKGROUND
        if cfg.core_component_fraction > 0:
            if cfg.core_neck_mm > 0:
                sub[necked_components((sub == Tissue.NCR) | (sub == Tissue.ET), cfg.core_neck_mm, cfg.core_component_fraction, spacing)] = Tissue.ED
            sub[small_components((sub == Tissue.NCR) | (sub == Tissue.ET), 0, cfg.core_component_fraction)] = Tissue.ED
    if cfg.small_et_voxels > 0:
        et = tissue == Tissue.ET
        if 0 < int(et.sum()) < cfg.small_et_voxels:
            tissue[et] = Tissue.NCR
    if cfg.fill_core:
        fill_core(tissue)
    if cfg.rim_hull:
        fill_rim_hull(tissue)
    return tissue


def small_components(mask: np.ndarray, min_voxels: int, fraction: float) -> np.ndarray:
    """The voxels of ``mask``'s components (26-connected) smaller than ``min_voxels`` or than
    ``fraction`` of its largest component."""
    labelled, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    if not n:
        return np.zeros(mask.shape, bool)
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    small = np.flatnonzero(sizes < max(min_voxels, fraction * int(sizes.max())))
    return np.isin(labelled, small[small > 0])


def necked_components(mask: np.ndarray, neck_mm: float, fraction: float, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """The voxels of ``mask`` that its morphological opening by a ball of radius ``neck_mm``
    splits off into components smaller than ``fraction`` of the largest opened component.

    The opening (an erosion and a dilation, both by Euclidean distance in mm) keeps what is
    thicker than the ball and cuts every neck narrower than its diameter; what is thinner
    than the ball everywhere is left alone (the 26-connected rule, :func:`small_components`,
    judges it), and so is all of ``mask`` when nothing survives the erosion.
    """
    padded = np.pad(mask, 1)  # the box's edge counts as outside
    inner = ndimage.distance_transform_edt(padded, sampling=spacing) > neck_mm
    if not inner.any():
        return np.zeros(mask.shape, bool)
    opened = (ndimage.distance_transform_edt(~inner, sampling=spacing) <= neck_mm) & padded
    return small_components(opened, 0, fraction)[(slice(1, -1),) * mask.ndim]


def foreground_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box (a slice per axis) holding every True voxel of ``mask``; None when there is none."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if not len(hits):
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def fill_core(tissue: np.ndarray) -> np.ndarray:
    """Tumour that the tumour core encloses becomes necrosis (in place and returned).

    What an enhancing rim encloses is necrosis or fluid: tumour core in every BraTS release,
    however much it looks like edema. In each axial, coronal and sagittal slice the core
    (NCR + ET) is closed over gaps of one or two voxels (a 3 x 3 closing) and its holes are
    filled; the filled voxels that the prediction calls tumour (edema) become NCR. Background
    and the core itself are left as they are.
    """
    core = (tissue == Tissue.NCR) | (tissue == Tissue.ET)
    box = foreground_box(core)
    if box is None:
        return tissue
    box = tuple(slice(max(s.start - 2, 0), s.stop + 2) for s in box)
    core, sub = core[box], tissue[box]
    enclosed = np.zeros_like(core)
    square = np.ones((3, 3), bool)
    for axis in range(core.ndim):
        for i in range(core.shape[axis]):
            index = (slice(None),) * axis + (i,)
            plane = core[index]
            if plane.any():
                enclosed[index] |= ndimage.binary_fill_holes(ndimage.binary_closing(plane, square, border_value=0))
    sub[enclosed & ~core & (sub != Tissue.BACKGROUND)] = Tissue.NCR
    return tissue


#: Enhancing components smaller than this (pixels of one slice) are not hulled by :func:`fill_rim_hull`.
RIM_HULL_MIN_PIXELS = 20


def fill_rim_hull(tissue: np.ndarray, min_pixels: int = RIM_HULL_MIN_PIXELS) -> np.ndarray:
    """Edema inside the convex hull of an enhancing rim becomes necrosis (in place and returned).

    :func:`fill_core` fills what the core closes around; a glioblastoma's enhancing wall is often
    open in a slice (where it meets the brain's surface, or where it is too thin to see), and then
    nothing is enclosed. Here, in each axial, coronal and sagittal slice, every 8-connected
    component of ET of at least ``min_pixels`` pixels is replaced by its convex hull (per
    component, so that two separate foci are not bridged), and the hull's pixels that the
    prediction calls edema become NCR. Background, NCR and ET are left as they are.
    """
    et = tissue == Tissue.ET
    box = foreground_box(et)
    if box is None:
        return tissue
    et, sub = et[box], tissue[box]
    hull = np.zeros_like(et)
    eight = np.ones((3, 3), bool)
    for axis in range(et.ndim):
        for i in range(et.shape[axis]):
            index = (slice(None),) * axis + (i,)
            labelled, n = ndimage.label(et[index], eight)
            for k, component in enumerate(ndimage.find_objects(labelled), start=1):
                part = labelled[component] == k
                if part.sum() >= min_pixels:
                    hull[index][component] |= _convex_hull(part)
    sub[hull & (sub == Tissue.ED)] = Tissue.NCR
    return tissue


def _convex_hull(mask: np.ndarray) -> np.ndarray:
    """The pixels of a 2D mask's convex hull (pixel centres inside or on it); the mask itself
    where its pixels are collinear.

    The hull of the component's edge pixels by Andrew's monotone chain (a few hundred points
    at most), then every pixel of the mask's box tested against its edges at once: the same
    pixels as Qhull's facets (tested against ``scipy.spatial.ConvexHull``), without loading
    scipy.spatial on the inference path.
    """
    edge = mask & ~ndimage.binary_erosion(mask)  # the hull of a component is that of its edge pixels
    vertices = _monotone_chain(np.argwhere(edge))
    if len(vertices) < 3:
        return mask
    grid = np.indices(mask.shape).reshape(2, -1).T.astype(np.float64)
    a, b = vertices, np.roll(vertices, -1, axis=0)  # counter-clockwise edges a -> b
    d = b - a
    # left of (or on) every edge: cross(b - a, p - a) >= 0
    cross = d[:, 0][None, :] * (grid[:, 1][:, None] - a[:, 1][None, :]) - d[:, 1][None, :] * (grid[:, 0][:, None] - a[:, 0][None, :])
    inside = (cross >= -1e-9).all(axis=1)
    return mask | inside.reshape(mask.shape)


def _monotone_chain(points: np.ndarray) -> np.ndarray:
    """Vertices of the convex hull of 2D integer points, counter-clockwise, without collinear
    points (float64, V x 2); fewer than 3 when the points are collinear."""
    pts = sorted({(int(p[0]), int(p[1])) for p in points})
    if len(pts) < 3:
        return np.asarray(pts, np.float64).reshape(-1, 2)

    def cross(o: tuple[int, int], a: tuple[int, int], b: tuple[int, int]) -> int:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[int, int]] = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list[tuple[int, int]] = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.asarray(lower[:-1] + upper[:-1], np.float64)


def probabilities_on_input_grid(probs: torch.Tensor, image: MetaTensor, chain: Any) -> np.ndarray:
    """Invert crop, spacing and orientation on region probabilities (3 × X × Y × Z)."""
    ops = copy.deepcopy(list(image.applied_operations))  # MONAI's inverses pop from them
    meta = MetaTensor(probs, meta=dict(image.meta), applied_operations=ops)
    back = chain.inverse({"image": meta})["image"]
    return np.asarray(back.detach().cpu().numpy() if hasattr(back, "detach") else back)


def tissue_on_input_grid(
    probs: torch.Tensor, image: MetaTensor, chain: Any, threshold: float | Sequence[float], low: float | Sequence[float] | None = None
) -> np.ndarray:
    """uint8 tissue map on the input's grid, resampling only the box around the tumour.

    The same labels as thresholding :func:`probabilities_on_input_grid`'s probabilities, for a fraction of
    the cost (the full inverse resamples three float channels over the whole input grid).
    Linear interpolation never exceeds its neighbours, so a voxel whose neighbours are all at
    or below ``threshold`` stays background: only the box of voxels above it, one voxel wider
    for the interpolation's reach, is resampled back (MONAI's ``SpatialResample``, with the
    mode, padding and corners the forward resampling used). The crop and the orientation are
    then undone by the chain's own inverses, on the uint8 labels. With ``low`` (hysteresis
    thresholding, :func:`~brats_psp.inference.hysteresis_masks`) the box is that of the voxels
    above ``low``, and the hysteresis runs on the input's grid.
    """
    ops = copy.deepcopy(list(image.applied_operations))  # MONAI's inverses pop from them
    spacing = next((t for t in chain.transforms if isinstance(t, Spacingd)), None)
    if spacing is None or not ops or ops[-1]["class"] != "SpatialResample":
        return probabilities_to_tissue(probabilities_on_input_grid(probs, image, chain), threshold, low)
    info = ops[-1]["extra_info"]
    src_affine = torch.as_tensor(info["src_affine"], dtype=torch.float64)  # the grid before resampling
    affine = torch.as_tensor(image.affine, dtype=torch.float64)
    to_resampled = torch.linalg.solve(affine, src_affine)  # input voxel -> resampled voxel: scale and shift
    if not torch.allclose(to_resampled[:3, :3], torch.diag(torch.diagonal(to_resampled[:3, :3])), atol=1e-6):
        return probabilities_to_tissue(probabilities_on_input_grid(probs, image, chain), threshold, low)
    size = [int(n) for n in ops[-1]["orig_size"]]
    tissue = torch.zeros(size, dtype=torch.uint8)
    above = above_threshold(probs, threshold if low is None else np.minimum(threshold, low)).any(0)
    if above.any():
        box_in, box_out = [], []
        for d, n in enumerate(above.shape):
            hits = torch.nonzero(above.any(dim=[a for a in range(3) if a != d])).flatten()
            lo, hi = max(int(hits[0]) - 1, 0), min(int(hits[-1]) + 2, n)  # one voxel wider each side
            scale, shift = float(to_resampled[d, d]), float(to_resampled[d, 3])
            first = 0 if lo == 0 else max(0, math.ceil((lo - shift) / scale))  # edges: padding repeats them
            last = size[d] if hi == n else min(size[d], math.floor((hi - 1 - shift) / scale) + 1)
            box_in.append(slice(lo, hi))
            box_out.append(slice(first, max(first, last)))
        if all(b.stop > b.start for b in box_out):
            start_in = torch.eye(4, dtype=torch.float64)
            start_in[:3, 3] = torch.tensor([float(b.start) for b in box_in], dtype=torch.float64)
            start_out = torch.eye(4, dtype=torch.float64)
            start_out[:3, 3] = torch.tensor([float(b.start) for b in box_out], dtype=torch.float64)
            sub = MetaTensor(probs[(slice(None), *box_in)].contiguous(), affine=affine @ start_in)
            resample = SpatialResample(mode=info["mode"], padding_mode=info["padding_mode"], align_corners=info["align_corners"], dtype=torch.float32)
            with resample.trace_transform(False):
                back = resample(sub, dst_affine=src_affine @ start_out, spatial_size=[b.stop - b.start for b in box_out])
            tissue[tuple(box_out)] = torch.from_numpy(probabilities_to_tissue(torch.as_tensor(back.as_tensor()), threshold, low))
    data = {"image": MetaTensor(tissue[None], affine=src_affine, applied_operations=ops[:-1])}
    for t in reversed(chain.transforms):
        if isinstance(t, InvertibleTransform) and t is not spacing:
            data = t.inverse(data)
    return np.asarray(data["image"].as_tensor()[0].numpy(), dtype=np.uint8)


@dataclass
class PreparedCase:
    """A case read and preprocessed (:func:`prepare_case`): what the network and the inverse need."""

    case: Case
    image: MetaTensor  # (4, X, Y, Z) in the preprocessed space, with the applied operations
    seconds: float  # time spent reading and preprocessing


def prepare_case(case: Case, spacing: Sequence[float], percentiles: Sequence[float] | None = None) -> PreparedCase | CaseError:
    """Read ``case`` and run the training's volume transforms (no label; ``spacing`` and
    ``percentiles`` are the model's ``data.spacing`` and ``data.intensity_percentiles``); a
    :class:`CaseError` comes back as a value (so that a worker process sends it back whole, by name)."""
    start = time.perf_counter()
    try:
        check_case_id(case.case_id)
        data = apply_transforms(volume_transforms(spacing, with_label=False, percentiles=percentiles), {"case": case})
    except CaseError as err:
        return err
    image = data["image"]
    for op in image.applied_operations:
        _unbind(op)
    return PreparedCase(case, image, time.perf_counter() - start)


def _unbind(op: dict[str, Any]) -> None:
    """Let an equal chain built elsewhere (another process, another call) invert ``op``: MONAI's
    own marker for "do not match the instance that applied it", on the op and the ops nested in
    it (the padding a crop records)."""
    op[TraceKeys.ID] = TraceKeys.NONE
    for value in op.get(TraceKeys.EXTRA_INFO, {}).values():
        if isinstance(value, dict) and TraceKeys.ID in value:
            _unbind(value)


def write_case(prepared: PreparedCase, probs: torch.Tensor, spacing: Sequence[float], out_dir: Path, cfg: InferConfig) -> Path:
    """The region probabilities (preprocessed space) back on the input's grid, thresholded,
    postprocessed and written as ``out_dir/<case_id>.nii.gz`` in the requested convention."""
    case, image = prepared.case, prepared.image
    chain = volume_transforms(spacing, with_label=False)  # its inverses undo the image's applied operations
    ref = open_nifti(case.case_id, case.images[0])  # the input's grid: shape, affine and header of the output
    if cfg.save_probabilities:
        probs_in = probabilities_on_input_grid(probs, image, chain)
        tissue = probabilities_to_tissue(probs_in, cfg.thresholds, cfg.low_thresholds)
    else:
        tissue = tissue_on_input_grid(probs, image, chain, cfg.thresholds, cfg.low_thresholds)
    tissue = postprocess(tissue, cfg, voxel_size(ref))
    release = case.labels if cfg.labels == "input" else cfg.labels
    label = tissue_to_release(tissue, release)
    out = out_dir / f"{case.case_id}.nii.gz"
    header = ref.header.copy() if isinstance(ref, nib.Nifti1Image) and len(ref.shape) == 3 else None
    save_nifti(out, label, ref.affine, header=header, dtype=np.uint8)
    if cfg.save_probabilities:
        # 4D float32, last axis WT, TC, ET (REGION_NAMES)
        save_nifti(out_dir / f"{case.case_id}_probabilities.nii.gz", np.moveaxis(probs_in, 0, -1).astype(np.float32), ref.affine)
    return out


def segment_case(case: Case, loaded: LoadedModel | Sequence[LoadedModel], out_dir: Path, cfg: InferConfig, runtime: Runtime) -> Path:
    """Segment one case with a model or an ensemble and write ``out_dir/<case_id>.nii.gz``; return its path.

    Raises:
        CaseError: the case's files are unusable (named in the message).
    """
    data_cfg = (loaded if isinstance(loaded, LoadedModel) else loaded[0]).config.data
    spacing = data_cfg.spacing
    prepared = prepare_case(case, spacing, data_cfg.intensity_percentiles)
    if isinstance(prepared, CaseError):
        raise prepared
    return write_case(prepared, predict_case(loaded, prepared, cfg, runtime), spacing, out_dir, cfg)


def predict_case(loaded: LoadedModel | Sequence[LoadedModel], prepared: PreparedCase, cfg: InferConfig, runtime: Runtime) -> torch.Tensor:
    """Region probabilities (3, X, Y, Z) of a prepared case in the preprocessed space, with the
    output mode and 2.5D context each model was trained with; of several models, their mean."""
    models = [loaded] if isinstance(loaded, LoadedModel) else list(loaded)
    total = None
    for m in models:
        probs = predict_volume(m.network, prepared.image.as_tensor(), cfg, runtime, m.config.model.output, m.config.data.context_slices)
        total = probs if total is None else total + probs
    assert total is not None
    return total / len(models)


def _reader_threads(threads: int) -> None:
    """A reader process computes with as many torch threads as the main process: multi-threaded
    reductions (the z-score, the resampling) then round as they do there, so the labels are the
    same voxel for voxel (with one thread, a few voxels per case at the threshold differed)."""
    torch.set_num_threads(threads)


def _prepared_in_order(
    cases: list[Case], spacing: Sequence[float], workers: int, stack: contextlib.ExitStack, percentiles: Sequence[float] | None = None
) -> Iterator[PreparedCase | CaseError]:
    """The cases read and preprocessed, in order: here, one after the other (``workers`` 0), or
    by ``workers`` spawned processes that keep up to ``2 * workers`` cases ready ahead."""
    job = functools.partial(prepare_case, spacing=spacing, percentiles=percentiles)
    if workers <= 0 or len(cases) <= 1:
        return map(job, cases)
    ctx = multiprocessing.get_context("spawn")
    pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=ctx, initializer=_reader_threads, initargs=(torch.get_num_threads(),)))

    def ahead() -> Iterator[PreparedCase | CaseError]:
        pending: collections.deque = collections.deque()
        queue = iter(cases)
        for case in itertools.islice(queue, 2 * workers):
            pending.append(pool.submit(job, case))
        while pending:
            ready = pending.popleft().result()
            nxt = next(queue, None)
            if nxt is not None:
                pending.append(pool.submit(job, nxt))
            yield ready

    return ahead()


def _with_regions(cases: list[Case], cfg: InferConfig, result: SegmentResult) -> list[Case]:
    """The cases whose output convention has WT/TC/ET regions; the others (MEN-RT) are
    failures, before any work is done on them."""
    kept = []
    for case in cases:
        try:
            get_release(case.labels if cfg.labels == "input" else cfg.labels, regions=True)
            kept.append(case)
        except NoRegionsError as err:
            failure = CaseError(case.case_id, case.images[0].parent, str(err))
            log.error("%s", failure)
            result.failures.append(failure)
    return kept


def _raise(err: CaseError) -> Path:
    raise err


def _record(result: SegmentResult, case_id: str, start: float, write: Callable[[], Path]) -> None:
    """Run (or wait for) a case's writing and record it, or its CaseError."""
    try:
        result.written[case_id] = write()
        result.seconds[case_id] = time.perf_counter() - start
        log.info("%s: %.1f s -> %s", case_id, result.seconds[case_id], result.written[case_id])
    except CaseError as err:
        log.error("%s", err)
        result.failures.append(err)


def segment_cases(
    model: Models,
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: InferConfig | None = None,
    layout: str = "auto",
    tracking_uri: str | None = None,
    progress: bool = True,
    workers: int = 0,
    task: str = "auto",
) -> SegmentResult:
    """Segment every case under ``input_path`` with ``model`` into ``out_dir``.

    ``model`` is anything :func:`~brats_psp.checkpoint.load_model` takes, or a model it already
    loaded, or a sequence of them: an ensemble (:func:`load_models`), whose mean region
    probabilities are thresholded. ``cfg`` defaults to the ``infer`` section the model was
    trained with (of an ensemble, :func:`ensemble_config`). ``inference.json`` names the
    model, its checkpoint and run; of an ensemble, the lists of models and checkpoints (and no
    single run: ``evaluate --run`` chooses where its metrics go). With ``workers`` > 0, that
    many spawned processes read and preprocess the next cases while the network runs on the
    current one, and a thread writes each result in the background; the outputs, the log's
    order and ``inference.json`` are those of ``workers=0``, and a bad case still stops only
    itself. Predictions are written in each case's label convention (``infer.labels: input``; for
    BraTS 2023+ its task's, ``task`` forcing one), or in the one ``infer.labels`` names. A case's
    time counts from the start of its reading to the end of its writing.
    """
    models = load_models(model, tracking_uri)
    loaded = models[0]
    cfg = cfg or ensemble_config(models).infer
    runtime = setup_runtime(loaded.config.train.device, loaded.config.train.precision, loaded.config.train.threads)
    for m in models:
        m.network.to(runtime.device)
    out_dir = ensure_writable_dir(out_dir)
    found = discover_cases(input_path, layout, task=task)
    result = SegmentResult(failures=list(found.failures))
    found.cases = _with_regions(found.cases, cfg, result)
    spacing = loaded.config.data.spacing
    with contextlib.ExitStack() as stack:
        prepared_cases = _prepared_in_order(found.cases, spacing, workers, stack, loaded.config.data.intensity_percentiles)
        writer = stack.enter_context(ThreadPoolExecutor(1)) if workers > 0 else None
        writing: list[tuple[str, float, Callable[[], Path]]] = []
        for case, prepared in tqdm(zip(found.cases, prepared_cases), total=len(found.cases), desc="infer", unit="case", disable=not progress):
            if isinstance(prepared, CaseError):
                outcome: Callable[[], Path] = functools.partial(_raise, prepared)
                start = time.perf_counter()
            else:
                start = time.perf_counter() - prepared.seconds
                job = functools.partial(write_case, prepared, predict_case(models, prepared, cfg, runtime), spacing, out_dir, cfg)
                # with workers, written in the background while the network runs on the next case
                outcome = job if writer is None else writer.submit(job).result
            if writer is None:
                _record(result, case.case_id, start, outcome)
            else:
                writing.append((case.case_id, start, outcome))
        for case_id, start, outcome in writing:  # in the order of the cases, as without workers
            _record(result, case_id, start, outcome)
    if len(models) == 1:
        named: dict[str, Any] = {"model": str(model if isinstance(model, (str, os.PathLike)) else loaded.checkpoint), "checkpoint": str(loaded.checkpoint), "run_id": loaded.run_id}
    else:
        specs = list(model)  # type: ignore[arg-type]  # several: a sequence
        named = {
            "model": [str(s if isinstance(s, (str, os.PathLike)) else m.checkpoint) for s, m in zip(specs, models)],
            "checkpoint": [str(m.checkpoint) for m in models], "run_id": None, "run_ids": [m.run_id for m in models],
        }
    write_json(
        out_dir / "inference.json",
        {**named, "infer": dataclasses.asdict(cfg), "seconds_per_case": result.seconds, "failed": [str(f) for f in result.failures]},
    )
    if result.seconds:
        log.info("segmented %d case(s), %.1f s per case on average", len(result.seconds), float(np.mean(list(result.seconds.values()))))
    return result

