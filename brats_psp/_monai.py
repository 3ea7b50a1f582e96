"""Import MONAI without the optional packages brats_psp never uses through it: imported by every
brats_psp module that uses MONAI, before its first ``monai`` import.

``import monai`` loads every MONAI subpackage (``load_submodules`` in ``monai/__init__.py``;
its ``pkgutil.walk_packages`` imports each package in order to walk it, ``monai.handlers``
included, although MONAI means to exclude it), and with them the optional packages those
subpackages probe at import time (``python -X importtime``, 2 cores, PyTorch 2.13 CPU):

- ``mlflow``: ``monai.handlers``' MLflow handler, about a second;
- ``scipy.signal`` (and with it ``scipy.stats``): ``monai.data.ultrasound_confidence_map``;
- ``pandas`` (and ``pyarrow``): ``monai.utils.profiling`` and MONAI's CSV datasets;
- ``matplotlib``: ``monai.utils.jupyter_utils`` and ``monai.visualize``;
- ``sklearn``: ``monai.metrics.embedding_collapse``;
- ``scipy.spatial``, ``scipy.optimize``, ``scipy.sparse``: ``monai.metrics`` (surface distances,
  panoptic quality) and the ultrasound map again;
- ``requests``: ``monai.apps.tcia`` (downloads).

Hiding the packages after mlflow takes ``import monai`` from about 1.75 s to 0.65 s after torch
(measured on 2 cores, nothing else running). brats_psp uses none of those MONAI parts: its
transforms need ``scipy.ndimage``, which stays, and its own metrics, plots, tables and tracking
import the real packages when they need them. While MONAI loads, each of these packages that
is not imported yet is hidden (a ``None`` entry in ``sys.modules`` makes its import raise
ImportError, which MONAI's ``optional_import`` turns into a placeholder that raises only when
used); the entries are removed afterwards, so later imports get the real packages. A brats_psp
module that comes to use one of those MONAI parts must take its package off the list.
"""

from __future__ import annotations

import sys

#: Packages MONAI imports while it loads that brats_psp never uses through MONAI.
HIDDEN_WHILE_MONAI_LOADS = (
    "mlflow", "scipy.signal", "pandas", "matplotlib", "sklearn", "scipy.spatial", "scipy.optimize", "scipy.sparse", "requests",
)

if "monai" not in sys.modules:
    _hidden = [name for name in HIDDEN_WHILE_MONAI_LOADS if name not in sys.modules]
    for _name in _hidden:
        sys.modules[_name] = None  # type: ignore[assignment]
    try:
        import monai  # noqa: F401
    finally:
        for _name in _hidden:
            if _name in sys.modules and sys.modules[_name] is None:
                del sys.modules[_name]
