"""Benchmark: `zsd quickstart` of this checkout vs an earlier commit, side by side in one run.

    python tools/bench_quickstart.py [--before b04bff7] [--rounds 1]

Each side runs the whole quickstart (teacher pass, training, evaluation, coverage) in a fresh
process with its own empty cache and run folders, so nothing is reused; the earlier commit runs
from a temporary `git worktree`. Rounds alternate the sides, so a load change on a shared machine
hits both alike. Prints each side's wall clock, its student's top-1, and the speed-up. The default
`--before` is the last commit before the CPU-speed work (issue 15).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_side(code: Path, work: Path) -> dict:
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(code), "ZSD_CACHE": str(work / "cache")}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "zsd", "quickstart", "--out", str(work / "runs")], cwd=work,
                         env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"quickstart of {code} failed: {out.stderr.strip().splitlines()[-1]}")
    evals = sorted((work / "runs").rglob("eval/*.json"))
    top1 = {json.loads(p.read_text())["role"]: json.loads(p.read_text())["metrics"]["acc1"] for p in evals}
    return {"seconds": seconds, "top1": top1}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="b04bff7", help="The earlier commit to compare with.")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tmp / "before"), args.before],
                       check=True, capture_output=True)
        try:
            results = {"before": [], "now": []}
            for r in range(args.rounds):
                for side, code in (("before", tmp / "before"), ("now", ROOT)):
                    results[side].append(run_side(code, tmp / f"{side}{r}"))
                    print(f"round {r + 1} {side}: {results[side][-1]['seconds']:.0f} s, "
                          f"top-1 {results[side][-1]['top1']}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "before")],
                           capture_output=True)
    best = {side: min(runs, key=lambda x: x["seconds"]) for side, runs in results.items()}
    from zsd.cpu import describe_machine
    print(f"{describe_machine()}; best of {args.rounds} round(s)")
    print(f"quickstart at {args.before}: {best['before']['seconds']:.0f} s, student top-1 "
          f"{best['before']['top1'].get('student', float('nan')):.3f}")
    print(f"quickstart now:        {best['now']['seconds']:.0f} s, student top-1 "
          f"{best['now']['top1'].get('student', float('nan')):.3f}")
    print(f"speed-up = {best['before']['seconds'] / best['now']['seconds']:.2f}x  (target >= 2)")


if __name__ == "__main__":
    main()
