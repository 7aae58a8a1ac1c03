"""Profile one GRPO step of a preset with torch.profiler, split into phases.

    python scripts/profile_step.py --preset cpu-demo --arm vanilla --arm evil_moe

For each arm: setup (v_act extraction for routed arms), one warm-up step, then
one measured step. Prints per phase (sampling, grading, reference pass,
training forward, backward, optimizer) its wall seconds inside the measured
step and its share, then torch.profiler's operators with the most self CPU
time over everything after sampling (the decode loop's millions of small
events would cost more memory than the machine has). The phases are marked by
wrapping the library functions that implement them (nothing in the library
changes), so the script follows the code as it is.
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


class PhaseClock:
    """Wall seconds per phase, and the profiler switched on once sampling has returned."""

    def __init__(self, prof):
        self.seconds = {p: 0.0 for p in PHASES}
        self.calls = {p: 0 for p in PHASES}
        self.prof = prof
        self.active: str | None = None           # the outermost phase running now

    def wrap(self, owner, name: str, label) -> callable:
        """Replace ``owner.name`` by a timed wrapper; returns the undo."""
        original = getattr(owner, name)
        clock = self

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            phase = label() if callable(label) else label
            if clock.active is not None:          # nested (e.g. clipping inside a phase)
                return original(*args, **kwargs)
            clock.active, t0 = phase, time.perf_counter()
            try:
                with record_function(phase):
                    return original(*args, **kwargs)
            finally:
                clock.seconds[phase] += time.perf_counter() - t0
                clock.calls[phase] += 1
                clock.active = None
                if phase == "sampling" and clock.prof is not None:
                    clock.prof.start()
        setattr(owner, name, wrapper)
        return lambda: setattr(owner, name, original)


def _forward_label() -> str:
    return "training forward" if torch.is_grad_enabled() else "reference pass"


@contextlib.contextmanager
def phase_markers(state, clock: PhaseClock):
    from evil_moe import grpo, rollout, sequences
    undo = [clock.wrap(rollout, "sample", "sampling"),
            clock.wrap(grpo, "_grade", "grading"),
            clock.wrap(torch.Tensor, "backward", "backward"),
            clock.wrap(state.optimizer, "step", "optimizer"),
            clock.wrap(torch.nn.utils, "clip_grad_norm_", "optimizer")]
    # every scoring entry point the loop may use (grpo imports them by name)
    for mod in (grpo, sequences):
        for fn in ("completion_logprobs", "score_completions", "prefill_prompts"):
            if hasattr(mod, fn):
                undo.append(clock.wrap(mod, fn, _forward_label))
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
            prof = profile(activities=[ProfilerActivity.CPU])
            clock = PhaseClock(prof)
            with phase_markers(state, clock):
                t0 = time.perf_counter()
                metrics = grpo.train_step(state, 1)
                wall = time.perf_counter() - t0
            prof.stop()
        finally:
            state.adapter.remove()
            if state.grader is not None:
                state.grader.close()
    events = prof.key_averages()
    rows = [(p, clock.seconds[p], clock.calls[p]) for p in PHASES]
    other = wall - sum(s for _, s, _ in rows)
    lines = [f"# {preset} / {arm}: one profiled step ({metrics['completion_tokens']} completion "
             f"tokens, {torch.get_num_threads()} threads), wall {wall:.1f} s",
             f"{'phase':<18} {'seconds':>8} {'share':>6} {'calls':>6}"]
    lines += [f"{p:<18} {s:8.2f} {s / wall:6.1%} {n:6d}" for p, s, n in rows]
    lines.append(f"{'(rest)':<18} {other:8.2f} {other / wall:6.1%}")
    lines.append("")
    lines.append("operators after sampling, by self CPU time:")
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
