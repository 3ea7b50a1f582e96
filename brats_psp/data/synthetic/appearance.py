"""Appearance of a synthetic case: the four contrasts drawn from its tissue and lesion maps.

Built for transfer to real scans, after SynthSeg (Billot et al., Medical Image Analysis
2023): every appearance parameter is drawn per case and per contrast, over ranges wider
than real scans vary, so that a network has to rely on shape and on the few relative
contrasts that hold on every scanner. What is kept fixed (the radiological cues):

* T1: white matter brighter than grey matter, grey brighter than CSF; T2: CSF brightest;
  FLAIR: CSF dark (suppressed), grey matter above white;
* edema is bright on FLAIR and T2 (at least 1.25x the brighter normal tissue on FLAIR,
  1.2x grey matter on T2, below CSF);
* enhancement: vessels, venous sinuses, choroid plexus and dura are brighter on T1ce than
  normal tissue (1.15-3x), while on T1 they are not; enhancing tumour is brighter on T1ce
  than the edema and necrosis around it (at least 1.25x) and than itself on T1 (1.15x), but
  may be faint against white matter (1.05-2.2x, log-uniform: weak, patchy enhancement of
  a glioblastoma wall is common);
* a non-enhancing tumour core differs from edema by at least 15 % on T2 (brighter) or on
  FLAIR (darker: the T2-FLAIR mismatch sign), else nothing in the image would tell them apart.

Everything else is free within wide ranges (:data:`INTENSITY_RANGES`, relative to white
matter = 1): a necrotic core may be dark or as bright as edema on FLAIR, and in a third
of the cases (:data:`NECROSIS_MIMICS_EDEMA`) it looks like edema on every contrast, as
in many real glioblastomas (then only the enhancing wall around it tells it apart), cysts are
fluid-like (bright on T2, variably suppressed on FLAIR), blood products bright on T1,
vessels dark (flow voids) or bright. Then, per contrast:

1. partial-volume mix of CSF / grey / white matter, the structures and the lesion parts,
   each with its own heterogeneity (a smooth texture field);
2. a random monotonic non-linear intensity curve;
3. a multiplicative bias field (log-field standard deviation 0-0.2, over 30-70 mm);
4. the acquisition's resolution: slice thickness 1-6 mm (T1ce, mostly a 3D acquisition:
   1-3 mm) along one axis (mostly axial) and mild in-plane blur, as when BraTS scans
   acquired at 1-6 mm were resampled to 1 mm;
5. an imperfect skull strip: a rim of CSF or dura left outside the brain, small bites
   taken out of its surface (labels there are removed);
6. a per-scan scale and Rician noise (1-5 % of white matter), rounded to int16, >= 1
   inside the brain and 0 outside, the same mask for all four contrasts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from brats_psp.data.layouts import MODALITIES
from brats_psp.data.synthetic.grid import smooth_noise

__all__ = ["INTENSITY_RANGES", "BASE_SCALE", "CLASS_NAMES", "Appearance", "draw_appearance", "render", "class_map"]

#: (low, high) of each class's intensity per contrast, relative to white matter = 1.
#: T1ce: the non-enhancing classes take their T1 value x U(0.9, 1.15) (see draw_appearance).
INTENSITY_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "t1": {
        "csf": (0.12, 0.50), "gm": (0.55, 0.88), "ed": (0.55, 0.95), "ncr": (0.25, 0.95), "cyst": (0.10, 0.45),
        "haem": (1.00, 1.70), "net": (0.45, 0.90), "et": (0.55, 1.05), "vessel": (0.20, 1.00),
        "sinus": (0.30, 1.00), "choroid": (0.50, 0.95), "dura": (0.30, 0.90), "rim": (0.10, 0.60),
        "wmh": (0.70, 0.95),
    },
    "t1ce": {  # the enhancing classes; the others follow T1
        "gm": (0.55, 0.88), "vessel": (1.10, 3.00), "sinus": (1.30, 3.00),
        "choroid": (1.20, 2.60), "dura": (1.10, 2.50),
    },
    "t2": {
        "csf": (2.20, 5.00), "gm": (1.10, 1.50), "ed": (1.30, 2.80), "ncr": (1.20, 3.50), "cyst": (2.00, 4.50),
        "haem": (0.30, 1.60), "net": (1.30, 3.00), "et": (1.00, 2.20), "vessel": (0.20, 1.20),
        "sinus": (0.30, 1.50), "choroid": (1.00, 2.50), "dura": (0.40, 1.50), "rim": (0.40, 4.00),
        "wmh": (1.30, 2.50),
    },
    "flair": {
        "csf": (0.10, 0.60), "gm": (1.10, 1.60), "ed": (1.30, 2.60), "ncr": (0.50, 2.60), "cyst": (0.25, 1.80),
        "haem": (0.60, 1.80), "net": (1.00, 2.40), "et": (1.00, 2.20), "vessel": (0.40, 1.20),
        "sinus": (0.40, 1.50), "choroid": (0.80, 2.00), "dura": (0.80, 2.00), "rim": (0.15, 1.50),
        "wmh": (1.30, 2.40),
    },
}
_ENHANCING = ("vessel", "sinus", "choroid", "dura")

#: Codes of a case's appearance-class map (:func:`class_map`): what each voxel is drawn as.
#: 0 is outside the skull strip; the lesion classes come last.
CLASS_NAMES: tuple[str, ...] = (
    "background", "csf", "gm", "wm", "wmh", "vessel", "sinus", "choroid", "dura", "rim",
    "ed", "et", "ncr", "cyst", "haem", "net",
)

#: Probability that a case's necrosis has edema's intensities (x 0.9-1.1) on every contrast.
NECROSIS_MIMICS_EDEMA = 0.35

#: Enhancing tumour on T1ce, relative to white matter: log-uniform over this range, then at
#: least 1.25x the edema and necrosis on T1ce and 1.15x its own T1 value.
ET_T1CE_RANGE = (1.05, 2.2)

#: Typical scanner value of white matter, per contrast (x a per-scan factor in [0.4, 2.5]).
BASE_SCALE: dict[str, float] = {"t1": 950.0, "t1ce": 1250.0, "t2": 420.0, "flair": 700.0}


@dataclass
class Appearance:
    """Per-contrast draws of one case (all relative to white matter = 1 before ``scale``)."""

    means: dict[str, dict[str, float]]  # contrast -> class -> intensity
    spread: dict[str, dict[str, float]]  # contrast -> class -> heterogeneity (relative std)
    scale: dict[str, float]  # contrast -> scanner value of white matter
    noise: dict[str, float]  # contrast -> noise std, relative to white matter


def draw_appearance(rng: np.random.Generator) -> Appearance:
    """Draw every class's intensity per contrast under the radiological constraints above."""
    u = rng.uniform
    means: dict[str, dict[str, float]] = {}
    for modality in ("t1", "t2", "flair"):
        means[modality] = {"wm": 1.0, **{k: float(u(*r)) for k, r in INTENSITY_RANGES[modality].items()}}
    # T1ce: a T1 with contrast: non-enhancing classes near their T1 value, enhancing ones bright.
    t1ce = {k: v * float(u(0.9, 1.15)) for k, v in means["t1"].items()}
    t1ce.update({k: float(u(*r)) for k, r in INTENSITY_RANGES["t1ce"].items()})
    t1ce["wm"] = 1.0
    flow_void = rng.random() < 0.25  # some vessels stay dark after contrast
    if flow_void:
        t1ce["vessel"] = float(u(0.2, 0.9))
    means["t1ce"] = t1ce
    # Constraints that must hold whatever was drawn.
    t2 = means["t2"]
    t2["ed"] = min(max(t2["ed"], 1.2 * t2["gm"]), 0.95 * t2["csf"])
    flair = means["flair"]
    flair["ed"] = max(flair["ed"], 1.25 * max(1.0, flair["gm"]))
    t1 = means["t1"]
    t1["ed"] = min(t1["ed"], 0.97)
    # A non-enhancing tumour core must differ from edema somewhere (else its label has no cue):
    # at least 15 % on T2 (brighter) or on FLAIR (darker: the T2-FLAIR mismatch sign).
    if t2["net"] < 1.15 * t2["ed"] and flair["net"] > 0.87 * flair["ed"]:
        if rng.random() < 0.5:
            t2["net"] = 1.15 * t2["ed"] * float(u(1.0, 1.3))
        else:
            flair["net"] = 0.87 * flair["ed"] * float(u(0.7, 1.0))
    if rng.random() < NECROSIS_MIMICS_EDEMA:  # necrosis as bright as edema everywhere
        for modality in MODALITIES:
            means[modality]["ncr"] = means[modality]["ed"] * float(u(0.9, 1.1))
    for key in _ENHANCING:
        if not (key == "vessel" and flow_void):
            t1ce[key] = max(t1ce[key], 1.15 * max(1.0, t1ce["gm"]))
    # Enhancing tumour: brighter than what surrounds it after contrast, and than before it.
    et = float(np.exp(u(np.log(ET_T1CE_RANGE[0]), np.log(ET_T1CE_RANGE[1]))))
    t1ce["et"] = max(et, 1.25 * max(t1ce["ed"], t1ce["ncr"], t1ce["net"]), 1.15 * means["t1"]["et"])
    spread = {m: {k: float(u(0.03, 0.2) if k in ("csf", "gm", "wm") else u(0.0, 0.12)) for k in means[m]} for m in MODALITIES}
    scale = {m: BASE_SCALE[m] * float(np.exp(u(np.log(0.4), np.log(2.5)))) for m in MODALITIES}
    noise = {m: float(np.exp(u(np.log(0.01), np.log(0.05)))) for m in MODALITIES}
    return Appearance(means, spread, scale, noise)


def _curve(rng: np.random.Generator, x: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """A random monotonic intensity curve of ``x`` (values relative to white matter)."""
    ref = float(np.percentile(x[inside][::7], 99.0)) if inside.any() else 1.0
    t = x / np.float32(max(ref, 1e-6))
    if rng.random() < 0.5:
        y = np.power(np.maximum(t, 0.0), np.float32(np.exp(rng.uniform(-0.3, 0.3))))
    else:  # piecewise linear, increasing, through random knots; linear beyond the last
        knots = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
        steps = rng.dirichlet(np.full(4, 8.0))  # slopes about 0.6-1.4 of the identity
        values = np.concatenate([[0.0], np.cumsum(steps)])
        slope = steps[-1] / 0.25
        y = np.interp(t, knots, values).astype(np.float32)
        beyond = t > 1.0
        y[beyond] = 1.0 + (t[beyond] - 1.0) * np.float32(slope)
    return (y * np.float32(ref)).astype(np.float32)


def _blur(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, max_thickness: float = 6.0) -> np.ndarray:
    """Slice thickness (up to ``max_thickness`` mm) and in-plane blur, normalised inside ``mask``
    (no darkening at the edge)."""
    sigma = np.zeros(3)
    if rng.random() < 0.65:  # acquired with thick slices, then resampled to 1 mm
        axis = int(rng.choice(3, p=[0.2, 0.2, 0.6]))
        sigma[axis] = rng.uniform(1.0, max_thickness) / 2.355
    if rng.random() < 0.5:
        sigma = np.maximum(sigma, rng.uniform(0.2, 0.8))
    if not sigma.any():
        return img
    m = mask.astype(np.float32)
    num = ndi.gaussian_filter(img * m, sigma, truncate=2.5)
    den = ndi.gaussian_filter(m, sigma, truncate=2.5)
    return np.where(mask, num / np.maximum(den, 1e-3), 0.0).astype(np.float32)


def skull_strip_errors(rng: np.random.Generator, brain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An imperfect skull strip: ``(rim, bites)`` bool maps.

    ``rim``: voxels just outside the brain left in (CSF or dura, 1-2 voxels, in patches;
    half of the cases); ``bites``: voxels of the brain's outer 1-3 voxels taken out
    (a third of the cases).
    """
    shape = brain.shape
    rim = np.zeros(shape, bool)
    bites = np.zeros(shape, bool)
    if rng.random() < 0.5:
        grown = ndi.binary_dilation(brain, iterations=int(rng.integers(1, 3)))
        f = smooth_noise(rng, shape, 15.0)
        rim = grown & ~brain & (f > np.quantile(f[::4, ::4, ::4], 1.0 - rng.uniform(0.2, 0.8)))
    if rng.random() < 0.33:
        outer = brain & ~ndi.binary_erosion(brain, iterations=int(rng.integers(1, 4)))
        f = smooth_noise(rng, shape, 10.0)
        bites = outer & (f > np.quantile(f[::4, ::4, ::4], 1.0 - rng.uniform(0.05, 0.25)))
    rim[[0, -1], :, :] = rim[:, [0, -1], :] = rim[:, :, [0, -1]] = False
    return rim, bites


def render(
    rng: np.random.Generator,
    app: Appearance,
    fractions: dict[str, np.ndarray],
    overlays: list[dict[str, np.ndarray]],
    texture: np.ndarray,
    mask: np.ndarray,
) -> dict[str, np.ndarray]:
    """The four contrasts (int16, the shape of ``mask``) of a case.

    Args:
        fractions: ``csf``, ``gm``, ``wm`` partial-volume fractions (sum 1 in the brain).
        overlays: groups of class -> soft weight, in drawing order (a later group covers an
            earlier one): the structures (the ``rim`` of an imperfect skull strip among
            them), then the lesion parts. Within a group the weights mix (partial volume).
        texture: smooth zero-mean field (heterogeneity of each class).
        mask: the voxels that are non-zero in every contrast.
    """
    images: dict[str, np.ndarray] = {}
    fine = smooth_noise(rng, mask.shape, float(rng.uniform(1.5, 3.0)))  # healthy-tissue micro-texture
    # Per group, the share it covers and its weights' normaliser: the same for every contrast.
    covers = []
    for group in overlays:
        total = np.zeros(mask.shape, np.float32)
        for weight in group.values():
            total += weight
        norm = 1.0 / np.maximum(total, np.float32(1.0))
        covers.append((1.0 - total * norm, norm))
    for modality in MODALITIES:
        mean, spread = app.means[modality], app.spread[modality]
        img = np.zeros(mask.shape, np.float32)
        for cls in ("csf", "gm", "wm"):
            img += fractions[cls] * np.float32(mean[cls]) * (1.0 + np.float32(spread[cls]) * fine)
        for group, (keep, norm) in zip(overlays, covers):
            mix = np.zeros(mask.shape, np.float32)
            for cls, weight in group.items():
                mix += weight * np.float32(mean[cls]) * (1.0 + np.float32(spread[cls] * 2.0) * texture)
            img = img * keep + mix * norm
        img = _curve(rng, img, mask)
        bias = np.exp(np.float32(rng.uniform(0.0, 0.2)) * smooth_noise(rng, mask.shape, float(rng.uniform(30.0, 70.0))))
        img *= bias
        # BraTS T1ce is mostly a 3D (about 1 mm) acquisition; T1, T2 and FLAIR often 2D with thick slices.
        img = _blur(rng, img, mask, 3.0 if modality == "t1ce" else 6.0)
        img *= np.float32(app.scale[modality])
        sd = np.float32(app.noise[modality] * app.scale[modality])
        real = img + sd * rng.standard_normal(img.shape, dtype=np.float32)
        imag = sd * rng.standard_normal(img.shape, dtype=np.float32)
        out = np.sqrt(real * real + imag * imag)
        np.rint(out, out=out)
        np.clip(out, 1, np.iinfo(np.int16).max, out=out)
        out[~mask] = 0
        images[modality] = out.astype(np.int16)
    return images


def class_map(
    fractions: dict[str, np.ndarray], overlays: list[dict[str, np.ndarray]], mask: np.ndarray, lesion: np.ndarray
) -> np.ndarray:
    """uint8 map of :data:`CLASS_NAMES` codes: the class each voxel is mostly drawn as.

    The healthy tissue's largest fraction, covered by each overlay group (the structures,
    then the lesion parts, as in :func:`render`) by that group's largest weight: the
    structures where their weights reach one half, the lesion parts exactly where ``lesion``
    (the voxels labelled tumour) is set, so that a voxel is drawn as tumour if and only if it
    is labelled tumour; 0 outside ``mask``. With it a training batch can draw a
    new appearance for the same anatomy (:mod:`brats_psp.data.rerender`).
    """
    tissue = ("csf", "gm", "wm")
    codes = np.zeros(mask.shape, np.uint8)
    best = np.argmax(np.stack([fractions[k] for k in tissue]), axis=0)
    codes[...] = np.array([CLASS_NAMES.index(k) for k in tissue], np.uint8)[best]
    for n, group in enumerate(overlays):
        names = list(group)
        stack = np.stack([group[k] for k in names])
        covered = lesion if n == len(overlays) - 1 else stack.sum(axis=0) >= 0.5
        top = np.array([CLASS_NAMES.index(k) for k in names], np.uint8)[np.argmax(stack, axis=0)]
        codes[covered] = top[covered]
    codes[~mask] = 0
    return codes
