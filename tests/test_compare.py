"""compare on smoke runs: side by side, and paired on the test cases both runs evaluated."""

from __future__ import annotations

import csv
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import wilcoxon

from brats_psp.compare import compare_runs, format_comparison
from brats_psp.paired import _LESION_METRICS, PAIRED_COLUMNS, paired_rows, read_case_metrics
from brats_psp.training import TrainResult, train
from tests.conftest import run_cli
from tests.test_training import smoke_config, tiny_data  # noqa: F401  (fixture)


@dataclass
class Runs:
    """Smoke runs shared by this module's tests, in one store: ``a`` and ``b`` (experiment
    brats_psp, different settings) and ``c`` (another experiment, never evaluated)."""

    a: TrainResult
    b: TrainResult
    c: TrainResult
    root: Path

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"


@pytest.fixture(scope="module")
def runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:  # noqa: F811
    root = tmp_path_factory.mktemp("runs")
    a = train(smoke_config(root, "train.epochs=1", "tracking.run_name=progressive"), data=tiny_data, progress=False)
    b = train(
        smoke_config(root, "train.epochs=1", "model.decoder=bilinear", "train.lr=0.003", "train.seed=1", "tracking.run_name=bilinear"),
        data=tiny_data, progress=False,
    )
    c = train(smoke_config(root, "train.epochs=1", "train.seed=2", "tracking.experiment=other"), data=tiny_data, progress=False)
    return Runs(a, b, c, root)


def test_compare_two_runs(runs: Runs, tmp_path: Path) -> None:
    a, b = runs.a, runs.b
    uri = runs.uri
    result = compare_runs("brats_psp", "val/dice_mean", out_dir=tmp_path / "cmp", tracking_uri=uri)
    assert {r["_full_id"] for r in result.rows} == {a.run_id, b.run_id}
    assert {"model.decoder", "train.lr"} <= set(result.differing_params)
    assert "train.epochs" not in result.differing_params
    best = [r["best val/dice_mean"] for r in result.rows]
    assert best == sorted(best, reverse=True)
    table = format_comparison(result)
    assert "bilinear" in table and "progressive" in table and a.run_id[:8] in table and "FINISHED" in table
    with open(tmp_path / "cmp" / "comparison.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and "best val/dice_mean" in rows[0] and "model.decoder" in rows[0]
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 10_000
    only_b = compare_runs(metric="val/dice_mean", run_ids=[b.run_id], tracking_uri=uri)
    assert [r["_full_id"] for r in only_b.rows] == [b.run_id]


# --------------------------------------------------------------------------- paired comparison


def _metrics_csv(path: Path, values: dict[tuple[str, str], tuple[float, float]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["case,region,dice,hd95"] + [f"{c},{r},{d},{h}" for (c, r), (d, h) in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _cases(n: int, seed: int) -> dict[tuple[str, str], tuple[float, float]]:
    rng = np.random.default_rng(seed)
    return {(f"case{i:03d}", r): (float(rng.uniform(0.4, 0.95)), float(rng.uniform(1, 20))) for i in range(n) for r in ("WT", "TC", "ET")}


def test_paired_statistics_on_hand_made_metrics(tmp_path: Path) -> None:
    a = read_case_metrics(_metrics_csv(tmp_path / "a.csv", _cases(12, 0)))
    same, left_out = paired_rows("A", a, "A2", a)
    assert left_out == 0 and len(same) == 6  # 3 regions x (dice, hd95)
    for row in same:  # identical runs: no difference, p 1.0
        assert (row["mean_diff"], row["ci_low"], row["ci_high"], row["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    shifted = {k: {"dice": v["dice"] + 0.1, "hd95": v["hd95"]} for k, v in a.items()}
    rows, _ = paired_rows("A", a, "B", shifted)
    dice_wt = next(r for r in rows if r["region"] == "WT" and r["metric"] == "dice")
    assert dice_wt["mean_diff"] == pytest.approx(0.1) and dice_wt["ci_low"] > 0  # a constant shift: the interval excludes 0
    assert dice_wt["ci_low"] == pytest.approx(0.1) and dice_wt["ci_high"] == pytest.approx(0.1)
    # noisy differences: the p-value is scipy's paired Wilcoxon, the mean inside its interval
    b = read_case_metrics(_metrics_csv(tmp_path / "b.csv", _cases(12, 1)))
    rows, _ = paired_rows("A", a, "B", b, resamples=10_000, seed=3)
    for row in rows:
        keys = sorted(k for k in a if k[1] == row["region"])
        x, y = [a[k][row["metric"]] for k in keys], [b[k][row["metric"]] for k in keys]
        assert row["p_value"] == pytest.approx(wilcoxon(y, x).pvalue, abs=1e-6)
        assert row["ci_low"] <= row["mean_diff"] <= row["ci_high"] and row["n"] == 12
    assert paired_rows("A", a, "B", b, seed=3)[0] == rows  # seeded: the same interval again
    # cases evaluated by one run only are left out and counted
    fewer = {k: v for k, v in b.items() if k[0] != "case000"}
    rows, left_out = paired_rows("A", a, "B", fewer)
    assert left_out == 3 and {r["n"] for r in rows} == {11}


def test_paired_comparison_of_two_evaluated_runs_end_to_end(
    runs: Runs, tiny_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    uri = runs.uri
    fewer = tmp_path / "fewer"
    for case in sorted(tiny_data.iterdir())[:3]:  # the second run is evaluated on 3 of the 4 cases
        shutil.copytree(case, fewer / case.name)
    for run, ref in zip((runs.a, runs.b), (tiny_data, fewer)):
        pred = tmp_path / f"pred-{run.run_id[:8]}"
        assert run_cli("infer", "--model", str(run.best_checkpoint), "--input", str(tiny_data), "--output", str(pred)) == 0
        assert run_cli("evaluate", "--pred", str(pred), "--ref", str(ref), "--out", str(pred / "eval"), "--run", run.run_id, "--tracking-uri", uri, "--lesionwise") == 0
    a, b = runs.a.run_id, runs.b.run_id
    out = tmp_path / "paired"
    with caplog.at_level(logging.WARNING):
        assert run_cli("compare", "--runs", a, b, "--paired", "--out", str(out), "--tracking-uri", uri) == 0
    assert "evaluated on different cases: 3 case-region entries evaluated by only one run are left out" in caplog.text
    assert "different evaluation case sets" in caplog.text and "different training case sets" not in caplog.text
    with open(out / "paired.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(PAIRED_COLUMNS)
    whole = [r for r in rows if r["metric"] in ("dice", "hd95")]
    assert len(whole) == 6 and {r["n"] for r in whole} == {"3"}
    # the lesion-wise metrics of evaluate --lesionwise join them (2023 rules on every case)
    assert {r["metric"] for r in rows} >= {"lesion_dice_2023", "lesion_hd95_2023", "lesion_f1"}
    assert {r["n"] for r in rows if r["metric"] == "lesion_dice_2023"} == {"3"}

    def merged(run_id: str) -> dict:
        folder = tmp_path / f"pred-{run_id[:8]}" / "eval"
        table = read_case_metrics(folder / "metrics.csv")
        for key, values in read_case_metrics(folder / "lesionwise.csv").items():
            table[key].update({name: values[col] for col, name in _LESION_METRICS.items()})
        return table

    ma, mb = merged(a), merged(b)
    for row in rows:
        keys = sorted(set(ma) & set(mb))
        keys = [k for k in keys if k[1] == row["region"] and np.isfinite(ma[k][row["metric"]]) and np.isfinite(mb[k][row["metric"]])]
        assert len(keys) == int(row["n"])
        x, y = [ma[k][row["metric"]] for k in keys], [mb[k][row["metric"]] for k in keys]
        expected = 1.0 if x == y else wilcoxon(y, x).pvalue
        assert float(row["p_value"]) == pytest.approx(expected, abs=1e-6)
        assert float(row["ci_low"]) <= float(row["mean_diff"]) <= float(row["ci_high"])
    assert (out / "paired.png").stat().st_size > 10_000
    # evaluate --lesionwise --run logged the lesion-wise means with the whole-volume ones
    from mlflow.tracking import MlflowClient

    logged = MlflowClient(tracking_uri=uri).get_run(a).data.metrics
    assert {"eval/dice_WT", "eval/lesion_dice_2023_WT", "eval/lesion_hd95_2023_ET", "eval/lesion_f1_TC"} <= set(logged)
    summary_a = read_case_metrics(tmp_path / f"pred-{a[:8]}" / "eval" / "lesionwise.csv")
    expected = np.mean([v["dice_2023"] for (case, region), v in summary_a.items() if region == "WT"])
    assert logged["eval/lesion_dice_2023_WT"] == pytest.approx(expected, abs=1e-5)  # the CSV keeps 6 digits
    # the plain table shows the evaluation means next to the validation metrics
    table = format_comparison(compare_runs(run_ids=[a, b], tracking_uri=uri))
    assert "eval/dice_mean" in table and "eval/hd95_TC" in table
    # a run without an evaluation: a message that says how to make one
    c = runs.c
    caplog.clear()
    assert run_cli("compare", "--runs", a, c.run_id, "--paired", "--out", str(out), "--tracking-uri", uri) == 2
    assert f"run {c.run_id} has no evaluation" in caplog.text and f"evaluate --pred <predictions> --ref <test cases> --run {c.run_id}" in caplog.text


def test_promote_then_infer_by_alias_and_promote_again_moves_it(runs: Runs, tiny_data: Path, tmp_path: Path) -> None:  # noqa: F811
    import nibabel as nib
    from mlflow.tracking import MlflowClient

    uri, a, b = runs.uri, runs.a, runs.b
    assert run_cli("promote", a.run_id, "--name", "glioma", "--tracking-uri", uri) == 0
    by_alias, by_file = tmp_path / "by_alias", tmp_path / "by_file"
    assert run_cli("infer", "--model", "models:/glioma@champion", "--tracking-uri", uri, "--input", str(tiny_data), "--output", str(by_alias)) == 0
    assert run_cli("infer", "--model", str(a.best_checkpoint), "--input", str(tiny_data), "--output", str(by_file)) == 0
    written = sorted(by_file.glob("*.nii.gz"))
    assert len(written) == 4
    for path in written:  # the same labels, voxel for voxel
        np.testing.assert_array_equal(np.asarray(nib.load(by_alias / path.name).dataobj), np.asarray(nib.load(path).dataobj))

    client = MlflowClient(tracking_uri=uri)
    assert client.get_model_version_by_alias("glioma", "champion").run_id == a.run_id
    assert run_cli("promote", b.run_id, "--name", "glioma", "--tracking-uri", uri) == 0  # the alias moves to b's version
    assert client.get_model_version_by_alias("glioma", "champion").run_id == b.run_id
    assert run_cli("promote", a.run_id, "--name", "glioma", "--tracking-uri", uri) == 0  # back: a's version is reused
    versions = client.search_model_versions("name='glioma'")
    assert sorted(v.run_id for v in versions) == sorted([a.run_id, b.run_id])
    assert client.get_model_version_by_alias("glioma", "champion").run_id == a.run_id
    from brats_psp.checkpoint import resolve_checkpoint

    assert resolve_checkpoint("models:/glioma@champion", tracking_uri=uri) == a.best_checkpoint  # the run's own folder
