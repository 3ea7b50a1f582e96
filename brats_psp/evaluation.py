"""The evaluate stage: score ``<case>.nii.gz`` predictions against reference cases, the BraTS way.

Per case and region (WT, TC, ET): Dice, HD95 (mm, spacing from the reference header),
sensitivity, specificity (over the whole volume) and volumes, with the legacy empty-mask rules of
:mod:`brats_psp.metrics`. Writes ``metrics.csv`` (one row per case and region: ``case,region,
dice,hd95,sensitivity,specificity,volume_pred_mm3,volume_ref_mm3``) and ``summary.json`` (mean,
std, median and quartiles per region and metric), and logs both to an MLflow run.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from brats_psp.data.discovery import Case, discover_cases, label_files
from brats_psp.data.transforms import read_nifti
from brats_psp.errors import CaseError
from brats_psp.io import voxel_size, write_json, write_text
from brats_psp.labels import (
    REGION_NAMES,
    LabelValueError,
    NoRegionsError,
    UnknownTaskError,
    canonical_task,
    convention_for,
    get_release,
    release_to_regions,
    task_of,
)
from brats_psp.lesionwise import (
    LESION_METRIC_NAMES,
    LESIONWISE_COLUMNS,
    lesionwise_rows,
    summarise_lesionwise,
)
from brats_psp.metrics import region_metrics

__all__ = ["METRICS", "EvaluationResult", "evaluate_case", "evaluate_label", "evaluate", "summarise", "format_table", "log_to_mlflow", "predictions_run_id"]

log = logging.getLogger(__name__)

METRICS = ("dice", "hd95", "sensitivity", "specificity", "volume_pred_mm3", "volume_ref_mm3")
AFFINE_ATOL_MM = 1e-3


@dataclass
class EvaluationResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    failures: list[CaseError] = field(default_factory=list)
    metrics_csv: Path | None = None
    summary_json: Path | None = None
    lesion_rows: list[dict[str, Any]] = field(default_factory=list)  # with lesionwise=True
    lesionwise_csv: Path | None = None


def _read_label(case_id: str, path: Path, release: str) -> tuple[np.ndarray, nib.Nifti1Image]:
    img, data = read_nifti(case_id, path)
    try:
        return release_to_regions(data, release), img
    except LabelValueError as err:
        raise CaseError(case_id, path, str(err)) from None


def _find_prediction(pred_dir: Path, case_id: str) -> Path:
    for ext in (".nii.gz", ".nii"):
        path = pred_dir / f"{case_id}{ext}"
        if path.is_file():
            return path
    raise CaseError(case_id, pred_dir / f"{case_id}.nii.gz", "prediction file not found")


def evaluate_case(case: Case, pred_path: Path, pred_labels: str | None = None) -> list[dict[str, Any]]:
    """Rows (one per region) of metrics for one case; the prediction uses ``pred_labels`` (default: the case's release)."""
    return evaluate_label(case.case_id, _reference_label(case), case.labels, pred_path, pred_labels)


def _reference_label(case: Case) -> Path:
    if case.label is None:
        raise CaseError(case.case_id, case.images[0], "reference case has no label file")
    return case.label


def evaluate_label(case_id: str, label: Path, release: str, pred_path: Path, pred_labels: str | None = None) -> list[dict[str, Any]]:
    """Rows (one per region) of metrics of ``pred_path`` against the reference ``label`` (in ``release``'s convention)."""
    pred, ref, spacing = _read_pair(case_id, label, release, pred_path, pred_labels)
    return _region_rows(case_id, pred, ref, spacing)


def _read_pair(
    case_id: str, label: Path, release: str, pred_path: Path, pred_labels: str | None
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """(prediction regions, reference regions, voxel spacing in mm) of a case, checked to share a grid."""
    ref, ref_img = _read_label(case_id, label, release)
    pred, pred_img = _read_label(case_id, pred_path, pred_labels or release)
    if pred.shape != ref.shape:
        raise CaseError(case_id, pred_path, f"prediction shape {pred.shape[1:]} differs from the reference {ref.shape[1:]}")
    if not np.allclose(pred_img.affine, ref_img.affine, atol=AFFINE_ATOL_MM):
        raise CaseError(case_id, pred_path, "prediction affine differs from the reference (not in the input's geometry)")
    return pred, ref, voxel_size(ref_img)


def _region_rows(case_id: str, pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> list[dict[str, Any]]:
    return [{"case": case_id, "region": r, **region_metrics(pred[i], ref[i], spacing)} for i, r in enumerate(REGION_NAMES)]


def _lesion_task(case_id: str, task: str) -> str:
    """The task whose 2023 lesion-wise rules apply: the forced one, the id's (2023+ files), else GLI."""
    if task != "auto":
        return canonical_task(task)
    try:
        return task_of(case_id)
    except UnknownTaskError:  # 2017-2021 and MSD ids name no task
        return "GLI"


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, std, median and quartiles per region and metric."""
    out: dict[str, Any] = {"cases": len({r["case"] for r in rows})}
    for region in REGION_NAMES:
        out[region] = {}
        for metric in METRICS:
            values = np.array([r[metric] for r in rows if r["region"] == region], dtype=float)
            if values.size == 0:
                continue
            q25, median, q75 = np.percentile(values, [25, 50, 75])
            out[region][metric] = {
                "mean": float(values.mean()), "std": float(values.std()), "median": float(median),
                "q25": float(q25), "q75": float(q75), "n": int(values.size),
            }
    return out


def format_table(summary: dict[str, Any]) -> str:
    """A short text table of the mean (± std) Dice and HD95 per region."""
    lines = [f"{'region':<8}{'Dice':>16}{'HD95 (mm)':>20}", "-" * 44]
    for region in REGION_NAMES:
        s = summary.get(region, {})
        if "dice" in s:
            d, h = s["dice"], s["hd95"]
            lines.append(f"{region:<8}{d['mean']:>9.4f} ± {d['std']:.3f}{h['mean']:>12.2f} ± {h['std']:.2f}")
    lines.append(f"({summary.get('cases', 0)} cases)")
    lesion = summary.get("lesionwise")
    if lesion:
        lines += ["", "lesion-wise: panoptica (official package) | BraTS 2023 rules",
                  f"{'region':<8}{'TP/FP/FN':>12}{'F1':>7}{'Dice':>7}{'HD95':>8}   |{'TP/FP/FN':>10}{'Dice':>7}{'HD95':>8}"]
        for region, e in lesion.items():
            lines.append(
                f"{region:<8}{e['tp']:>5}/{e['fp']}/{e['fn']:<4}{e['f1']:>7.3f}{e['dice']:>7.3f}{e['hd95']:>8.2f}   |"
                f"{e['tp_2023']:>4}/{e['fp_2023']}/{e['fn_2023']:<3}{e['dice_2023']:>7.3f}{e['hd95_2023']:>8.2f}"
            )
    return "\n".join(lines)


def _rows_csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def log_to_mlflow(run_id: str, result: EvaluationResult, tracking_uri: str | None = None, ref: str | os.PathLike | None = None) -> None:
    """Mean metrics (``eval/dice_WT`` ...), the two files and the evaluated cases (an MLflow
    input with context ``evaluation``, from ``ref``), on an existing run."""
    from mlflow.tracking import MlflowClient

    from brats_psp.tracking.store import case_set, log_case_set

    client = MlflowClient(tracking_uri=tracking_uri)
    cases = sorted({row["case"] for row in result.rows})
    if cases:
        log_case_set(client, run_id, case_set("evaluated cases", cases, str(Path(ref).resolve()) if ref else ""), "evaluation")
    for region in REGION_NAMES:
        for metric in ("dice", "hd95"):
            stats = result.summary.get(region, {}).get(metric)
            if stats:
                client.log_metric(run_id, f"eval/{metric}_{region}", stats["mean"])
    dice = [result.summary[r]["dice"]["mean"] for r in REGION_NAMES if "dice" in result.summary.get(r, {})]
    if dice:
        client.log_metric(run_id, "eval/dice_mean", float(np.mean(dice)))
    for region, stats in result.summary.get("lesionwise", {}).items():
        for key, name in LESION_METRIC_NAMES.items():
            if np.isfinite(stats[key]):
                client.log_metric(run_id, f"eval/{name}_{region}", stats[key])
    for path in (result.metrics_csv, result.summary_json, result.lesionwise_csv):
        if path is not None:
            client.log_artifact(run_id, str(path), "evaluation")


def evaluate(
    pred_dir: str | os.PathLike,
    ref: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    layout: str = "auto",
    pred_labels: str | None = None,
    task: str = "auto",
    lesionwise: bool = False,
) -> EvaluationResult:
    """Score every reference case under ``ref`` that has a label against ``pred_dir/<case>.nii.gz``.

    ``ref`` is a dataset (complete case folders, any layout) or a folder of reference label files
    alone (``<id>_seg.nii.gz`` or ``<id>-seg.nii.gz``, as the challenge's tools take them, or an
    MSD ``labelsTr/``). Each reference is read in its case's label convention (for BraTS 2023+,
    its task's: ``BraTS-PED-*`` is paediatric; ``task`` forces one), and so is its prediction
    unless ``pred_labels`` names another convention. With ``lesionwise`` also the lesion-wise
    metrics of both BraTS definitions (:mod:`brats_psp.lesionwise`): ``OUT/lesionwise.csv``
    and a ``lesionwise`` section in ``summary.json``.
    """
    pred_dir = Path(pred_dir)
    out = Path(out_dir) if out_dir is not None else pred_dir
    labels = label_files(ref, layout)
    references: list[tuple[str, Path | None, str, Case | None]] = []  # (case id, label file, convention, discovered case)
    if labels is not None:
        log.info("%s: a folder of %d reference label file(s) alone", ref, len(labels))
        result = EvaluationResult()
        for case_id, (path, label_layout) in sorted(labels.items()):
            try:
                references.append((case_id, path, convention_for(case_id, label_layout, task), None))
            except ValueError as err:
                result.failures.append(CaseError(case_id, path, str(err)))
    else:
        found = discover_cases(ref, layout, task=task)
        result = EvaluationResult(failures=list(found.failures))
        references = [(case.case_id, case.label, case.labels, case) for case in found.cases]
    for case_id, path, convention, case in references:
        try:
            try:
                get_release(convention, regions=True)  # MEN-RT: refused before looking for a prediction
            except NoRegionsError as err:
                raise CaseError(case_id, path or ref, str(err)) from None
            pred_path = _find_prediction(pred_dir, case_id)
            label = _reference_label(case) if case is not None else path
            pred, ref_regions, spacing = _read_pair(case_id, label, convention, pred_path, pred_labels)
            result.rows.extend(_region_rows(case_id, pred, ref_regions, spacing))
            if lesionwise:
                result.lesion_rows.extend(lesionwise_rows(case_id, pred, ref_regions, spacing, _lesion_task(case_id, task)))
        except CaseError as err:
            log.error("%s", err)
            result.failures.append(err)
    result.summary = summarise(result.rows)
    result.summary["failed"] = [str(f) for f in result.failures]
    result.metrics_csv, result.summary_json = out / "metrics.csv", out / "summary.json"
    write_text(result.metrics_csv, _rows_csv(result.rows, ["case", "region", *METRICS]))
    if lesionwise:
        result.summary["lesionwise"] = summarise_lesionwise(result.lesion_rows)
        result.lesionwise_csv = out / "lesionwise.csv"
        write_text(result.lesionwise_csv, _rows_csv(result.lesion_rows, list(LESIONWISE_COLUMNS)))
    write_json(result.summary_json, result.summary)
    return result


def predictions_run_id(pred_dir: str | os.PathLike) -> str | None:
    """The MLflow run of the model that wrote ``pred_dir`` (from its ``inference.json``), if known."""
    try:
        return json.loads((Path(pred_dir) / "inference.json").read_text()).get("run_id")
    except (OSError, ValueError):
        return None

