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

__all__ = ["TISSUE_CMAP", "plot_cases", "plot_rerendered", "show_slice", "plot_validation_overlay", "plot_learning_curves", "plot_prediction", "save_figure"]

log = logging.getLogger(__name__)

#: Colours of the tissue codes: NCR red, ED green, ET yellow, RC blue (background transparent).
TISSUE_CMAP = ListedColormap([(0, 0, 0, 0), (0.9, 0.1, 0.1, 0.6), (0.1, 0.8, 0.2, 0.45), (1.0, 0.9, 0.0, 0.7), (0.2, 0.4, 1.0, 0.5),
                              (0.7, 0.2, 0.9, 0.6), (0.0, 0.9, 0.9, 0.5)])  # by Tissue code: BG NCR ED ET RC CC GTV
MODALITY_TITLES = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}


def show_slice(ax: plt.Axes, image: np.ndarray, tissue: np.ndarray | None = None, title: str = "") -> None:
    """Draw an axial slice (X, Y) of a RAS volume, anterior up, with an optional tissue overlay."""
    lo, hi = np.percentile(image[image != 0], (0.5, 99.5)) if np.any(image) else (0.0, 1.0)
    gray = plt.get_cmap("gray").with_extremes(bad="black")  # outside the brain (exactly 0) is black
    ax.imshow(np.ma.masked_equal(image, 0).T, cmap=gray, origin="lower", vmin=lo, vmax=hi, interpolation="nearest")
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
        overlay = None if tissue is None else tissue[:, :, z]
        show_slice(row[-1], image[MODALITIES.index("flair"), :, :, z], overlay, title="labels: NCR red, ED green, ET yellow")
    fig.tight_layout()
    return save_figure(fig, out)


def plot_rerendered(cache_dir: str | os.PathLike, out: str | os.PathLike, n_cases: int = 2, draws: int = 3, seed: int = 0) -> Path:
    """What ``data.rerender`` trains on: per cached built-in case (with a class map), at its slice
    with most tumour, a row of the stored contrasts, then ``draws`` rows of contrasts drawn anew
    from the class map (:func:`brats_psp.data.rerender.rerender`), each with the labels on FLAIR."""
    import torch

    from brats_psp.data.cache import CachedVolume
    from brats_psp.data.rerender import rerender

    volumes = [v for v in (CachedVolume(d) for d in sorted((Path(cache_dir) / "cases").iterdir()) if d.is_dir()) if v.has_classes][:n_cases]
    if not volumes:
        raise FileNotFoundError(f"{cache_dir}: no cached case with an appearance-class map (only the built-in set has them)")
    rows = len(volumes) * (1 + draws)
    fig, axes = plt.subplots(rows, len(MODALITIES) + 1, figsize=(2.2 * (len(MODALITIES) + 1), 2.3 * rows), squeeze=False)
    g = torch.Generator().manual_seed(seed)
    for n, vol in enumerate(volumes):
        label = np.asarray(vol.label)
        z = int(np.argmax((label > 0).reshape(label.shape[0], -1).sum(1)))
        counts = torch.tensor(vol.meta["class_voxels"])[None]
        images = [vol.slab(z, 0)] + [rerender(torch.from_numpy(vol.classes_slab(z, 0))[None], counts, g)[0].numpy() for _ in range(draws)]
        for k, image in enumerate(images):
            row = axes[n * (1 + draws) + k]
            name = "stored" if k == 0 else f"drawn anew {k}"
            for ax, (c, modality) in zip(row, enumerate(MODALITIES)):
                title = f"{vol.case_id} z={z}\n{name}: {MODALITY_TITLES[modality]}" if c == 0 else MODALITY_TITLES[modality]
                show_slice(ax, image[c], title=title)
            show_slice(row[-1], image[MODALITIES.index("flair")], label[z], title="labels on FLAIR")
    fig.tight_layout()
    return save_figure(fig, out)


def save_figure(fig: plt.Figure, out: str | os.PathLike) -> Path:
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format=out.suffix.lstrip(".") or "png")
    plt.close(fig)
    return out


def plot_validation_overlay(example: dict, out: str | os.PathLike, title: str = "") -> Path:
    """FLAIR and T1ce of one validation case with the reference and the predicted labels.

    ``example``: ``case_id``, ``image`` (4, X, Y, Z), ``tissue`` (X, Y, Z) reference tissue codes,
    ``pred`` (3, X, Y, Z) boolean region masks; shown at the axial slice with most tumour.
    """
    from brats_psp.labels import regions_to_tissue

    image, ref = example["image"], example["tissue"]
    pred = regions_to_tissue(example["pred"])
    z = int(np.argmax((ref > 0).sum(axis=(0, 1)))) if ref.any() else image.shape[-1] // 2
    flair, t1ce = image[MODALITIES.index("flair"), :, :, z], image[MODALITIES.index("t1ce"), :, :, z]
    fig, axes = plt.subplots(1, 4, figsize=(11, 3.2))
    show_slice(axes[0], flair, title=f"{example['case_id']} FLAIR z={z}")
    show_slice(axes[1], t1ce, title="T1ce")
    show_slice(axes[2], flair, ref[:, :, z], title="reference")
    show_slice(axes[3], flair, pred[:, :, z], title=f"prediction {title}".strip())
    fig.tight_layout()
    return save_figure(fig, out)


def plot_learning_curves(history: list[dict[str, float]], out: str | os.PathLike) -> Path:
    """Training losses and validation Dice per epoch."""
    epochs = [h["epoch"] + 1 for h in history]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in ("train/loss", "train/seg_loss", "train/class_loss"):
        ax_loss.plot(epochs, [h.get(key, np.nan) for h in history], marker=".", label=key)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=8)
    for key in ("val/dice_WT", "val/dice_TC", "val/dice_ET", "val/dice_mean"):
        pts = [(e, h[key]) for e, h in zip(epochs, history) if key in h]
        if pts:
            ax_dice.plot(*zip(*pts), marker="o", label=key)
    ax_dice.set_xlabel("epoch")
    ax_dice.set_ylabel("Dice")
    ax_dice.set_ylim(0, 1)
    ax_dice.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out)


def plot_prediction(case_dir: str | os.PathLike, prediction: str | os.PathLike, out: str | os.PathLike, layout: str = "auto") -> Path:
    """A case's four contrasts and the predicted labels on FLAIR, at the slice with most predicted tumour.

    Both are brought to RAS with nibabel (no resampling), so the figure reads like the others.
    """
    import nibabel as nib

    from brats_psp.data.transforms import load_case_arrays
    from brats_psp.labels import release_to_tissue

    (case,) = discover_cases(case_dir, layout).cases[:1]
    image, _, ref = load_case_arrays(case, with_label=False)
    ornt = nib.orientations.ornt_transform(nib.io_orientation(ref.affine), nib.orientations.axcodes2ornt("RAS"))
    image = np.stack([nib.orientations.apply_orientation(c, ornt) for c in image])
    pred_img = nib.load(str(prediction))
    pred = nib.orientations.apply_orientation(np.asarray(pred_img.dataobj), ornt)
    tissue = release_to_tissue(pred, case.labels)
    z = int(np.argmax((tissue > 0).sum(axis=(0, 1)))) if tissue.any() else image.shape[-1] // 2
    fig, axes = plt.subplots(1, len(MODALITIES) + 1, figsize=(2.6 * (len(MODALITIES) + 1), 3.0))
    for ax, (c, modality) in zip(axes, enumerate(MODALITIES)):
        show_slice(ax, image[c, :, :, z], title=f"{MODALITY_TITLES[modality]}, z={z}")
    show_slice(axes[-1], image[MODALITIES.index("flair"), :, :, z], tissue[:, :, z], title="prediction: NCR red, ED green, ET yellow")
    fig.suptitle(case.case_id, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out)
