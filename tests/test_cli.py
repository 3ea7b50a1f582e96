"""The command line: every stage's help, and what answering it costs (no heavy import)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

STAGES = ["demo-data", "preprocess", "train", "calibrate", "infer", "evaluate", "compare", "promote", "show-data", "show-prediction", "export", "sync-mlflow"]


def _imported_modules(*args: str) -> tuple[str, set[str]]:
    """stdout of ``run.py ARGS`` and the top-level packages it imported (``python -X importtime``)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", str(REPO / "pipelines" / "run.py"), *args],
        capture_output=True, text=True, timeout=120, check=True,
    )
    names = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return proc.stdout, names


@pytest.mark.parametrize("args", [["--help"], *[[s, "--help"] for s in STAGES]], ids=lambda a: " ".join(a))
def test_help_answers_without_importing_torch_monai_or_mlflow(args: list[str]) -> None:
    out, modules = _imported_modules(*args)
    assert out.startswith("usage: ")
    assert not {"torch", "monai", "mlflow", "scipy"} & modules, sorted({"torch", "monai", "mlflow", "scipy"} & modules)


def test_infer_from_a_checkpoint_file_never_imports_mlflow_or_what_monai_probes(tmp_path) -> None:
    """MONAI's `import monai` would pull mlflow in through monai.handlers, and scipy.signal,
    pandas, matplotlib, sklearn and more through subpackages brats_psp never uses
    (brats_psp._monai hides them while MONAI loads); a checkpoint file needs none of them, so
    `infer` never loads them (the rim hull's convex hulls are its own, not scipy.spatial's). The stages that track and plot still get the real packages afterwards, in the same
    process."""
    from tests.conftest import untrained_checkpoint, write_case

    ckpt = untrained_checkpoint(tmp_path / "model.pt")
    write_case(tmp_path / "cases", "brats2021", "BraTS2021_00000")
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['run.py', 'infer', '--model', {str(ckpt)!r}, '--input', {str(tmp_path / 'cases')!r}, '--output', {str(tmp_path / 'out')!r}]\n"
        f"try:\n    runpy.run_path({str(REPO / 'pipelines' / 'run.py')!r}, run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "from brats_psp._monai import HIDDEN_WHILE_MONAI_LOADS as hidden\n"
        "print('monai' in sys.modules, [m for m in hidden if m in sys.modules], len(hidden))\n"
        "import mlflow.tracking, pandas, matplotlib.pyplot, scipy.signal, scipy.spatial\n"
        "print(mlflow.tracking.MlflowClient.__name__, pandas.DataFrame.__name__, callable(matplotlib.pyplot.figure), callable(scipy.signal.hilbert), scipy.spatial.ConvexHull.__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["True [] 9", "MlflowClient DataFrame True True ConvexHull"], proc.stdout
    assert (tmp_path / "out" / "BraTS2021_00000.nii.gz").is_file()
