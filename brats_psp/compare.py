"""The compare stage: MLflow runs side by side, one row per run, sorted by a metric.

Each row: short run ID, run name, status, the params whose values differ between the runs,
the final and best value of the metric (and of the per-region validation Dice), and the
evaluation means that ``evaluate --run`` logged (``eval/dice_*``, ``eval/hd95_*``). Whether one
run is really better than another on the same test cases: :mod:`brats_psp.paired`
(``compare --paired``). Writes
``comparison.csv`` and ``comparison.png`` (the validation curves of the runs side by side).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brats_psp.io import write_text
from brats_psp.labels import REGION_NAMES

__all__ = ["Comparison", "compare_runs", "format_comparison", "case_set_digests", "warn_if_case_sets_differ"]

log = logging.getLogger(__name__)

#: Params that always differ and say nothing about the experiment.
_IGNORED_PARAMS = ("dataset.cache", "train.output_dir", "data.cache_dir", "tracking.uri", "tracking.run_name")
CURVES = ("val/dice_mean", *(f"val/dice_{r}" for r in REGION_NAMES))
#: What ``evaluate --run`` logs (means over the test cases), shown next to the validation metrics.
EVAL_METRICS = ("eval/dice_mean", *(f"eval/dice_{r}" for r in REGION_NAMES), *(f"eval/hd95_{r}" for r in REGION_NAMES))


@dataclass
class Comparison:
    rows: list[dict[str, Any]] = field(default_factory=list)
    differing_params: list[str] = field(default_factory=list)
    metric: str = "val/dice_mean"
    csv_path: Path | None = None
    png_path: Path | None = None


def _history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def compare_runs(
    experiment: str = "brats_psp",
    metric: str = "val/dice_mean",
    run_ids: list[str] | None = None,
    out_dir: str | os.PathLike | None = None,
    tracking_uri: str | None = None,
) -> Comparison:
    """Compare ``run_ids`` (default: every run of ``experiment``) on ``metric``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    if run_ids:
        runs = [client.get_run(r) for r in run_ids]
    else:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ValueError(f"no MLflow experiment named {experiment!r} at {client.tracking_uri}")
        runs = client.search_runs([exp.experiment_id], max_results=1000)
    if not runs:
        raise ValueError(f"no runs to compare in experiment {experiment!r}")
    warn_if_case_sets_differ(runs)
    keys = sorted({k for r in runs for k in r.data.params} - set(_IGNORED_PARAMS))
    differing = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    result = Comparison(differing_params=differing, metric=metric)
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for run in runs:
        rid = run.info.run_id
        row: dict[str, Any] = {"run_id": rid[:8], "name": run.info.run_name or "", "status": run.info.status}
        row.update({k: run.data.params.get(k, "") for k in differing})
        curves[rid] = {key: _history(client, rid, key) for key in dict.fromkeys((metric, *CURVES))}
        for key, points in curves[rid].items():
            values = [v for _, v in points]
            row[f"final {key}"] = values[-1] if values else float("nan")
            row[f"best {key}"] = max(values) if values else float("nan")
        row.update({key: run.data.metrics.get(key, float("nan")) for key in EVAL_METRICS})
        row["_full_id"] = rid
        result.rows.append(row)
    result.rows.sort(key=lambda r: (np.isnan(r[f"best {metric}"]), -np.nan_to_num(r[f"best {metric}"], nan=0.0)))
    if out_dir is not None:
        out = Path(out_dir)
        result.csv_path, result.png_path = out / "comparison.csv", out / "comparison.png"
        write_text(result.csv_path, _to_csv(result.rows))
        _plot(result, curves, result.png_path)
    return result


def case_set_digests(run: Any) -> dict[str, str]:
    """Context (training, validation, evaluation) -> digest of the case set an MLflow ``run`` logged for it."""
    digests = {}
    for item in getattr(run.inputs, "dataset_inputs", None) or []:
        context = next((t.value for t in item.tags if t.key == "mlflow.data.context"), None)
        if context:
            digests[context] = item.dataset.digest
    return digests


def warn_if_case_sets_differ(runs: list[Any]) -> dict[str, dict[str, str]]:
    """Warn, per context, when the MLflow ``runs`` trained, validated or were evaluated on
    different case sets (their logged inputs' digests differ); return context -> run -> digest."""
    by_context: dict[str, dict[str, str]] = {}
    for run in runs:
        for context, digest in case_set_digests(run).items():
            by_context.setdefault(context, {})[run.info.run_id] = digest
    for context, digests in sorted(by_context.items()):
        if len(set(digests.values())) > 1:
            log.warning(
                "the runs used different %s case sets: %s; their %s numbers are not comparable case for case",
                context, ", ".join(f"{r[:8]} {d}" for r, d in sorted(digests.items())), context,
            )
    return by_context


def _to_csv(rows: list[dict[str, Any]]) -> str:
    fields = [k for k in rows[0] if not k.startswith("_")]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def format_comparison(result: Comparison) -> str:
    """A text table: run, name, status, differing params, final and best of the metric."""
    evaluated = [k for k in EVAL_METRICS if any(not np.isnan(r.get(k, float("nan"))) for r in result.rows)]
    cols = ["run_id", "name", "status", *result.differing_params, f"final {result.metric}", f"best {result.metric}", *evaluated]
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in result.rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(row) for row in cells)])


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _plot(result: Comparison, curves: dict[str, dict[str, list[tuple[int, float]]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brats_psp.plots import save_figure

    keys = list(dict.fromkeys((result.metric, *CURVES)))
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for row in result.rows:
            points = curves[row["_full_id"]][key]
            if points:
                steps, values = zip(*points)
                ax.plot(np.asarray(steps) + 1, values, marker="o", label=f"{row['run_id']} {row['name']}".strip())
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("value")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, out)
