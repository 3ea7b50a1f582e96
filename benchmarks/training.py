"""Training throughput: the real data path against the same steps on batches already in memory.

    python benchmarks/training.py [--cases 10] [--steps 40] [key=value ...]

* **data path**: ``train_step`` on batches from :func:`brats_psp.training.augmented_batches`
  (memory-mapped cache -> tumour-ratio sampler -> random crops -> loader (workers) -> device ->
  batch augmentations), timed from the start of the epoch's iterator, as ``train`` sees it;
* **in memory**: the same number of steps on the same batches, augmented and on the device
  beforehand (the network's step alone);
* the ratio (goal ≥ 0.9: the data path never starves the network);
* **in memory, with a moving average**: the same steps with the weights' moving average
  (``train.ema_decay``) updated after each, and its ratio to the steps without (the data path
  and in-memory steps run without one, whatever the config says);
* with ``--compare key=value ...``: the same in-memory steps of a second model built with those
  overrides (for example ``model.decoder=progressive``), alternating with the first in every
  round, and the ratio of their speeds;
* **loader alone**: the batches the loader delivers, moved to the device, without a step,
  with the samples as they travel (float16 images, uint8 masks) against float32 samples (as
  before they travelled compact), alternating;
* axial slices per cached case (an epoch over every slice of N cases is N times that);
* preprocessing throughput in cases/s, cold (an empty cache, ``--workers`` processes) and cached (a second run that
  verifies and reuses every entry).

The cases are the built-in synthetic set (``--cases`` of them, generated on first use).
Prints a table and writes ``benchmarks/results/training.json``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import machine, section, table, write_result  # noqa: I001

from brats_psp.averaging import WeightEMA
from brats_psp.config import load_config
from brats_psp.data.augment import BatchAugment
from brats_psp.data.builtin import ensure_demo_dataset
from brats_psp.data.preprocess import preprocess_dataset
from brats_psp.data.cache import split_cases
from brats_psp.runtime import setup_runtime
from brats_psp.training import Trainer, augmented_batches, build_train_loader, loader_workers, seed_loader_epoch, to_device, train_step


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--cases", type=int, default=10, help="built-in synthetic cases to preprocess and train on")
    ap.add_argument("--steps", type=int, default=40, help="training steps per measurement")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of (data path, in memory)")
    ap.add_argument("--workers", type=int, default=1, help="preprocessing worker processes (preprocess --workers)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/training.json)")
    ap.add_argument("--compare", nargs="+", metavar="KEY=VALUE", help="overrides of a second model timed on the same in-memory batches")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. train.num_workers=0)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    overrides = [f"data.demo_cases={args.cases}", "data.folds=5", *args.overrides]
    cfg = load_config(args.config, overrides)
    runtime = setup_runtime(cfg.train.device, cfg.train.precision, cfg.train.threads)
    print(f"device {runtime.device} ({runtime.precision}), {machine()['cpu']}, {torch.get_num_threads()} threads, "
          f"{loader_workers(cfg.train.num_workers, runtime)} loader workers (train.num_workers={cfg.train.num_workers}), batch {cfg.train.batch_size}")
    result: dict[str, Any] = {"config": args.config, "overrides": args.overrides, "cases": args.cases, "steps": args.steps,
                              "loader_workers": loader_workers(cfg.train.num_workers, runtime),
                              "device": str(runtime.device), "precision": runtime.precision}

    with section(f"{args.cases} built-in cases"):
        raw = ensure_demo_dataset(cfg.data)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        with section("preprocessing, cold"):
            start = time.perf_counter()
            preprocess_dataset(raw, cache, cfg.data, progress=False, workers=args.workers)
            cold = time.perf_counter() - start
        with section("preprocessing, cached"):
            start = time.perf_counter()
            res = preprocess_dataset(raw, cache, cfg.data, progress=False)
            cached = time.perf_counter() - start
            assert len(res.reused) == args.cases, res
        result["preprocess_cases_per_s"] = {"cold": args.cases / cold, "cached": args.cases / cached, "workers": args.workers}

        train_dirs, _ = split_cases(cache, cfg.data.fold)
        # axial slices per cached case: what one pass over every slice of a dataset would cost
        result["slices_per_case"] = float(np.mean([np.load(d / "image.npy", mmap_mode="r").shape[0] for d in train_dirs]))
        cfg.train.slices_per_epoch = args.steps * cfg.train.batch_size * runtime.world_size
        loader = build_train_loader(cfg, train_dirs, runtime)
        trainer = Trainer.build(cfg, runtime, len(loader))
        trainer.model.train()
        other = None
        if args.compare:
            other_cfg = load_config(args.config, [*overrides, *args.compare])
            other_cfg.train.slices_per_epoch = cfg.train.slices_per_epoch
            other = Trainer.build(other_cfg, runtime, len(loader))
            other.model.train()

        def steps(batches: Any, trainer: Trainer = trainer) -> float:
            start = time.perf_counter()
            n = 0
            for batch in batches:
                train_step(trainer, batch)
                n += batch["image"].shape[0]
            if runtime.device.type == "cuda":
                torch.cuda.synchronize()
            return n / (time.perf_counter() - start)

        def loader_alone(loader: Any) -> float:
            start = time.perf_counter()
            n = 0
            for batch in loader:
                n += to_device(batch, runtime)["image"].shape[0]
            if runtime.device.type == "cuda":
                torch.cuda.synchronize()
            return n / (time.perf_counter() - start)

        float32_loader = build_train_loader(cfg, train_dirs, runtime)
        float32_loader.dataset.compact = False  # type: ignore[attr-defined]  # before its workers start
        alone: dict[str, list[float]] = {"compact": [], "float32": []}
        with section("loader alone: compact samples, then float32 samples"):
            for r in range(args.rounds + 1):  # the first round starts the workers: not counted
                for name, ldr in (("compact", loader), ("float32", float32_loader)):
                    seed_loader_epoch(ldr, 100 + r, cfg, runtime)
                    rate = loader_alone(ldr)
                    if r:
                        alone[name].append(rate)
            print("   " + ", ".join(f"{name} {sum(v) / len(v):.1f} slices/s" for name, v in alone.items()))
        del float32_loader
        result["loader_alone_slices_per_s"] = alone

        augment = BatchAugment(cfg.data)
        with section("warm-up"):
            seed_loader_epoch(loader, 0, cfg, runtime)
            memory = list(augmented_batches(loader, augment, 0, cfg, runtime))
            steps(memory[:5])
            if other is not None:
                steps(memory[:5], other)
        # the plain steps run without a moving average, even when the config asks for one
        ema, trainer.ema = trainer.ema or WeightEMA(trainer.model, 0.998), None
        data_path, in_memory, with_ema, compared = [], [], [], []
        for r in range(args.rounds):  # alternate, so drift in the machine's load hits both
            with section(f"round {r + 1}: data path, then in memory"):
                seed_loader_epoch(loader, r + 1, cfg, runtime)
                data_path.append(steps(augmented_batches(loader, augment, r + 1, cfg, runtime)))
                in_memory.append(steps(memory))
                trainer.ema = ema
                with_ema.append(steps(memory))
                trainer.ema = None
                if other is not None:
                    compared.append(steps(memory, other))
                print(f"   {data_path[-1]:.1f} vs {in_memory[-1]:.1f} slices/s ({with_ema[-1]:.1f} with the moving average"
                      + (f", {compared[-1]:.1f} with {' '.join(args.compare)})" if other is not None else ")"))
        shutil.rmtree(cache, ignore_errors=True)

    ratio = sum(data_path) / sum(in_memory)
    ema_ratio = sum(with_ema) / sum(in_memory)
    result.update({"slices_per_s": {"data_path": data_path, "in_memory": in_memory, "in_memory_with_ema": with_ema},
                   "ratio_data_path_over_in_memory": ratio, "ratio_ema_over_in_memory": ema_ratio})
    rows = [
        ["training, data path", sum(data_path) / len(data_path), "slices/s"],
        ["training, batches in memory", sum(in_memory) / len(in_memory), "slices/s"],
        ["ratio data path / in memory", ratio, "(goal ≥ 0.9)"],
        ["training, in memory, with the moving average", sum(with_ema) / len(with_ema), "slices/s"],
        ["ratio with / without the moving average", ema_ratio, ""],
        ["loader alone, compact samples", sum(alone["compact"]) / len(alone["compact"]), "slices/s"],
        ["loader alone, float32 samples", sum(alone["float32"]) / len(alone["float32"]), "slices/s"],
        ["ratio compact / float32", sum(alone["compact"]) / sum(alone["float32"]), "(> 1: compact is faster)"],
        ["axial slices per cached case", result["slices_per_case"], f"(at {cfg.data.spacing} mm)"],
        ["preprocessing, cold", result["preprocess_cases_per_s"]["cold"], f"cases/s ({args.workers} worker(s))"],
        ["preprocessing, cached", result["preprocess_cases_per_s"]["cached"], "cases/s"],
    ]
    if other is not None:
        compare_ratio = sum(compared) / sum(in_memory)
        result["compare"] = {"overrides": args.compare, "slices_per_s": compared, "ratio_over_in_memory": compare_ratio}
        rows[5:5] = [
            [f"training, in memory, {' '.join(args.compare)}", sum(compared) / len(compared), "slices/s"],
            ["ratio of that model / this config's", compare_ratio, ""],
        ]
    print()
    print(table(rows, ["measurement", "value", "unit"]))
    write_result("training" if runtime.device.type == "cpu" else "training_cuda", result, args.out)
    return result


if __name__ == "__main__":
    main()
