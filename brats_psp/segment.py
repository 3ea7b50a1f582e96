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
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, SpatialResample, Spacingd
from scipy import ndimage
from tqdm.auto import tqdm

from brats_psp.checkpoint import LoadedModel, load_model
from brats_psp.config import InferConfig
from brats_psp.data.discovery import Case, discover_cases
from brats_psp.data.transforms import apply_transforms, volume_transforms
from brats_psp.errors import CaseError, check_case_id
from brats_psp.inference import predict_volume, probabilities_to_tissue
from brats_psp.io import ensure_writable_dir, save_nifti, write_json
from brats_psp.labels import Tissue, tissue_to_release
from brats_psp.runtime import Runtime, setup_runtime

__all__ = ["SegmentResult", "segment_case", "segment_cases", "postprocess"]

log = logging.getLogger(__name__)


@dataclass
class SegmentResult:
    """What the infer stage wrote and what failed."""

    written: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    failures: list[CaseError] = field(default_factory=list)


def postprocess(tissue: np.ndarray, cfg: InferConfig) -> np.ndarray:
    """BraTS postprocessing of a tissue map (in place and returned).

    * ``min_component_voxels``: tumour components (WT, 26-connected) smaller than this are removed.
    * ``min_component_fraction``: tumour components smaller than this fraction of the largest one
      are removed (stray false positives far from the lesion; a multifocal tumour's large foci stay).
    * ``small_et_voxels``: when the whole prediction has fewer ET voxels than this, they become NCR
      (the rule that wins points on cases without enhancing tumour).
    """
    if cfg.min_component_voxels > 0 or cfg.min_component_fraction > 0:
        labelled, n = ndimage.label(tissue > 0, structure=np.ones((3, 3, 3), bool))
        if n:
            sizes = np.bincount(labelled.ravel())
            sizes[0] = 0
            limit = max(cfg.min_component_voxels, cfg.min_component_fraction * int(sizes.max()))
            small = np.flatnonzero(sizes < limit)
            small = small[small > 0]
            if len(small):
                tissue[np.isin(labelled, small)] = Tissue.BACKGROUND
    if cfg.small_et_voxels > 0:
        et = tissue == Tissue.ET
        if 0 < int(et.sum()) < cfg.small_et_voxels:
            tissue[et] = Tissue.NCR
    return tissue


def _to_input_grid(probs: torch.Tensor, image: MetaTensor, chain: Any) -> np.ndarray:
    """Invert crop, spacing and orientation on region probabilities (3 × X × Y × Z)."""
    ops = copy.deepcopy(list(image.applied_operations))  # MONAI's inverses pop from them
    meta = MetaTensor(probs, meta=dict(image.meta), applied_operations=ops)
    back = chain.inverse({"image": meta})["image"]
    return np.asarray(back.detach().cpu().numpy() if hasattr(back, "detach") else back)


def tissue_on_input_grid(probs: torch.Tensor, image: MetaTensor, chain: Any, threshold: float) -> np.ndarray:
    """uint8 tissue map on the input's grid, resampling only the box around the tumour.

    The same labels as thresholding :func:`_to_input_grid`'s probabilities, for a fraction of
    the cost (the full inverse resamples three float channels over the whole input grid).
    Linear interpolation never exceeds its neighbours, so a voxel whose neighbours are all at
    or below ``threshold`` stays background: only the box of voxels above it, one voxel wider
    for the interpolation's reach, is resampled back (MONAI's ``SpatialResample``, with the
    mode, padding and corners the forward resampling used). The crop and the orientation are
    then undone by the chain's own inverses, on the uint8 labels.
    """
    ops = copy.deepcopy(list(image.applied_operations))  # MONAI's inverses pop from them
    spacing = next((t for t in chain.transforms if isinstance(t, Spacingd)), None)
    if spacing is None or not ops or ops[-1]["class"] != "SpatialResample":
        return probabilities_to_tissue(_to_input_grid(probs, image, chain), threshold)
    info = ops[-1]["extra_info"]
    src_affine = torch.as_tensor(info["src_affine"], dtype=torch.float64)  # the grid before resampling
    affine = torch.as_tensor(image.affine, dtype=torch.float64)
    to_resampled = torch.linalg.solve(affine, src_affine)  # input voxel -> resampled voxel: scale and shift
    if not torch.allclose(to_resampled[:3, :3], torch.diag(torch.diagonal(to_resampled[:3, :3])), atol=1e-6):
        return probabilities_to_tissue(_to_input_grid(probs, image, chain), threshold)
    size = [int(n) for n in ops[-1]["orig_size"]]
    tissue = torch.zeros(size, dtype=torch.uint8)
    above = (probs > threshold).any(0)
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
            tissue[tuple(box_out)] = torch.from_numpy(probabilities_to_tissue(torch.as_tensor(back.as_tensor()), threshold))
    data = {"image": MetaTensor(tissue[None], affine=src_affine, applied_operations=ops[:-1])}
    for t in reversed(chain.transforms):
        if isinstance(t, InvertibleTransform) and t is not spacing:
            data = t.inverse(data)
    return np.asarray(data["image"].as_tensor()[0].numpy(), dtype=np.uint8)


def segment_case(case: Case, loaded: LoadedModel, out_dir: Path, cfg: InferConfig, runtime: Runtime) -> Path:
    """Segment one case and write ``out_dir/<case_id>.nii.gz``; return its path.

    Raises:
        CaseError: the case's files are unusable (named in the message).
    """
    check_case_id(case.case_id)
    train_cfg = loaded.config
    chain = volume_transforms(train_cfg.data.spacing, with_label=False)
    data = apply_transforms(chain, {"case": case})
    image = data["image"]
    probs = predict_volume(loaded.network, image.as_tensor(), cfg, runtime, train_cfg.model.output, train_cfg.data.context_slices)
    ref = nib.load(str(case.images[0]))  # the input's grid: shape, affine and header of the output
    if cfg.save_probabilities:
        probs_in = _to_input_grid(probs, image, chain)
        tissue = probabilities_to_tissue(probs_in, cfg.threshold)
    else:
        tissue = tissue_on_input_grid(probs, image, chain, cfg.threshold)
    tissue = postprocess(tissue, cfg)
    release = case.layout if cfg.labels == "input" else cfg.labels
    label = tissue_to_release(tissue, release)
    out = out_dir / f"{case.case_id}.nii.gz"
    header = ref.header.copy() if isinstance(ref, nib.Nifti1Image) and len(ref.shape) == 3 else None
    save_nifti(out, label, ref.affine, header=header, dtype=np.uint8)
    if cfg.save_probabilities:
        # 4D float32, last axis WT, TC, ET (REGION_NAMES)
        save_nifti(out_dir / f"{case.case_id}_probabilities.nii.gz", np.moveaxis(probs_in, 0, -1).astype(np.float32), ref.affine)
    return out


def segment_cases(
    model: str | LoadedModel,
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: InferConfig | None = None,
    layout: str = "auto",
    tracking_uri: str | None = None,
    progress: bool = True,
) -> SegmentResult:
    """Segment every case under ``input_path`` with ``model`` into ``out_dir``.

    ``model`` is anything :func:`~brats_psp.checkpoint.load_model` takes, or a model it already loaded; ``cfg``
    defaults to the ``infer`` section the model was trained with.
    """
    loaded = model if isinstance(model, LoadedModel) else load_model(model, tracking_uri)
    cfg = cfg or loaded.config.infer
    runtime = setup_runtime(loaded.config.train.device, loaded.config.train.precision, loaded.config.train.threads)
    loaded.network.to(runtime.device)
    out_dir = ensure_writable_dir(out_dir)
    found = discover_cases(input_path, layout)
    result = SegmentResult(failures=list(found.failures))
    for case in tqdm(found.cases, desc="infer", unit="case", disable=not progress):
        start = time.perf_counter()
        try:
            result.written[case.case_id] = segment_case(case, loaded, out_dir, cfg, runtime)
            result.seconds[case.case_id] = time.perf_counter() - start
            log.info("%s: %.1f s -> %s", case.case_id, result.seconds[case.case_id], result.written[case.case_id])
        except CaseError as err:
            log.error("%s", err)
            result.failures.append(err)
    write_json(
        out_dir / "inference.json",
        {
            "model": str(model if isinstance(model, str) else loaded.checkpoint), "checkpoint": str(loaded.checkpoint), "run_id": loaded.run_id,
            "infer": dataclasses.asdict(cfg), "seconds_per_case": result.seconds, "failed": [str(f) for f in result.failures],
        },
    )
    if result.seconds:
        log.info("segmented %d case(s), %.1f s per case on average", len(result.seconds), float(np.mean(list(result.seconds.values()))))
    return result

