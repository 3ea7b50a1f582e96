"""Paired comparison of evaluated runs: is run B really better than run A on the same cases?

Two models evaluated on the same test cases give paired samples: per case and region, the
Dice (or HD95) of A and of B. For each run after the first, against the first, per region and
metric, over the cases both runs evaluated (the ``evaluation/metrics.csv`` that ``evaluate
--run`` logs):

* ``mean_diff``: the mean of B - A;
* ``ci_low``, ``ci_high``: a 95 % bootstrap interval of that mean (percentile method,
  ``resamples`` resamples of the cases with replacement, seeded: the same inputs give the
  same interval);
* ``p_value``: ``scipy.stats.wilcoxon(b, a)`` (two-sided signed-rank test, scipy's defaults),
  1.0 when every difference is zero (the test is undefined there).

For Dice higher is better, for HD95 lower. Written to ``paired.csv`` and drawn in
``paired.png`` (per region: each case's Dice under A against under B).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brats_psp.errors import RunError
from brats_psp.io import write_text
from brats_psp.labels import REGION_NAMES
from brats_psp.lesionwise import LESION_METRIC_NAMES

__all__ = [
    "PAIRED_COLUMNS",
    "PairedComparison",
    "paired_statistics",
    "read_case_metrics",
    "paired_rows",
    "compare_paired",
    "format_paired",
]

log = logging.getLogger(__name__)

PAIRED_COLUMNS = ("run_a", "run_b", "region", "metric", "n", "mean_a", "mean_b", "mean_diff", "ci_low", "ci_high", "p_value")
#: The per-case metrics compared: whole-volume (metrics.csv), then lesion-wise where both runs
#: were evaluated with ``evaluate --lesionwise`` (lesionwise.csv: the BraTS 2023 rules, and the
#: official package's panoptica F1 and Dice; a case without a matched lesion has no panoptica Dice).
METRICS = ("dice", "hd95", "lesion_dice_2023", "lesion_hd95_2023", "lesion_f1", "lesion_dice")
#: Where ``evaluate --run`` logs the per-case metrics in the run's artifacts.
METRICS_ARTIFACT = "evaluation/metrics.csv"
LESIONWISE_ARTIFACT = "evaluation/lesionwise.csv"
#: lesionwise.csv column -> compared metric (those of :data:`METRICS`).
_LESION_METRICS = {col: name for col, name in LESION_METRIC_NAMES.items() if name in METRICS}

CaseMetrics = dict[tuple[str, str], dict[str, float]]  # (case, region) -> metric -> value


@dataclass
class PairedComparison:
    """The rows of ``paired.csv`` and where it and the figure went."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    alpha: float = 0.05
    csv_path: Path | None = None
    png_path: Path | None = None
    pairs: dict[tuple[str, str], list[tuple[str, str, float, float]]] = field(default_factory=dict)  # (a, b) -> (case, region, dice a, dice b)


def paired_statistics(a: Sequence[float], b: Sequence[float], resamples: int = 10_000, seed: int = 0) -> dict[str, float]:
    """``n``, the means, the mean of ``b - a``, its 95 % bootstrap interval and the Wilcoxon p-value."""
    from scipy.stats import wilcoxon

    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_arr.shape != b_arr.shape or a_arr.ndim != 1 or a_arr.size == 0:
        raise ValueError(f"paired samples need two equal, non-empty 1-D arrays, got shapes {a_arr.shape} and {b_arr.shape}")
    diff = b_arr - a_arr
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // diff.size)  # bounded memory for thousands of cases
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        means[start:stop] = diff[rng.integers(0, diff.size, size=(stop - start, diff.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    p_value = 1.0 if not np.any(diff) else float(wilcoxon(b_arr, a_arr).pvalue)
    return {
        "n": int(diff.size),
        "mean_a": float(a_arr.mean()),
        "mean_b": float(b_arr.mean()),
        "mean_diff": float(diff.mean()),
        "ci_low": float(low),
        "ci_high": float(high),
        "p_value": p_value,
    }


def read_case_metrics(path: str | os.PathLike) -> CaseMetrics:
    """``metrics.csv`` as written by ``evaluate`` (``case,region,dice,hd95,...``)."""
    table: CaseMetrics = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            values = {}
            for key, text in row.items():
                if key in ("case", "region") or text in (None, ""):
                    continue
                try:
                    values[key] = float(text)
                except ValueError:
                    continue
            table[(row["case"], row["region"])] = values
    return table


def paired_rows(
    run_a: str, a: CaseMetrics, run_b: str, b: CaseMetrics, resamples: int = 10_000, seed: int = 0
) -> tuple[list[dict[str, Any]], int]:
    """One row per region and metric over the cases both tables hold; and how many (case,
    region) entries only one of them has."""
    shared = sorted(set(a) & set(b))
    only_one = len(set(a) ^ set(b))
    rows = []
    for region in REGION_NAMES:
        keys = [k for k in shared if k[1] == region]
        for metric in METRICS:
            usable = [k for k in keys if np.isfinite(a[k].get(metric, np.nan)) and np.isfinite(b[k].get(metric, np.nan))]
            if not usable:
                continue
            stats = paired_statistics([a[k][metric] for k in usable], [b[k][metric] for k in usable], resamples, seed)
            rows.append({"run_a": run_a, "run_b": run_b, "region": region, "metric": metric, **stats})
    return rows, only_one


def _run_metrics(client: Any, run_id: str) -> CaseMetrics:
    """The per-case metrics that ``evaluate --run`` logged to ``run_id``."""
    try:
        local = client.download_artifacts(run_id, METRICS_ARTIFACT)
    except Exception:
        raise RunError(
            f"run {run_id} has no evaluation ({METRICS_ARTIFACT} is not among its artifacts); make one with "
            f"`python pipelines/run.py infer --model {run_id} --input <test cases> --output <predictions>` and "
            f"`python pipelines/run.py evaluate --pred <predictions> --ref <test cases> --run {run_id}`"
        ) from None
    table = read_case_metrics(local)
    try:
        lesion = read_case_metrics(client.download_artifacts(run_id, LESIONWISE_ARTIFACT))
    except Exception:  # evaluated without --lesionwise
        return table
    for key, values in lesion.items():
        table.setdefault(key, {}).update({name: values[col] for col, name in _LESION_METRICS.items() if col in values})
    return table


def compare_paired(
    run_ids: Sequence[str],
    out_dir: str | os.PathLike | None = None,
    tracking_uri: str | None = None,
    resamples: int = 10_000,
    seed: int = 0,
    alpha: float = 0.05,
) -> PairedComparison:
    """Each run after the first against the first, on the cases both evaluated (see the module)."""
    from mlflow.tracking import MlflowClient

    if len(run_ids) < 2:
        raise RunError(f"a paired comparison needs at least two runs, got {list(run_ids)}")
    from brats_psp.compare import warn_if_case_sets_differ

    client = MlflowClient(tracking_uri=tracking_uri)
    tables = {run_id: _run_metrics(client, run_id) for run_id in run_ids}
    warn_if_case_sets_differ([client.get_run(run_id) for run_id in run_ids])
    result = PairedComparison(alpha=alpha)
    first = run_ids[0]
    for other in run_ids[1:]:
        rows, only_one = paired_rows(first, tables[first], other, tables[other], resamples, seed)
        if only_one:
            log.warning(
                "runs %s and %s were evaluated on different cases: %d case-region entr%s evaluated by only one run %s left out",
                first[:8], other[:8], only_one, "y" if only_one == 1 else "ies", "is" if only_one == 1 else "are",
            )
        if not rows:
            raise RunError(f"runs {first} and {other} have no evaluated case in common")
        result.rows.extend(rows)
        shared = sorted(set(tables[first]) & set(tables[other]))
        result.pairs[(first, other)] = [
            (case, region, tables[first][(case, region)]["dice"], tables[other][(case, region)]["dice"])
            for case, region in shared
            if "dice" in tables[first][(case, region)] and "dice" in tables[other][(case, region)]
        ]
    if out_dir is not None:
        out = Path(out_dir)
        result.csv_path, result.png_path = out / "paired.csv", out / "paired.png"
        write_text(result.csv_path, _to_csv(result.rows))
        _plot(result, result.png_path)
    return result


def _to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(PAIRED_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def _verdict(row: Mapping[str, Any], alpha: float) -> str:
    if row["p_value"] >= alpha:
        return "no significant difference"
    better = row["mean_diff"] < 0 if row["metric"].startswith("hd") else row["mean_diff"] > 0  # HD95: lower is better
    return f"B {'better' if better else 'worse'} (significant at {alpha:g})"


def format_paired(result: PairedComparison) -> str:
    """A text table of the rows, with a verdict in words per row."""
    cols = ["run_a", "run_b", "region", "metric", "n", "mean_a", "mean_b", "mean_diff", "95% CI", "p_value", "verdict"]
    cells = []
    for row in result.rows:
        cells.append([
            row["run_a"][:8], row["run_b"][:8], row["region"], row["metric"], str(row["n"]),
            f"{row['mean_a']:.4f}", f"{row['mean_b']:.4f}", f"{row['mean_diff']:+.4f}",
            f"[{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]", f"{row['p_value']:.4g}", _verdict(row, result.alpha),
        ])
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths))
    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _plot(result: PairedComparison, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brats_psp.plots import save_figure

    pairs = list(result.pairs.items())
    fig, axes = plt.subplots(len(pairs), len(REGION_NAMES), figsize=(3.6 * len(REGION_NAMES), 3.4 * len(pairs)), squeeze=False)
    for row_axes, ((run_a, run_b), points) in zip(axes, pairs):
        for ax, region in zip(row_axes, REGION_NAMES):
            xy = np.array([(a, b) for _, r, a, b in points if r == region]).reshape(-1, 2)
            ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--")
            ax.scatter(xy[:, 0], xy[:, 1], s=18)
            ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel=f"Dice {region}, {run_a[:8]} (A)", ylabel=f"{run_b[:8]} (B)")
            ax.set_title(f"{region}: {len(xy)} cases", fontsize=10)
            ax.grid(alpha=0.3)
    fig.suptitle("paired Dice per case: above the diagonal, B is better", fontsize=11)
    fig.tight_layout()
    save_figure(fig, out)
