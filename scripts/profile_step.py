"""Profile one GRPO step of a preset with torch.profiler, split into phases.

    python scripts/profile_step.py --preset cpu-demo --arm vanilla --arm evil_moe

For each arm: setup (v_act extraction for routed arms), one warm-up step, then
one profiled step. Prints per phase (sampling, grading, reference pass,
training forward, backward, optimizer) its wall seconds inside the profiled
step and its share, then the operators with the most self CPU time. The
phases are marked by wrapping the library functions that implement them
(nothing in the library changes), so the script follows the code as it is.
Writes the full tables to ``--out`` (default ``runs/profile/<preset>-<arm>.txt``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

PHASES = ("sampling", "grading", "reference pass", "training forward", "backward", "optimizer")


def _wrap(owner, name: str, label) -> callable:
    """Replace ``owner.name`` by a wrapper that runs it inside ``record_function(label())``."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        with record_function(label() if callable(label) else label):
            return original(*args, **kwargs)
    setattr(owner, name, wrapper)
    return lambda: setattr(owner, name, original)


def _forward_label() -> str:
    return "training forward" if torch.is_grad_enabled() else "reference pass"


@contextlib.contextmanager
def phase_markers(state):
    from evil_moe import grpo, rollout, sequences
    undo = [_wrap(rollout, "sample", "sampling"),
            _wrap(grpo, "_grade", "grading"),
            _wrap(torch.Tensor, "backward", "backward"),
            _wrap(state.optimizer, "step", "optimizer"),
            _wrap(torch.nn.utils, "clip_grad_norm_", "optimizer")]
    # every scoring entry point the loop may use (grpo imports them by name)
    for mod in (grpo, sequences):
        for fn in ("completion_logprobs", "grouped_completion_logprobs"):
            if hasattr(mod, fn):
                undo.append(_wrap(mod, fn, _forward_label))
    try:
        yield
    finally:
        for u in reversed(undo):
            u()


def profile_arm(preset: str, arm: str, out_dir: Path, overrides: dict) -> dict:
    from evil_moe import grpo
    from evil_moe.config import load_preset
    cfg = load_preset(preset, arm=arm, **overrides)
    cfg = cfg.replace(steps=max(cfg.steps, 3))
    with tempfile.TemporaryDirectory() as tmp:
        if arm in grpo.ROUTED_ARMS:
            grpo.extract_v_act_for_run(cfg, tmp)
        state = grpo.setup(cfg, tmp)
        try:
            grpo.train_step(state, 0)                                  # warm-up
            with phase_markers(state), profile(activities=[ProfilerActivity.CPU]) as prof:
                with record_function("step"):
                    t0 = time.perf_counter()
                    metrics = grpo.train_step(state, 1)
                    wall = time.perf_counter() - t0
        finally:
            state.adapter.remove()
            if state.grader is not None:
                state.grader.close()
    events = prof.key_averages()
    by_name = {e.key: e for e in events}
    rows = []
    for phase in PHASES:
        e = by_name.get(phase)
        seconds = e.cpu_time_total / 1e6 if e is not None else 0.0
        rows.append((phase, seconds, e.count if e is not None else 0))
    other = wall - sum(s for _, s, _ in rows)
    lines = [f"# {preset} / {arm}: one profiled step ({metrics['completion_tokens']} completion "
             f"tokens, {torch.get_num_threads()} threads), wall {wall:.1f} s",
             f"{'phase':<18} {'seconds':>8} {'share':>6} {'calls':>6}"]
    lines += [f"{p:<18} {s:8.2f} {s / wall:6.1%} {n:6d}" for p, s, n in rows]
    lines.append(f"{'(rest)':<18} {other:8.2f} {other / wall:6.1%}")
    lines.append("")
    lines.append(events.table(sort_by="self_cpu_time_total", row_limit=25))
    text = "\n".join(lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{preset}-{arm}.txt").write_text(text)
    return {"wall": wall, "phases": rows, "text": text}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu-demo")
    ap.add_argument("--arm", action="append", help="arm to profile (repeatable); default vanilla "
                    "and evil_moe")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. --set micro_batch_size=16")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    import yaml
    from evil_moe import paths
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    out = args.out or paths.runs_dir() / "profile"
    for arm in args.arm or ["vanilla", "evil_moe"]:
        res = profile_arm(args.preset, arm, out, overrides)
        print(res["text"].split("\n\n")[0], flush=True)
        print(flush=True)
    print(f"full tables in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
