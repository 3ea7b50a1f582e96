"""Score prediction/reference pairs with the BraTS 2023 challenge script (``metrics.py`` of the
repository rachitsaluja/BraTS-2023-Metrics).

    BRATS2023_METRICS=/path/to/BraTS-2023-Metrics python tests/brats2023_metrics.py CHALLENGE PRED REF [PRED REF ...]

``CHALLENGE`` is one of the script's names (``BraTS-GLI``, ``BraTS-SSA``, ``BraTS-MEN``,
``BraTS-PED``, ``BraTS-MET``). Prints JSON, one entry per pair: per region (``WT``, ``TC``,
``ET``) the script's ``Num_TP``, ``Num_FP``, ``Num_FN``, ``LesionWise_Score_Dice`` and
``LesionWise_Score_HD95``. Run it with a Python that has the script's own pins (its
``requirements.txt``: Python 3.10, numpy 1.24, pandas 1.3, cc3d, nibabel) and the
``surface_distance`` folder it ships (``BRATS2023_PYTHON``); it is not this project's environment.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

KEYS = ("Num_TP", "Num_FP", "Num_FN", "LesionWise_Score_Dice", "LesionWise_Score_HD95")


def main(args: list[str]) -> None:
    sys.path.insert(0, os.environ["BRATS2023_METRICS"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import metrics

        out = []
        for pred, ref in zip(args[1::2], args[2::2]):
            table = metrics.get_LesionWiseResults(pred_file=pred, gt_file=ref, challenge_name=args[0])
            out.append({str(row["Labels"]): {k: float(row[k]) for k in KEYS} for _, row in table.iterrows()})
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
