"""compare on two smoke runs with different settings."""

from __future__ import annotations

import csv
from pathlib import Path

from brats_psp.compare import compare_runs, format_comparison
from brats_psp.training import train
from tests.test_training import smoke_config, tiny_data  # noqa: F401  (fixture)


def test_compare_two_runs(tiny_data: Path, tmp_path: Path) -> None:  # noqa: F811
    a = train(smoke_config(tmp_path, "train.epochs=1", "tracking.run_name=progressive"), data=tiny_data, progress=False)
    b = train(
        smoke_config(tmp_path, "train.epochs=1", "model.decoder=bilinear", "train.lr=0.003", "tracking.run_name=bilinear"),
        data=tiny_data, progress=False,
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
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
