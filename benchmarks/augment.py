"""The batch augmentations' cost: milliseconds per batch, and against another commit's version.

    python benchmarks/augment.py [--cases 10] [--batches 60] [--rounds 6] [--against REV] [--beside KEY=VALUE ...] [key=value ...]

Reads ``--batches`` training batches through the real loader (built-in cases, cache, sampler,
crops), keeps them in memory, then times :class:`brats_psp.data.augment.BatchAugment` on them
(batch ``i`` with seed ``i``). With ``--against REV`` (a git revision, for example ``HEAD~2``)
the ``brats_psp/data/augment.py`` of that revision is loaded beside this one, both run on the
same batches with the same seeds, alternating in every round so drift in the machine's load hits
both; the script checks that they give the same outputs (to 1e-4) and prints the ratio of their
times. With ``--beside data.rerender=0.5`` (data overrides) this version with those settings is
timed beside it the same way (the outputs differ, so only the times are compared): the cost of
an option. Prints a table and writes ``benchmarks/results/augment.json``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from common import machine, section, table, write_result  # noqa: I001

from brats_psp.config import load_config
from brats_psp.data.augment import BatchAugment
from brats_psp.data.builtin import classes_folder_for, ensure_demo_dataset
from brats_psp.data.cache import split_cases
from brats_psp.data.preprocess import preprocess_dataset
from brats_psp.runtime import setup_runtime
from brats_psp.training import build_train_loader, seed_loader_epoch, to_device

ROOT = Path(__file__).resolve().parents[1]


def module_at(rev: str, tmp: Path) -> Any:
    """``brats_psp/data/augment.py`` as it is at git revision ``rev``, imported under another name."""
    source = subprocess.run(["git", "show", f"{rev}:brats_psp/data/augment.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = tmp / "augment_at_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("augment_at_rev", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--cases", type=int, default=10, help="built-in synthetic cases to read batches from")
    ap.add_argument("--batches", type=int, default=60, help="batches timed per round")
    ap.add_argument("--rounds", type=int, default=6, help="rounds (alternating with --against)")
    ap.add_argument("--against", help="git revision whose augment.py is timed beside this one")
    ap.add_argument("--beside", nargs="+", metavar="KEY=VALUE", help="data overrides of a second configuration timed beside this one")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/augment.json)")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    cfg = load_config(args.config, [f"data.demo_cases={args.cases}", "data.folds=5", *args.overrides])
    runtime = setup_runtime(cfg.train.device, cfg.train.precision, cfg.train.threads)
    print(f"{machine()['cpu']}, {torch.get_num_threads()} threads, batch {cfg.train.batch_size}")
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        with section(f"{args.batches} batches from {args.cases} built-in cases"):
            raw = ensure_demo_dataset(cfg.data)
            preprocess_dataset(raw, tmp / "cache", cfg.data, progress=False, classes_dir=classes_folder_for(raw))
            train_dirs, _ = split_cases(tmp / "cache", cfg.data.fold)
            cfg.train.slices_per_epoch = args.batches * cfg.train.batch_size
            loader_cfg = copy.deepcopy(cfg)
            if args.beside:  # the loader carries the class maps when either configuration draws from them
                beside = load_config(args.config, [f"data.demo_cases={args.cases}", "data.folds=5", *args.overrides, *args.beside])
                loader_cfg.data.rerender = max(cfg.data.rerender, beside.data.rerender)
            loader = build_train_loader(loader_cfg, train_dirs, runtime)
            seed_loader_epoch(loader, 0, cfg, runtime)
            batches = [to_device(b, runtime) for b in loader]  # float32 on the device, as train_step sees them
        versions = {"this": BatchAugment(cfg.data)}
        if args.beside:
            versions[" ".join(args.beside)] = BatchAugment(beside.data)
        if args.against:
            versions[args.against] = module_at(args.against, tmp).BatchAugment(cfg.data)
            with section(f"same outputs as {args.against}"):
                for i, batch in enumerate(batches[:10]):
                    ours, theirs = versions["this"](batch, i), versions[args.against](batch, i)
                    for key in ("image", "label", "presence"):
                        diff = float((ours[key] - theirs[key]).abs().max())
                        if diff > 1e-4:
                            raise SystemExit(f"batch {i}: {key} differs from {args.against} by {diff:.3g}")
        for augment in versions.values():  # warm-up
            for i, batch in enumerate(batches[:3]):
                augment(batch, i)
        times: dict[str, list[float]] = {name: [] for name in versions}
        for r in range(args.rounds):
            for name, augment in versions.items():
                start = time.perf_counter()
                for i, batch in enumerate(batches):
                    augment(batch, i)
                times[name].append(1000.0 * (time.perf_counter() - start) / len(batches))
            print(f"   round {r + 1}: " + ", ".join(f"{name} {ms[-1]:.1f} ms/batch" for name, ms in times.items()))

    mean = {name: sum(ms) / len(ms) for name, ms in times.items()}
    result: dict[str, Any] = {"config": args.config, "overrides": args.overrides, "cases": args.cases, "batches": args.batches,
                              "batch_size": cfg.train.batch_size, "threads": torch.get_num_threads(), "ms_per_batch": times}
    rows = [[f"augmentation, {name}", value, "ms/batch"] for name, value in mean.items()]
    if args.against:
        result["against"] = args.against
        result["ratio_against_over_this"] = mean[args.against] / mean["this"]
        rows.append([f"ratio {args.against} / this", result["ratio_against_over_this"], "(> 1: this is faster)"])
    if args.beside:
        name = " ".join(args.beside)
        result["beside"] = args.beside
        result["ratio_beside_over_this"] = mean[name] / mean["this"]
        rows.append([f"ratio {name} / this", result["ratio_beside_over_this"], "(> 1: the option costs)"])
    print()
    print(table(rows, ["measurement", "value", "unit"]))
    write_result("augment", result, args.out)
    return result


if __name__ == "__main__":
    main()
