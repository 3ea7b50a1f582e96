"""Before and after: the inference benchmark's default run at several commits, back to back.

    python benchmarks/commits.py COMMIT [COMMIT ...] [--repeats 3] [-- extra inference.py args]

Each commit is checked out in a temporary git worktree; today's ``benchmarks/`` scripts run
there with that commit's package (``--no-seed``: the default end to end and the network alone
on the same slices). Absolute seconds drift between runs on a shared machine; the overhead
fraction (time outside the network / end to end) is measured inside each run and is the
number to compare. Writes ``benchmarks/results/commits.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import ROOT, table, write_result


def run_at(commit: str, repeats: int, extra: list[str], tmp: Path) -> dict[str, Any]:
    tree = tmp / commit
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=ROOT, check=True, capture_output=True)
    try:
        shutil.copytree(ROOT / "benchmarks", tree / "benchmarks", dirs_exist_ok=True, ignore=shutil.ignore_patterns("results"))
        out = tmp / f"{commit}.json"
        cmd = [sys.executable, "benchmarks/inference.py", "--no-seed", "--repeats", str(repeats), "--out", str(out), *extra]
        proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{commit}: {proc.stderr[-3000:]}")
        return json.loads(out.read_text())
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("commits", nargs="+")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="JSON path (default benchmarks/results/commits.json)")
    args, extra = ap.parse_known_args()
    extra = [a for a in extra if a != "--"]
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for commit in args.commits:
            print(f"-- {commit}", flush=True)
            r = run_at(commit, args.repeats, extra, Path(tmp))
            s = r["seconds"]
            e2e = sorted(s["default_end_to_end"])[len(s["default_end_to_end"]) // 2]
            results[commit] = r
            rows.append([commit[:10], e2e, s["network_inside_end_to_end"], r["ratios"]["overhead_fraction"], r["peak_rss_gib"]["default_end_to_end"]])
            print(f"   end to end {e2e:.2f} s, overhead {100 * r['ratios']['overhead_fraction']:.0f} %", flush=True)
    print()
    print(table(rows, ["commit", "end to end s", "network inside s", "overhead fraction", "peak RSS GiB"]))
    write_result("commits", {"commits": args.commits, "results": results}, args.out)


if __name__ == "__main__":
    main()
