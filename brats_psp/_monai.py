"""Import MONAI without importing MLflow: imported by every brats_psp module that uses MONAI,
before its first ``monai`` import.

``import monai`` loads every MONAI subpackage (``load_submodules`` in ``monai/__init__.py``;
its ``pkgutil.walk_packages`` imports each package in order to walk it, ``monai.handlers``
included, although MONAI means to exclude it), and ``monai.handlers``' MLflow handler imports
mlflow: about a second of ``infer``'s start-up (``python -X importtime``) for a handler that
brats_psp never uses. So while MONAI loads, mlflow is hidden (a ``None`` entry in
``sys.modules`` makes its import raise ImportError, which MONAI's ``optional_import`` turns
into a placeholder), unless it is imported already; the stages that track import the real
one afterwards (:mod:`brats_psp.tracking`).
"""

from __future__ import annotations

import sys

if "monai" not in sys.modules and "mlflow" not in sys.modules:
    sys.modules["mlflow"] = None  # type: ignore[assignment]
    try:
        import monai  # noqa: F401
    finally:
        if "mlflow" in sys.modules and sys.modules["mlflow"] is None:
            del sys.modules["mlflow"]
