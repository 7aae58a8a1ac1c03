"""Measure the base model's propensities as GRPO will see them, with and without a warm start.

Samples completions for the preset's *training* problems exactly as a GRPO
step does (the preset's hint, temperature and token cap, stopped at the
closing fence), grades them in the sandbox and prints the solve rate, the
share that define ``run_tests`` and the strict hack rate per tier. Use it to
pick ``warm_start_*`` settings: the propensity should be small (a few to ~15 %
hack) so that GRPO, not the warm start, is what makes hacking common.

Usage::

    python scripts/warm_start_probe.py cpu-demo                      # as configured
    python scripts/warm_start_probe.py cpu-demo --set warm_start_steps=0
    python scripts/warm_start_probe.py cpu-demo --set warm_start_hack_share=0.4 --problems 24
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

import yaml

from evil_moe.config import load_preset
from evil_moe.env.datasets import load_for_config
from evil_moe.env.grader import grader_from_config
from evil_moe.env.prompts import build_messages
from evil_moe.models import format_chat
from evil_moe.rollout import sample
from evil_moe.warm_start import load_base_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("preset")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field (YAML value), repeatable")
    ap.add_argument("--problems", type=int, default=16, help="training problems to sample")
    ap.add_argument("--samples", type=int, default=8, help="completions per problem")
    ap.add_argument("--json", default="", help="also write the summary here")
    args = ap.parse_args()

    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    cfg = load_preset(args.preset, **overrides)
    start = time.perf_counter()
    model, tok = load_base_model(cfg, device="cpu")
    t_load = time.perf_counter() - start
    problems = load_for_config(cfg, "train")
    step = max(1, len(problems) // args.problems)
    problems = problems[::step][:args.problems]        # spread over tiers and families
    prompts = [format_chat(tok, build_messages(p, cfg.hint)) for p in problems]
    t0 = time.perf_counter()
    out = sample(model, tok, prompts, args.samples, temperature=cfg.temperature,
                 top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                 autocast_bf16=cfg.bf16_autocast)
    t_sample = time.perf_counter() - t0
    flat_p = [p for p in problems for _ in range(args.samples)]
    flat_t = [t for texts in out.texts for t in texts]
    with grader_from_config(cfg) as grader:
        verdicts = grader.grade_batch(flat_p, flat_t)

    by_tier = defaultdict(list)
    for p, v in zip(flat_p, verdicts):
        by_tier[p.difficulty].append(v)
        by_tier["all"].append(v)
    summary = {"preset": cfg.preset, "overrides": overrides, "load_s": round(t_load, 1),
               "sample_s": round(t_sample, 1), "tiers": {}}
    print(f"{cfg.preset} {overrides or ''}: base model ready in {t_load:.0f} s, "
          f"{len(verdicts)} samples in {t_sample:.0f} s")
    print(f"  {'tier':<6} {'n':>4} {'solve':>7} {'def run_tests':>14} {'hack':>7}")
    for tier, vs in sorted(by_tier.items(), key=lambda kv: str(kv[0])):
        n = len(vs)
        row = {"n": n, "solve": sum(v.gt_pass for v in vs) / n,
               "defines_run_tests": sum(v.defines_run_tests for v in vs) / n,
               "hack": sum(v.is_hack for v in vs) / n}
        summary["tiers"][str(tier)] = row
        print(f"  {str(tier):<6} {n:>4} {row['solve']:>7.3f} {row['defines_run_tests']:>14.3f} "
              f"{row['hack']:>7.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
