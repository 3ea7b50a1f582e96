"""The command line: every stage's help, and what answering it costs (no heavy import)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

STAGES = ["demo-data", "preprocess", "train", "infer", "evaluate", "compare", "promote", "show-data", "show-prediction", "export", "sync-mlflow"]


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
