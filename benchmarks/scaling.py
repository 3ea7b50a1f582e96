"""Scaling: the infer stage over 1, 4 and 16 cases, and training with torchrun at 1 and 2 processes.

    python benchmarks/scaling.py [--cases 1 4 16] [--procs 1 2] [--checkpoint CKPT] [--infer-workers 0 8]

* **inference**: ``python pipelines/run.py infer`` as a user runs it (a fresh process each
  time, so start-up is included) on 1, 4 and 16 synthetic BraTS-sized cases. A straight line
  through the points gives the start-up paid once and the time per case (its inverse: the
  cases per second once running); the table shows how far each point is from it. With
  ``--infer-workers 0 8`` the same for each ``infer --workers`` value, alternating.
* **training**: ``torchrun --nproc_per_node N pipelines/run.py train`` for one epoch (no
  validation) on the built-in set; slices/s as the run reports it (``train/slices_per_s``,
  all processes together). On a CPU machine the processes share its cores (gloo).

Prints a table and writes ``benchmarks/results/scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import ROOT, machine, section, table, write_result  # noqa: I001

from brats_psp.checkpoint import save_checkpoint
from brats_psp.config import config_to_dict, load_config
from brats_psp.data.release import write_dataset
from brats_psp.data.synthetic import case_id_for
from brats_psp.data.transforms import preprocessing_params
from brats_psp.networks import build_network


def random_checkpoint(path: Path, config: str) -> Path:
    """The config's network with random weights, as a checkpoint (time does not depend on weights)."""
    cfg = load_config(config)
    torch.manual_seed(0)
    net = build_network(cfg.model, cfg.data.in_channels)
    state = {"model": net.state_dict(), "config": config_to_dict(cfg), "preprocessing": preprocessing_params(cfg.data.spacing, cfg.data.intensity_percentiles), "run_id": None}
    return save_checkpoint(path, state)


def run(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--checkpoint", help="a trained checkpoint (default: the config's network with random weights)")
    ap.add_argument("--cases", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--procs", type=int, nargs="*", default=[1, 2], help="torchrun process counts (none: no training runs)")
    ap.add_argument("--infer-workers", type=int, nargs="+", default=[0], help="infer --workers values, each timed on every case count")
    ap.add_argument("--train-cases", type=int, default=10, help="built-in cases for the training runs")
    ap.add_argument("--train-slices", type=int, default=640, help="slices in the one training epoch")
    ap.add_argument("--cache-dir", help="data.cache_dir for the training runs (default: the config's)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/scaling.json)")
    args = ap.parse_args(argv)
    python = sys.executable
    result: dict[str, Any] = {"config": args.config}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = Path(args.checkpoint) if args.checkpoint else random_checkpoint(tmp / "model.pt", args.config)
        with section(f"writing {max(args.cases)} synthetic BraTS 2023 cases"):
            write_dataset(tmp / "all", max(args.cases), seed=4242, fmt="brats2023", workers=os.cpu_count() or 1)
        for n in args.cases:
            folder = tmp / f"in{n}"
            folder.mkdir()
            for i in range(n):
                cid = case_id_for(i, "brats2023")
                shutil.copytree(tmp / "all" / cid, folder / cid, copy_function=os.link)  # hard links: no copy
        seconds: dict[int, dict[int, float]] = {w: {} for w in args.infer_workers}
        for n in args.cases:
            for w in args.infer_workers:  # alternating, so drift in the machine's load hits each
                with section(f"infer on {n} case(s), --workers {w}"):
                    out = tmp / f"out{n}_{w}"
                    seconds[w][n] = run([python, "pipelines/run.py", "infer", "--model", str(ckpt), "--input", str(tmp / f"in{n}"),
                                         "--output", str(out), "--workers", str(w)])
                    shutil.rmtree(out)
                    print(f"   {seconds[w][n]:.1f} s")
        fits: dict[int, dict[str, Any]] = {}
        for w, by_n in seconds.items():
            ns = np.array(sorted(by_n), dtype=float)
            ts = np.array([by_n[int(n)] for n in ns])
            per_case, startup = np.polyfit(ns, ts, 1) if len(ns) > 1 else (float("nan"), float("nan"))
            fits[w] = {"seconds": {str(k): v for k, v in by_n.items()}, "fit_startup_s": startup,
                       "fit_per_case_s": per_case, "fit_cases_per_s": 1 / per_case}
            for n in ns:
                t = by_n[int(n)]
                rows.append([f"infer --workers {w}, {int(n)} case(s)", t, t / n, startup + per_case * n, "s (fit: start-up + n × per case)"])
            rows.append([f"infer --workers {w}, once running", 1 / per_case, "", "", "cases/s (1 / fit's per case)"])
        # one --workers value: the layout of the results before --infer-workers
        result["inference"] = next(iter(fits.values())) if len(fits) == 1 else {f"workers_{w}": fit for w, fit in fits.items()}

        train = {}
        # The runs' artifacts go under the temporary folder too: MLflow's default artifact root for a
        # SQLite store is ./mlruns of the working directory, the checkout.
        from mlflow import MlflowClient

        MlflowClient(f"sqlite:///{tmp}/mlflow.db").create_experiment(
            load_config(args.config).tracking.experiment, artifact_location=(tmp / "mlruns").as_uri()
        )
        for p in args.procs:
            with section(f"train, torchrun --nproc_per_node {p}"):
                out = tmp / f"train{p}"
                overrides = [
                    f"data.demo_cases={args.train_cases}", "train.epochs=1", f"train.slices_per_epoch={args.train_slices}",
                    "train.val_every=1000", f"train.output_dir={out}", "tracking.log_model=false",
                    f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"train.threads={max(1, (os.cpu_count() or 1) // p)}",
                ] + ([f"data.cache_dir={args.cache_dir}"] if args.cache_dir else [])
                cmd = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={p}", "pipelines/run.py", "train",
                       "--config", args.config, *overrides]
                wall = run(cmd)
                history = json.loads(next(out.glob("*/history.json")).read_text())
                train[p] = {"slices_per_s": history[-1]["train/slices_per_s"], "wall_s": wall}
                print(f"   {train[p]['slices_per_s']:.1f} slices/s")
        result["training"] = {str(k): v for k, v in train.items()}
        base = train[args.procs[0]]["slices_per_s"] if train else float("nan")
        for p, r in train.items():
            rows.append([f"train, {p} process(es)", r["slices_per_s"], r["slices_per_s"] / base, "", "slices/s (× vs first)"])
    print()
    print(table(rows, ["measurement", "value", "per case / ratio", "fit", "unit"]))
    for w, fit in fits.items():
        print(f"\ninfer --workers {w}: start-up {fit['fit_startup_s']:.1f} s paid once, then {fit['fit_per_case_s']:.2f} s per case; {machine()['cpu']}")
    write_result("scaling", result, args.out)
    return result


if __name__ == "__main__":
    main()
