"""Score prediction/reference pairs with the official BraTS evaluation (``brats-evaluation``).

    python tests/official_brats_eval.py PRED.nii.gz REF.nii.gz [PRED REF ...]
    python tests/official_brats_eval.py --lesionwise TASK PRED REF [PRED REF ...]

Prints JSON, one entry per pair. Without options: ``{"wt": dice, "tc": dice, "et": dice}``, the
whole-volume Dice (panoptica's ``global_bin_dsc``) of the package's bundled ``gli`` config
(2023 labels). With ``--lesionwise TASK`` (a bundled config: ``gli``, ``mets``, ``ped``, ...):
per region ``tp, fp, fn, rq, sq_dsc, sq_hd95, sq_nsd`` (NaN as null, infinity as the string
"inf"). Imports only ``brats_evaluation`` and ``panoptica``, so it runs in any environment that
has them (``BRATS_EVAL_PYTHON``): the package pins numpy < 2.3, which this project's own
environment may not satisfy.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
from importlib.resources import files

LESIONWISE_KEYS = ("tp", "fp", "fn", "rq", "sq_dsc", "sq_hd95", "sq_nsd")


def _evaluator(config: str):
    with contextlib.redirect_stdout(io.StringIO()):  # panoptica prints a banner
        from panoptica import Panoptica_Evaluator

        return Panoptica_Evaluator.load_from_config(str(files("brats_evaluation").joinpath("configs", f"config_{config}.yaml")))


def _plain(value: float) -> float | str | None:
    value = float(value)
    return None if math.isnan(value) else ("inf" if math.isinf(value) else value)


def main(args: list[str]) -> None:
    lesionwise = args[:1] == ["--lesionwise"]
    config, paths = (args[1], args[2:]) if lesionwise else ("gli", args)
    evaluator = _evaluator(config)
    out = []
    for pred, ref in zip(paths[::2], paths[1::2]):
        with contextlib.redirect_stdout(io.StringIO()):
            results = evaluator.evaluate(pred, ref)
        if lesionwise:
            out.append({region: {k: _plain(results[region].to_dict(True).get(k, math.nan)) for k in LESIONWISE_KEYS} for region in ("wt", "tc", "et")})
        else:
            out.append({region: float(results[region].to_dict(True)["global_bin_dsc"]) for region in ("wt", "tc", "et")})
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
