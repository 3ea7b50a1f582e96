"""Recipe trials: train variants of the recipe over several seeds, side by side, and score every model
on real scans and on unseen synthetic sets: the tables of README "More real scans" in one command.

    python benchmarks/trials.py run --out /tmp/trials --seeds 0 1 2 3 --parallel 4 \\
        --variant default --variant width24 model.width=24 \\
        --variant v10 --patch v10=/tmp/v10.diff \\
        --real ../shared/data/real --real /tmp/real2 --synthetic v7=/tmp/eval/v7 --synthetic v6=/tmp/eval/v6
    python benchmarks/trials.py score --model outputs/<run>/checkpoints/best.pt --real ../shared/data/real --json s.json

Why: on real scans the spread between seeds of one recipe (TC 0.03–0.66 on one scan) is larger
than most changes, so a change is judged over several seeds and every scan at once, never on one.

``run``, per variant (a name, config overrides, and optionally ``--patch NAME=DIFF``, a
``git diff`` of a change to the code, the generator's for instance):

1. a copy of the working tree (the files git tracks, as they are now) in ``OUT/<variant>/repo``,
   with the patch applied (``git apply``);
2. the training cache, built once by the copy's code (``data.cache_dir=OUT/<variant>/cache``;
   the built-in set is generated there unless ``--data`` is given);
3. ``python pipelines/run.py train`` of the copy per seed (``--config`` inside this checkout
   is read from the copy, so a patch may change it), ``--parallel`` at a time, one torch
   thread each (``train.threads``), MLflow runs in ``OUT/mlflow.db`` named ``<variant>-s<seed>``;
   logs in ``OUT/<variant>/train-s<seed>.log``;
4. each ``best.pt`` scored by ``score`` with the copy's code: every ``--real`` folder as
   ``real_scans.py`` scores it (Dice, HD95, volumes; its figures), and every ``--synthetic``
   set by ``infer`` + ``evaluate`` (mean Dice per region), with the model's own ``infer``
   settings and the command's overrides (recorded as ``infer``; a postprocessing setting the
   model carries from an older default is named in a warning: override it to compare models
   trained before and after a default changed).

Writes ``OUT/trials.json`` (per model: variant, seed, run id, calibrated thresholds, the
``infer`` settings, Dice per case or set) and ``OUT/trials.md`` (a table, a row per model and a mean row per variant, Dice WT
/ TC / ET). A variant whose trainings ran before (a ``best.pt`` in its seed's folder) is not
trained again: add seeds or scan folders and run the same command. A bad override stops the
run before anything trains; a training that fails stops it, and the trainings beside it, naming
its log. Accuracy, not speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/trials.py` from anywhere
    sys.path.insert(0, str(ROOT))

from brats_psp.io import write_json, write_text  # noqa: E402

log = logging.getLogger("trials")

REGIONS = ("WT", "TC", "ET")

_PREPARE = """\
import sys
from brats_psp.config import load_config
from brats_psp.data.builtin import ensure_training_cache

if __name__ == "__main__":  # the built-in set is generated in spawned workers
    config, data, overrides = sys.argv[1] or None, sys.argv[2] or None, sys.argv[3:]
    print(ensure_training_cache(load_config(config, overrides).data, data, progress=False))
"""


def copy_tree(dest: Path, patch: Path | None = None) -> Path:
    """The files git tracks in this checkout, as they are in the working tree, copied to ``dest``; ``patch`` applied."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    if patch is not None:
        proc = subprocess.run(["git", "apply", "--verbose", str(Path(patch).resolve())], cwd=dest, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"the patch {patch} does not apply to the working tree: {proc.stderr.strip()}")
    return dest


def _env(repo: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}


def score(model: str, real: list[Path], synthetic: dict[str, Path], out: Path, overrides: list[str]) -> dict[str, Any]:
    """Dice (and HD95 on real scans) of one checkpoint on every real folder and synthetic set."""
    from benchmarks.real_scans import run as real_scans
    from brats_psp.checkpoint import load_model
    from brats_psp.config import apply_overrides
    from brats_psp.evaluation import evaluate
    from brats_psp.segment import ensemble_config, segment_cases

    result: dict[str, Any] = {"model": model, "dice": {}, "hd95": {}}
    loaded = load_model(model)
    cfg = apply_overrides(ensemble_config([loaded]), overrides).infer
    result["thresholds"] = cfg.region_thresholds
    result["infer"] = dataclasses.asdict(cfg)  # what every score below was taken with
    for key, used, default in stale_postprocessing(cfg, overrides):
        log.warning("%s: scored with the model's infer.%s=%s, not today's default %s (override it to compare with today's)", model, key, used, default)
    if real:
        summary = real_scans(loaded, real, None, out / "real", overrides, contrast_check=False)  # loaded once
        for case, scores in summary["scored"].items():
            result["dice"][case] = [round(scores[r]["dice"], 4) for r in REGIONS]
            result["hd95"][case] = [round(scores[r]["hd95"], 2) for r in REGIONS]
    for name, folder in synthetic.items():
        segment_cases(loaded, folder, out / name / "predictions", cfg, progress=False)
        summary = evaluate(out / name / "predictions", folder, out_dir=out / name).summary
        result["dice"][name] = [round(summary[r]["dice"]["mean"], 4) for r in REGIONS]
    return result


def stale_postprocessing(cfg: Any, overrides: Sequence[str] = ()) -> list[tuple[str, Any, Any]]:
    """``(key, value, default)`` of each step after the network (:data:`AFTER_NETWORK`, but the
    calibrated thresholds and the keys ``overrides`` set on purpose) where ``cfg`` (an
    :class:`~brats_psp.config.InferConfig`, a model's own after overrides) differs from today's
    default: a model trained before a default changed carries the old value, and its scores are
    then not comparable with a today's model's."""
    from benchmarks.postprocessing import AFTER_NETWORK
    from brats_psp.config import InferConfig, parse_override

    default = InferConfig()
    chosen = {key for section, key, _ in map(parse_override, overrides) if section == "infer"}
    keys = sorted(AFTER_NETWORK - {"threshold", "region_thresholds"} - chosen)
    return [(k, getattr(cfg, k), getattr(default, k)) for k in keys if getattr(cfg, k) != getattr(default, k)]


def table(models: list[dict[str, Any]]) -> str:
    """Markdown: a row per model, then per variant the mean over its seeds; cells Dice WT / TC / ET."""
    columns = list(dict.fromkeys(key for m in models for key in m["dice"]))
    fmt = " / ".join(["{:.3f}"] * 3)
    lines = ["| variant, seed (run) | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for variant in dict.fromkeys(m["variant"] for m in models):
        rows = [m for m in models if m["variant"] == variant]
        for m in rows:
            cells = [fmt.format(*m["dice"][c]) if c in m["dice"] else "" for c in columns]
            lines.append(f"| {variant}, seed {m['seed']} ({m['run'][:8]}) | " + " | ".join(cells) + " |")
        means = []
        for c in columns:
            values = [m["dice"][c] for m in rows if c in m["dice"]]
            means.append(fmt.format(*np.mean(values, axis=0)) if values else "")
        lines.append(f"| **{variant}: mean of {len(rows)}** | " + " | ".join(f"**{v}**" if v else "" for v in means) + " |")
    return "\n".join(lines) + "\n"


def run_trials(args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.config = args.config.resolve() if args.config else None
    args.data = args.data.resolve() if args.data else None
    args.real = [r.resolve() for r in args.real]
    args.synthetic = [f"{name}={path.resolve()}" for name, path in (_pair(t, "--synthetic") for t in args.synthetic)]
    patches = dict(_pair(p, "--patch") for p in args.patch or [])
    variants = [(v[0], v[1:]) for v in args.variant]
    if unknown := set(patches) - {name for name, _ in variants}:
        raise SystemExit(f"--patch names no --variant: {', '.join(sorted(unknown))}")
    jobs = []
    for name, overrides in variants:
        folder = out / name
        repo = folder / "repo"
        if not repo.is_dir():
            copy_tree(repo, patches.get(name))
        common = [*overrides, f"data.cache_dir={folder / 'cache'}"]
        config = _in_copy(args.config, repo)
        prepare = folder / "prepare_cache.py"
        write_text(prepare, _PREPARE)
        log.info("%s: building the training cache", name)
        proc = subprocess.run([sys.executable, str(prepare), str(config or ""), str(args.data or ""), *common],
                              cwd=repo, env=_env(repo), capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name}: building the training cache failed: {proc.stderr.strip()[-2000:]}")
        for seed in args.seeds:
            seed_dir = folder / f"s{seed}"
            cmd = [sys.executable, "pipelines/run.py", "train", *(["--config", str(config)] if config else []),
                   *(["--data", str(args.data)] if args.data else []), *common, f"train.seed={seed}",
                   f"train.threads={args.threads}", f"train.output_dir={seed_dir}", f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
                   f"tracking.run_name={name}-s{seed}"]
            jobs.append((name, seed, repo, seed_dir, cmd))
    running: list[tuple[Any, ...]] = []
    pending = [j for j in jobs if not list(j[3].glob("*/checkpoints/best.pt"))]
    try:
        while pending or running:
            while pending and len(running) < args.parallel:
                name, seed, repo, seed_dir, cmd = pending.pop(0)
                seed_dir.mkdir(parents=True, exist_ok=True)
                logf = open(seed_dir.parent / f"train-s{seed}.log", "w")
                log.info("%s seed %d: training", name, seed)
                running.append((subprocess.Popen(cmd, cwd=repo, env=_env(repo), stdout=logf, stderr=subprocess.STDOUT), logf, name, seed))
            for item in list(running):
                proc, logf, name, seed = item
                if proc.poll() is not None:
                    logf.close()
                    running.remove(item)
                    if proc.returncode != 0:
                        raise SystemExit(f"{name} seed {seed}: training failed (exit {proc.returncode}), see {logf.name}")
            time.sleep(1.0)
    finally:  # a failed training (or Ctrl-C) stops the others rather than leaving them running unwatched
        for proc, logf, _, _ in running:
            proc.terminate()
            proc.wait()
            logf.close()
    models = []
    for name, seed, repo, seed_dir, _ in jobs:
        (best,) = seed_dir.glob("*/checkpoints/best.pt")
        score_json = seed_dir / "score.json"
        script = repo / "benchmarks" / "trials.py"  # the copy's (this file, where git does not track it yet)
        cmd = [sys.executable, str(script if script.is_file() else Path(__file__).resolve()), "score", "--model", str(best), "--json", str(score_json),
               *[a for r in args.real for a in ("--real", str(r))], *[a for s in args.synthetic for a in ("--synthetic", s)]]
        log.info("%s seed %d: scoring", name, seed)
        proc = subprocess.run(cmd, cwd=repo, env={**_env(repo), "OMP_NUM_THREADS": str(args.score_threads)}, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name} seed {seed}: scoring failed: {proc.stderr[-2000:]}")
        scored = json.loads(score_json.read_text())
        models.append({"variant": name, "seed": seed, "run": best.parents[1].name, **scored})
    result = {"variants": {name: overrides for name, overrides in variants}, "patches": {k: str(v) for k, v in patches.items()}, "models": models}
    write_json(out / "trials.json", result)
    write_text(out / "trials.md", table(models))
    return result


def _in_copy(path: Path | None, repo: Path) -> Path | None:
    """A file of this checkout (a config under configs/) as the variant's copy has it; other paths as they are."""
    if path is None or not path.is_relative_to(ROOT):
        return path
    return repo / path.relative_to(ROOT)


def _pair(text: str, flag: str) -> tuple[str, Path]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise SystemExit(f"{flag} takes NAME=PATH, got {text!r}")
    return name, Path(value)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for p in (sub.add_parser("run", help="train variants over seeds, then score every model"),
              sub.add_parser("score", help="score one checkpoint")):
        p.add_argument("--real", type=Path, action="append", default=[], help="folder of real cases with references/ (repeat)")
        p.add_argument("--synthetic", action="append", default=[], metavar="NAME=DIR", help="a labelled set (repeat)")
    r = sub.choices["run"]
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME [KEY=VALUE ...]",
                   help="a variant: a name and config overrides (repeat)")
    r.add_argument("--patch", action="append", metavar="NAME=DIFF", help="a git diff applied to that variant's copy")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    r.add_argument("--parallel", type=int, default=2, help="trainings at once")
    r.add_argument("--threads", type=int, default=1, help="torch threads per training")
    r.add_argument("--score-threads", type=int, default=2)
    r.add_argument("--config", type=Path, help="base config (default: configs/default.yaml)")
    r.add_argument("--data", type=Path, help="train on this dataset instead of the built-in set")
    s = sub.choices["score"]
    s.add_argument("--model", required=True)
    s.add_argument("--json", type=Path, required=True)
    s.add_argument("overrides", nargs="*", help="infer overrides key=value")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "score":
        synthetic = dict(_pair(t, "--synthetic") for t in args.synthetic)
        result = score(args.model, args.real, synthetic, args.json.parent / (args.json.stem + "_outputs"), args.overrides)
        write_json(args.json, result)
        return 0
    result = run_trials(args)
    print(table(result["models"]))
    print(f"wrote {args.out / 'trials.json'} and {args.out / 'trials.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
