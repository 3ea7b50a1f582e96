"""File layouts of the BraTS releases: how the four contrasts and the label of a case are named.

The network always sees the contrasts in :data:`MODALITIES` order (T1, T1ce, T2, FLAIR),
whatever a release calls them (t1ce = t1c = T1gd, flair = t2f, t1 = t1n, t2 = t2w).

==========  ============================================  =================================
layout      one case                                      label convention
==========  ============================================  =================================
brats2021   ``<id>/<id>_{t1,t1ce,t2,flair,seg}.nii.gz``   1 NCR, 2 ED, 4 ET (2017-2021)
brats2023   ``<id>/<id>-{t1n,t1c,t2w,t2f,seg}.nii.gz``    1 NCR, 2 ED, 3 ET (2023+)
msd         ``imagesTr/<id>.nii.gz`` 4D + ``labelsTr/``   1 ED, 2 NCR, 3 ET (Task01)
==========  ============================================  =================================
"""

from __future__ import annotations

from dataclasses import dataclass

#: The fixed channel order the network sees.
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")

#: NIfTI extensions accepted, longest first so ``.nii.gz`` wins over ``.nii``.
NIFTI_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii")

#: Other image formats read as input (through SimpleITK): NRRD and MetaImage, single file or header.
ITK_EXTENSIONS: tuple[str, ...] = (".nrrd", ".nhdr", ".mha", ".mhd")

#: Every image extension discovery recognises.
IMAGE_EXTENSIONS: tuple[str, ...] = NIFTI_EXTENSIONS + ITK_EXTENSIONS


@dataclass(frozen=True)
class Layout:
    """How one release names the files of a case.

    Attributes:
        name: layout name, also the name of its label convention in :mod:`brats_psp.labels`.
        separator: between the case id and the suffix (``_`` or ``-``); empty for 4D layouts.
        suffixes: modality (in :data:`MODALITIES` terms) -> file suffix, for one-file-per-contrast layouts.
        label_suffix: suffix of the segmentation file.
        channel_order: for 4D layouts, the modality held by each channel of the image.
    """

    name: str
    separator: str = ""
    suffixes: tuple[tuple[str, str], ...] = ()
    label_suffix: str = ""
    channel_order: tuple[str, ...] = ()

    @property
    def is_4d(self) -> bool:
        return bool(self.channel_order)

    def filename(self, case_id: str, modality: str, ext: str = ".nii.gz") -> str:
        """File name of ``modality`` (or ``"seg"``) for ``case_id`` in a one-file-per-contrast layout."""
        suffix = self.label_suffix if modality == "seg" else dict(self.suffixes)[modality]
        return f"{case_id}{self.separator}{suffix}{ext}"


LAYOUTS: dict[str, Layout] = {
    "brats2021": Layout(
        "brats2021",
        separator="_",
        suffixes=(("t1", "t1"), ("t1ce", "t1ce"), ("t2", "t2"), ("flair", "flair")),
        label_suffix="seg",
    ),
    "brats2023": Layout(
        "brats2023",
        separator="-",
        suffixes=(("t1", "t1n"), ("t1ce", "t1c"), ("t2", "t2w"), ("flair", "t2f")),
        label_suffix="seg",
    ),
    "msd": Layout("msd", channel_order=("flair", "t1", "t1ce", "t2")),
}


def get_layout(name: str) -> Layout:
    """Return the layout called ``name``."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown layout {name!r}; expected one of {sorted(LAYOUTS)}") from None
