"""The benchmark scripts still run (on tiny inputs; no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def _run(script: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_inference_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "inference.json"
    _run("inference.py", "--config", "configs/smoke.yaml", "--repeats", "1", "--seed-depth", "18", "--seed-width", "8",
         "--shape", "64", "64", "20", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["case_shape"] == [64, 64, 20]
    assert result["slices"] > 0 and result["flops_per_volume"]["default"] > 0 and result["flops_per_volume"]["seed"] > 0
    assert 0 < result["ratios"]["network_alone_over_end_to_end"] and result["seconds"]["seed_way"][0] > 0
    assert result["peak_rss_gib"]["default_end_to_end"] > 0 and result["matmul_peak_flops_per_s"]["fp32"] > 0


def test_training_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "training.json"
    _run("training.py", "--config", "configs/smoke.yaml", "--cases", "4", "--steps", "2", "--rounds", "1", "--out", str(out),
         f"data.cache_dir={tmp_path / 'cache'}")
    result = json.loads(out.read_text())
    assert result["ratio_data_path_over_in_memory"] > 0
    assert result["preprocess_cases_per_s"]["cold"] > 0 and result["preprocess_cases_per_s"]["cached"] > 0


@pytest.mark.slow
def test_scaling_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "scaling.json"
    _run("scaling.py", "--config", "configs/smoke.yaml", "--cases", "1", "2", "--procs", "1", "--train-cases", "4",
         "--train-slices", "16", "--cache-dir", str(tmp_path / "cache"), "--out", str(out))
    result = json.loads(out.read_text())
    assert set(result["inference"]["seconds"]) == {"1", "2"} and result["training"]["1"]["slices_per_s"] > 0
