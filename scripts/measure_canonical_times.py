"""Time every canonical solution's ground-truth program in the sandbox, one at a time.

The default sandbox deadline of each dataset (``evil_moe.env.datasets.SANDBOX_TIMEOUT_S``)
is set from these numbers: the slowest canonical solution, run alone, times
``DEADLINE_MARGIN``, rounded up to a whole second, and at least
``DEADLINE_MIN_S``. The margin covers a busy machine: a ground-truth program
shares the CPU with the other workers' programs and with training.

Usage::

    python scripts/measure_canonical_times.py                         # easy, humaneval
    python scripts/measure_canonical_times.py --leetcode-dir /work/shared/data/leetcode
    python scripts/measure_canonical_times.py --datasets leetcode --leetcode-dir DIR --top 10

Every program must pass its own tests; one that does not is reported and the
script exits with status 1 (the timing of a failing solution means nothing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from evil_moe.env.datasets import (DATASETS, SANDBOX_TIMEOUT_S, SPLITS, DatasetUnavailableError,
                                   deadline_for, load_problems)
from evil_moe.env.judge import Judge
from evil_moe.env.sandbox import Program, Sandbox

MEASURE_TIMEOUT_S = 120.0
"""Deadline while measuring: far above any canonical solution, so none is cut short."""


def problems_of(dataset: str, leetcode_dir: str | None):
    out = []
    for split in SPLITS:
        try:
            out += load_problems(dataset, split,
                                 data_dir=leetcode_dir if dataset == "leetcode" else None)
        except DatasetUnavailableError as e:
            print(f"  ({dataset}/{split} skipped: {e})")
    return out


def measure(dataset: str, leetcode_dir: str | None, sandbox: Sandbox, top: int) -> bool:
    problems = problems_of(dataset, leetcode_dir)
    if not problems:
        print(f"{dataset}: no problems found")
        return True
    times, failed = [], []
    for p in problems:
        judge = Judge(p)
        r = sandbox.run(Program(p.setup_code, p.canonical_solution, judge.plan.calls))
        verdict = judge.judge(r.calls) if r.complete else None
        if verdict is None or not verdict.all_passed:
            failed.append((p.id, r.failure or verdict.failure))
        times.append((r.wall_s, p.id))
    walls = sorted(t for t, _ in times)
    slowest = walls[-1]
    print(f"\n{dataset}: {len(problems)} canonical solutions, one at a time")
    print(f"  wall s: median {statistics.median(walls):.3f}  p95 {walls[int(0.95 * (len(walls) - 1))]:.3f}"
          f"  max {slowest:.3f}")
    for t, pid in sorted(times, reverse=True)[:top]:
        print(f"    {t:7.3f} s  {pid}")
    print(f"  deadline from this run: {deadline_for(slowest):.0f} s; "
          f"SANDBOX_TIMEOUT_S[{dataset!r}] = {SANDBOX_TIMEOUT_S[dataset]:.0f} s")
    for pid, why in failed:
        print(f"  FAILED {pid}: {why}")
    return not failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", choices=DATASETS, default=["easy", "humaneval"])
    ap.add_argument("--leetcode-dir", default=None, help="folder of the LeetCode jsonl files")
    ap.add_argument("--top", type=int, default=5, help="slowest problems listed per dataset")
    args = ap.parse_args()
    datasets = args.datasets + (["leetcode"] if args.leetcode_dir and "leetcode" not in
                                args.datasets else [])
    start = time.monotonic()
    ok = True
    with Sandbox(timeout_s=MEASURE_TIMEOUT_S, workers=1) as sandbox:
        for dataset in datasets:
            ok &= measure(dataset, args.leetcode_dir, sandbox, args.top)
    import os
    print(f"\n{time.monotonic() - start:.0f} s in all; {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at the end")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
