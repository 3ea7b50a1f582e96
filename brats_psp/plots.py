"""Figures a person would rather look at than read: cases, overlays, curves."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from brats_psp.data.discovery import discover_cases  # noqa: E402
from brats_psp.data.layouts import MODALITIES  # noqa: E402
from brats_psp.data.transforms import apply_transforms, volume_transforms  # noqa: E402
from brats_psp.io import atomic_path  # noqa: E402
from brats_psp.labels import Tissue  # noqa: E402

__all__ = ["TISSUE_CMAP", "plot_cases", "show_slice"]

log = logging.getLogger(__name__)

#: Colours of the tissue codes: NCR red, ED green, ET yellow, RC blue (background transparent).
TISSUE_CMAP = ListedColormap([(0, 0, 0, 0), (0.9, 0.1, 0.1, 0.6), (0.1, 0.8, 0.2, 0.45), (1.0, 0.9, 0.0, 0.7), (0.2, 0.4, 1.0, 0.5)])
MODALITY_TITLES = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}


def show_slice(ax: plt.Axes, image: np.ndarray, tissue: np.ndarray | None = None, title: str = "") -> None:
    """Draw an axial slice (X, Y) of a RAS volume, anterior up, with an optional tissue overlay."""
    lo, hi = np.percentile(image[image != 0], (0.5, 99.5)) if np.any(image) else (0.0, 1.0)
    ax.imshow(image.T, cmap="gray", origin="lower", vmin=lo, vmax=hi, interpolation="nearest")
    if tissue is not None:
        ax.imshow(tissue.T, cmap=TISSUE_CMAP, origin="lower", vmin=0, vmax=len(Tissue) - 1, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def plot_cases(data: str | os.PathLike, out: str | os.PathLike, n_cases: int = 3, layout: str = "auto") -> Path:
    """One row per case: the four contrasts and the labels on FLAIR, at the slice with most tumour.

    Cases are read through the same transforms as training (RAS, cropped, z-scored).
    """
    cases = discover_cases(data, layout).cases[:n_cases]
    transform = volume_transforms()
    fig, axes = plt.subplots(len(cases), len(MODALITIES) + 1, figsize=(2.4 * (len(MODALITIES) + 1), 2.6 * len(cases)), squeeze=False)
    for row, case in zip(axes, cases):
        d = apply_transforms(transform, {"case": case})
        image = d["image"].numpy()
        tissue = d["label"].numpy()[0] if "label" in d else None
        z = int(np.argmax((tissue > 0).sum(axis=(0, 1)))) if tissue is not None and tissue.any() else image.shape[-1] // 2
        for ax, (c, modality) in zip(row, enumerate(MODALITIES)):
            show_slice(ax, image[c, :, :, z], title=f"{case.case_id}\n{MODALITY_TITLES[modality]}, z={z}")
        show_slice(row[-1], image[MODALITIES.index("flair"), :, :, z], tissue, title="labels: NCR red, ED green, ET yellow")
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format=out.suffix.lstrip(".") or "png")
    plt.close(fig)
    return out
