"""Shared fixtures: small hand-made cases in every release layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from brats_psp.data.layouts import MODALITIES, get_layout
from brats_psp.io import save_nifti
from brats_psp.labels import Tissue, tissue_to_release

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL_CASE = SHARED / "data" / "real" / "BraTS-GLI-00001-000"
BRATS_AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
SMALL_SHAPE = (40, 44, 24)


def small_volume(shape: tuple[int, int, int] = SMALL_SHAPE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A toy case: an ellipsoid 'brain' (4 contrasts, int16) with a lesion (tissue codes).

    Returns image (4, X, Y, Z) int16 in MODALITIES order and tissue (X, Y, Z) uint8 with
    a necrotic core, an enhancing shell and edema around it, off-centre in the brain.
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    brain = (grid**2).sum(0) < 0.8
    centre = np.array([0.25, -0.1, 0.0])[:, None, None, None]
    r = np.sqrt(((grid - centre) ** 2 * np.array([1, 1, 0.6])[:, None, None, None]).sum(0))
    tissue = np.zeros(shape, np.uint8)
    tissue[(r < 0.45) & brain] = Tissue.ED
    tissue[(r < 0.3) & brain] = Tissue.ET
    tissue[(r < 0.18) & brain] = Tissue.NCR
    means = {"t1": 500, "t1ce": 550, "t2": 700, "flair": 400}
    image = np.zeros((4, *shape), np.int16)
    for c, m in enumerate(MODALITIES):
        vol = rng.normal(means[m], 30, shape) + 200 * (tissue == Tissue.ET) * (m == "t1ce") + 250 * (tissue == Tissue.ED) * (m in ("flair", "t2"))
        image[c] = np.where(brain, np.clip(vol, 1, None), 0).astype(np.int16)
    return image, tissue


def write_case(
    root: Path,
    layout: str,
    case_id: str,
    shape: tuple[int, int, int] = SMALL_SHAPE,
    affine: np.ndarray = BRATS_AFFINE,
    with_label: bool = True,
    ext: str = ".nii.gz",
    seed: int = 0,
    labels: str | None = None,
) -> dict[str, object]:
    """Write one small case in ``layout`` under ``root`` (labels in the convention ``labels``,
    default the layout's); return its arrays and paths."""
    image, tissue = small_volume(shape, seed)
    lay = get_layout(layout)
    paths: dict[str, Path] = {}
    if lay.is_4d:
        order = [MODALITIES.index(m) for m in lay.channel_order]
        paths["image"] = root / "imagesTr" / f"{case_id}{ext}"
        save_nifti(paths["image"], np.moveaxis(image[order], 0, -1), affine)
        if with_label:
            paths["seg"] = root / "labelsTr" / f"{case_id}{ext}"
            save_nifti(paths["seg"], tissue_to_release(tissue, labels or layout), affine, dtype=np.uint8)
    else:
        folder = root / case_id
        for c, m in enumerate(MODALITIES):
            paths[m] = folder / lay.filename(case_id, m, ext)
            save_nifti(paths[m], image[c], affine)
        if with_label:
            paths["seg"] = folder / lay.filename(case_id, "seg", ext)
            save_nifti(paths["seg"], tissue_to_release(tissue, labels or layout), affine, dtype=np.uint8)
    return {"image": image, "tissue": tissue, "paths": paths}


def run_cli(*args: str) -> int:
    """``python pipelines/run.py ARGS`` in this process (no interpreter start-up); returns the exit code."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("brats_psp_cli", REPO / "pipelines" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(args))


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own folder: MLflow's relative artifact store (./mlruns), caches
    and outputs never land in the checkout."""
    monkeypatch.chdir(tmp_path)


CASE_IDS = {
    "brats2021": ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"],
    "brats2023": ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000", "BraTS-GLI-00002-000"],
    "msd": ["BRATS_001", "BRATS_002", "BRATS_003"],
}


@pytest.fixture(params=sorted(CASE_IDS))
def layout_dataset(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path]:
    """A three-case dataset folder for each layout."""
    layout = request.param
    for i, cid in enumerate(CASE_IDS[layout]):
        write_case(tmp_path / "data", layout, cid, seed=i)
    if layout == "msd":
        (tmp_path / "data" / "dataset.json").write_text(json.dumps({"name": "BRATS"}))
    return layout, tmp_path / "data"


@pytest.fixture
def small_dataset(tmp_path: Path) -> Path:
    """Six labelled brats2021 cases."""
    for i in range(6):
        write_case(tmp_path / "raw", "brats2021", f"BraTS2021_{i:05d}", seed=i)
    return tmp_path / "raw"


def untrained_checkpoint(path: Path) -> Path:
    """Save an untrained smoke-sized model (2 mm, 32 x 32 windows, no TTA) at ``path``: enough to
    check geometry, conventions and plumbing, not accuracy."""
    import torch

    from brats_psp.checkpoint import save_checkpoint
    from brats_psp.config import config_to_dict, load_config
    from brats_psp.data.transforms import preprocessing_params
    from brats_psp.networks import build_network

    cfg = load_config(REPO / "configs" / "smoke.yaml", ["data.spacing=[2.0,2.0,2.0]", "infer.roi_size=[32,32]", "infer.tta=false"])
    torch.manual_seed(0)
    model = build_network(cfg.model, cfg.data.in_channels)
    save_checkpoint(path, {"model": model.state_dict(), "config": config_to_dict(cfg), "preprocessing": preprocessing_params(cfg.data.spacing), "run_id": None})
    return path
