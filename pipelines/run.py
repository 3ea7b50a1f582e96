#!/usr/bin/env python
"""brats_psp command line: ``python pipelines/run.py <stage> [options] [section.key=value ...]``.

Each stage parses its arguments and calls one plain function of the ``brats_psp`` package;
``python pipelines/run.py <stage> --help`` describes it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from brats_psp.config import ConfigError, load_config  # noqa: E402
from brats_psp.cpus import launch_rank  # noqa: E402
from brats_psp.errors import CaseError, CheckpointError, DiscoveryError, RunError  # noqa: E402

log = logging.getLogger("brats_psp")

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"

STAGES: dict[str, Callable[[argparse.Namespace], int]] = {}


def stage(name: str) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    def register(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        STAGES[name] = fn
        return fn

    return register


def _config(args: argparse.Namespace):
    return load_config(args.config or DEFAULT_CONFIG, args.overrides)


def _report_failures(failures: Sequence[CaseError], what: str) -> int:
    if not failures:
        return 0
    log.error("%d case(s) failed %s:", len(failures), what)
    for err in failures:
        log.error("  %s", err)
    return 1


@stage("demo-data")
def demo_data(args: argparse.Namespace) -> int:
    from brats_psp.cpus import default_workers
    from brats_psp.data.synthetic import write_dataset

    workers = args.workers if args.workers > 0 else default_workers()
    if args.classes:  # the appearance-class maps beside OUT, where train looks for them (data.rerender)
        from brats_psp.data.builtin import write_with_class_maps

        ids = write_with_class_maps(Path(args.out), args.cases, seed=args.seed, fmt=args.format, workers=workers)
    else:
        ids = write_dataset(args.out, args.cases, seed=args.seed, fmt=args.format, progress=True, workers=workers)
    log.info("wrote %d synthetic %s case(s) to %s", len(ids), args.format, args.out)
    return 0


@stage("preprocess")
def preprocess(args: argparse.Namespace) -> int:
    from brats_psp.data.preprocess import preprocess_dataset

    cfg = _config(args)
    result = preprocess_dataset(args.data, args.out, cfg.data, progress=True, workers=max(args.workers, 0))
    log.info("processed %d, reused %d; datalist %s, summary %s", len(result.processed), len(result.reused), result.datalist, result.summary)
    return _report_failures(result.failures, "preprocessing")


@stage("show-data")
def show_data(args: argparse.Namespace) -> int:
    from brats_psp.plots import plot_cases, plot_rerendered

    cfg = _config(args)
    data = args.data
    if args.rerender:  # the built-in set's training cache (built if needed), as data.rerender sees it
        from brats_psp.data.builtin import ensure_training_cache

        plot_rerendered(ensure_training_cache(cfg.data, data), args.out, n_cases=args.cases, draws=args.rerender)
        log.info("wrote %s", args.out)
        return 0
    if data is None:
        from brats_psp.data.builtin import ensure_demo_dataset

        data = ensure_demo_dataset(cfg.data)
    plot_cases(data, args.out, n_cases=args.cases, layout=cfg.data.layout)
    log.info("wrote %s", args.out)
    return 0


@stage("train")
def train(args: argparse.Namespace) -> int:
    from brats_psp.training import train as train_stage

    cfg = _config(args)
    result = train_stage(cfg, data=args.data, resume=args.resume)
    print(f"run_id: {result.run_id}")
    print(f"model: {result.best_checkpoint}")
    return 0


@stage("calibrate")
def calibrate(args: argparse.Namespace) -> int:
    from brats_psp.labels import REGION_NAMES
    from brats_psp.training import recalibrate

    result = recalibrate(args.model, args.output, args.data, args.overrides, args.tracking_uri, progress=True)
    print("thresholds: " + " ".join(f"{r}={t:.2f}" for r, t in zip(REGION_NAMES, result.thresholds)))
    print(f"model: {result.checkpoint}")
    return 0


@stage("infer")
def infer(args: argparse.Namespace) -> int:
    from brats_psp.config import apply_overrides
    from brats_psp.segment import ensemble_config, load_models, segment_cases

    not_infer = [o for o in args.overrides if not o.startswith("infer.")]
    if not_infer:
        raise ConfigError(f"infer takes only infer.* overrides (the rest comes from the model), got {not_infer}")
    models = load_models(args.model, args.tracking_uri)
    if len(models) > 1:
        log.info("ensemble of %d models: %s", len(models), ", ".join(str(m.checkpoint) for m in models))
    cfg = apply_overrides(ensemble_config(models), args.overrides)
    result = segment_cases(models, args.input, args.output, cfg.infer, layout=args.layout, workers=args.workers, task=args.task)
    log.info("wrote %d segmentation(s) to %s", len(result.written), args.output)
    return _report_failures(result.failures, "inference")


@stage("evaluate")
def evaluate(args: argparse.Namespace) -> int:
    from brats_psp.evaluation import evaluate as evaluate_stage
    from brats_psp.evaluation import format_table, log_to_mlflow, predictions_run_id

    result = evaluate_stage(args.pred, args.ref, args.out, layout=args.layout, pred_labels=args.pred_labels, task=args.task, lesionwise=args.lesionwise)
    print(format_table(result.summary))
    log.info("wrote %s and %s", result.metrics_csv, result.summary_json)
    run_id = args.run or predictions_run_id(args.pred)
    if run_id:
        from mlflow.exceptions import MlflowException

        try:
            log_to_mlflow(run_id, result, args.tracking_uri, args.ref)
            log.info("logged the evaluation to MLflow run %s", run_id)
        except MlflowException as err:  # the metrics are written; only the logging could not be done
            if args.run:
                raise
            log.warning(
                "the evaluation was not logged: the predictions' MLflow run %s is not in this tracking store (%s); "
                "give --run or --tracking-uri (or MLFLOW_TRACKING_URI) to log it", run_id, str(err).splitlines()[0],
            )
    return _report_failures(result.failures, "evaluation")


@stage("compare")
def compare(args: argparse.Namespace) -> int:
    if args.paired:
        from brats_psp.paired import compare_paired, format_paired

        if not args.runs or len(args.runs) < 2:
            raise ConfigError("compare --paired needs --runs A B [C ...]: each run after the first is compared with the first")
        paired = compare_paired(args.runs, args.out, args.tracking_uri)
        print(format_paired(paired))
        log.info("wrote %s and %s", paired.csv_path, paired.png_path)
        return 0
    from brats_psp.compare import compare_runs, format_comparison

    result = compare_runs(args.experiment, args.metric, args.runs, args.out, args.tracking_uri)
    print(format_comparison(result))
    if result.csv_path:
        log.info("wrote %s and %s", result.csv_path, result.png_path)
    return 0


@stage("show-prediction")
def show_prediction(args: argparse.Namespace) -> int:
    from brats_psp.plots import plot_prediction

    plot_prediction(args.case, args.pred, args.out)
    log.info("wrote %s", args.out)
    return 0


@stage("promote")
def promote(args: argparse.Namespace) -> int:
    from brats_psp.registry import promote as promote_run

    done = promote_run(args.run, args.name, args.alias, args.tracking_uri)
    what = "registered as" if done.registered_now else "already registered as"
    print(f"run {done.run_id}: {what} {done.name} version {done.version}; {done.uri} now points at it")
    return 0


@stage("export")
def export(args: argparse.Namespace) -> int:
    from brats_psp.checkpoint import load_model
    from brats_psp.export import check_onnx, export_onnx

    loaded = load_model(args.model, args.tracking_uri)
    path = export_onnx(loaded, args.out, args.tile)
    log.info("onnxruntime vs PyTorch on a random batch: max |difference| = %.2e", check_onnx(loaded, path))
    return 0


@stage("sync-mlflow")
def sync_mlflow(args: argparse.Namespace) -> int:
    from brats_psp.tracking import ReplayError, replay_pending

    try:
        sent = replay_pending(args.run_dir, args.tracking_uri, force=args.force)
    except ReplayError as err:
        log.error("%s", err)
        return 1
    log.info("sent %d pending MLflow call(s) from %s", sent, args.run_dir)
    return 0


TASK_HELP = "BraTS 2023+ task whose label convention the cases use (default auto: from each case id, BraTS-PED-* is paediatric); GLI, SSA, GoAT, MEN, MET, PED"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipelines/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    def add(name: str, help_text: str, config: bool = True, overrides: bool | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if config:
            p.add_argument("--config", help="YAML config (default: configs/default.yaml)")
        if config if overrides is None else overrides:
            p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. train.epochs=6")
        return p

    p = add("demo-data", "write synthetic BraTS-like cases (MNI brain + generated tumours) in a release layout", config=False)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--cases", type=int, default=10, help="number of cases (default 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed (case i is the same for any --cases)")
    p.add_argument(
        "--format", choices=["brats2021", "brats2023", "brats2023-ped", "msd"], default="brats2021",
        help="release layout and labels (brats2023: BraTS-GLI-* ids; brats2023-ped: BraTS-PED-* ids in the paediatric convention)",
    )
    p.add_argument("--workers", type=int, default=0, help="worker processes (default 0: one per available core)")
    p.add_argument(
        "--classes", action="store_true",
        help="also write each case's appearance-class map beside OUT (OUT/../classes), which train uses with data.rerender > 0",
    )

    p = add("preprocess", "run the volume transforms once per case and cache slices, a datalist and a summary")
    p.add_argument("--data", required=True, help="dataset folder (any layout), case folder or datalist JSON")
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default 0: one per available core, at most 8, and one per 4 cases)")

    p = add("show-data", "figure of a few cases: the four contrasts and the labels")
    p.add_argument("--data", help="dataset folder (default: the built-in synthetic set)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--cases", type=int, default=3, help="number of cases to show")
    p.add_argument("--rerender", type=int, default=0, metavar="N",
                   help="instead: N appearances drawn anew per case from the cached class maps (data.rerender)")
    p = add("show-prediction", "figure of one case with a predicted segmentation on FLAIR", config=False)
    p.add_argument("--case", required=True, help="the case folder")
    p.add_argument("--pred", required=True, help="its <case>.nii.gz from infer")
    p.add_argument("--out", required=True, help="PNG file to write")

    p = add("train", "train a PSPNet on BraTS slices, tracked in MLflow (default config: configs/default.yaml)")
    p.add_argument("--data", help="dataset folder or datalist (default: data.root, else the built-in synthetic set)")
    p.add_argument("--resume", metavar="RUN_ID_OR_CHECKPOINT", help="continue a run from its last checkpoint")
    p = add(
        "calibrate", "calibrate a trained model's thresholds again on its validation cases (infer.*, data.root/cache_dir overrides)",
        config=False, overrides=True,
    )
    p.add_argument("--model", required=True, help="checkpoint file, MLflow run ID, runs:/<id>/model, models:/<name>/<version> or models:/<name>@<alias>")
    p.add_argument("--output", help="checkpoint to write (default: over the one read)")
    p.add_argument("--data", help="the dataset the model was trained on (default: its data.root, else the built-in synthetic set)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for run IDs and model URIs (default: MLflow's)")
    p = add("infer", "segment NIfTI cases with a trained model; writes OUT/<case>.nii.gz in the input's geometry (infer.* overrides)", config=False, overrides=True)
    p.add_argument(
        "--model", required=True, action="append",
        help="checkpoint file, MLflow run ID, runs:/<id>/model, models:/<name>/<version> or models:/<name>@<alias>; "
        "repeated (--model A --model B), an ensemble: the mean of their region probabilities is thresholded",
    )
    p.add_argument("--input", required=True, help="case folder, dataset folder (any layout) or datalist JSON")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--layout", default="auto", help="force the input layout (brats2021, brats2023, msd)")
    p.add_argument("--task", default="auto", help=TASK_HELP)
    p.add_argument("--tracking-uri", help="MLflow tracking URI for run IDs and model URIs (default: MLflow's)")
    p.add_argument(
        "--workers", type=int, default=0,
        help="processes that read and preprocess the next cases while the network runs (default 0: one after the other); "
        "results are written in the background, in the same order and with the same labels",
    )

    p = add("evaluate", "Dice/HD95 per case and region, the BraTS way; metrics.csv, summary.json, MLflow", config=False)
    p.add_argument("--pred", required=True, help="folder of <case>.nii.gz predictions")
    p.add_argument("--ref", required=True, help="reference cases with labels (any layout), or a folder of label files alone (<id>_seg.nii.gz, <id>-seg.nii.gz, MSD labelsTr/)")
    p.add_argument("--out", help="where metrics.csv and summary.json go (default: --pred)")
    p.add_argument("--run", help="MLflow run to log to (default: the run of the model that made the predictions)")
    p.add_argument("--layout", default="auto", help="force the reference layout")
    p.add_argument("--task", default="auto", help=TASK_HELP)
    p.add_argument(
        "--lesionwise", action="store_true",
        help="also lesion-wise metrics in both BraTS definitions (the official package's panoptica matching, the 2023 challenge rules): OUT/lesionwise.csv",
    )
    p.add_argument("--pred-labels", choices=["brats2021", "brats2023", "brats2023-ped", "msd"], help="label convention of the predictions (default: the reference's)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLflow's)")
    p = add("export", "export the network to ONNX at a fixed tile size with a dynamic batch", config=False)
    p.add_argument("--model", required=True, help="checkpoint file, MLflow run ID, runs:/<id>/model, models:/<name>/<version> or models:/<name>@<alias>")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--tile", type=int, nargs=2, metavar=("H", "W"), help="tile size (default: the model's infer.roi_size)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLflow's)")

    p = add("promote", "register a run's model under a name (once) and point an alias at it (models:/NAME@ALIAS)", config=False)
    p.add_argument("run", metavar="RUN_ID", help="the MLflow run whose model to promote")
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--alias", default="champion", help="alias to point at the run's version (default champion)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLflow's)")

    p = add("compare", "compare MLflow runs: differing params, final and best metrics, validation curves", config=False)
    p.add_argument("--experiment", default="brats_psp", help="MLflow experiment (default brats_psp)")
    p.add_argument("--metric", default="val/dice_mean", help="metric to sort by (default val/dice_mean)")
    p.add_argument("--runs", nargs="+", metavar="RUN_ID", help="compare these runs (default: every run of the experiment)")
    p.add_argument(
        "--paired", action="store_true",
        help="each run after the first against the first, on the test cases both evaluated: mean difference, "
        "95%% bootstrap interval, Wilcoxon p-value per region and metric (paired.csv, paired.png)",
    )
    p.add_argument("--out", default="comparison", help="folder for comparison.csv and comparison.png (default ./comparison)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLflow's)")

    p = add(
        "sync-mlflow",
        "send the MLflow calls a training run kept in <run dir>/mlflow_pending.jsonl while the tracking server was down",
        config=False,
    )
    p.add_argument("run_dir", metavar="OUTPUT_RUN_DIR", help="the run folder (outputs/<run>) or its mlflow_pending.jsonl")
    p.add_argument("--tracking-uri", help="where to send them (default: the URI the run used)")
    p.add_argument("--force", action="store_true", help="replay even if the run's folder says it is still training")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Under torchrun the processes other than rank 0 say only what goes wrong (--verbose: all),
    # each line with its rank, so that the log reads as one run's.
    rank, world_size = launch_rank()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s {f'[rank {rank}] ' if world_size > 1 else ''}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return STAGES[args.stage](args)
    except (ConfigError, DiscoveryError, CaseError, CheckpointError, RunError, PermissionError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
