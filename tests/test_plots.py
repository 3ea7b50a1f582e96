"""Figures: they are written (atomically) and show something."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np

from brats_psp.io import save_nifti
from brats_psp.labels import tissue_to_release
from brats_psp.plots import plot_cases, plot_learning_curves, plot_prediction
from tests.conftest import BRATS_AFFINE, write_case


def _not_blank(path: Path) -> bool:
    img = mpimg.imread(path)
    return img.ndim == 3 and float(img[..., :3].std()) > 0.05


def test_plot_cases_and_prediction(tmp_path: Path) -> None:
    made = [write_case(tmp_path / "raw", "brats2021", f"BraTS2021_{i:05d}", seed=i) for i in range(2)]
    assert _not_blank(plot_cases(tmp_path / "raw", tmp_path / "cases.png", n_cases=2))
    pred = tmp_path / "pred" / "BraTS2021_00000.nii.gz"
    save_nifti(pred, tissue_to_release(made[0]["tissue"], "brats2021"), BRATS_AFFINE, dtype=np.uint8)
    assert _not_blank(plot_prediction(tmp_path / "raw" / "BraTS2021_00000", pred, tmp_path / "pred.png"))
    assert not list(tmp_path.glob(".*.tmp*"))


def test_learning_curves(tmp_path: Path) -> None:
    history = [
        {"epoch": 0, "train/loss": 1.0, "train/seg_loss": 0.8, "train/class_loss": 0.2},
        {"epoch": 1, "train/loss": 0.6, "train/seg_loss": 0.5, "train/class_loss": 0.1, "val/dice_WT": 0.7, "val/dice_TC": 0.5, "val/dice_ET": 0.4, "val/dice_mean": 0.53},
    ]
    assert _not_blank(plot_learning_curves(history, tmp_path / "curves.png"))
