"""Score prediction/reference pairs with the official BraTS 2023 evaluation (``brats-evaluation``).

    python tests/official_brats_eval.py PRED.nii.gz REF.nii.gz [PRED REF ...]

Prints JSON: one ``{"wt": dice, "tc": dice, "et": dice}`` per pair, the whole-volume Dice
(panoptica's ``global_bin_dsc``) of the package's bundled ``gli`` config (2023 labels).
Imports only ``brats_evaluation`` and ``panoptica``, so it runs in any environment that has
them (``BRATS_EVAL_PYTHON``): the package pins numpy < 2.3, which this project's own
environment may not satisfy.
"""

from __future__ import annotations

import json
import sys
from importlib.resources import files

from panoptica import Panoptica_Evaluator


def main(paths: list[str]) -> None:
    config = files("brats_evaluation").joinpath("configs", "config_gli.yaml")
    evaluator = Panoptica_Evaluator.load_from_config(str(config))
    out = []
    for pred, ref in zip(paths[::2], paths[1::2]):
        results = evaluator.evaluate(pred, ref)
        out.append({region: float(results[region].to_dict(True)["global_bin_dsc"]) for region in ("wt", "tc", "et")})
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
