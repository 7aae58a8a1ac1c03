"""Measure ``routed_prompt: group_mean`` against the exact ``per_rollout`` path.

    python scripts/routed_prompt_check.py --run-dir runs/cpu-study/evil_moe-s0 --reps 2

``group_mean`` is an inexact option for the learned router's arms (config help,
book: method/grpo): each prompt's training forward runs twice at its rollouts'
mean ``w`` instead of once per rollout at its own ``w``. This script says how far
that moves one real step, and what it saves. From a routed run's newest
checkpoint (a trained adapter: at init the hack delta is zero and both paths are
equal), it rebuilds the run's training state, samples the step after the
checkpoint once, and then runs the rest of that step (grading, base-model pass,
router, training forward and backward, pin loss) alternately in both modes on the
same rollouts, ``--reps`` times each, with the optimizer step held back. Printed
and written to ``--out``:

- the training phase's seconds per mode (the step minus sampling), and their ratio;
- the training forward's log-probabilities of the completion tokens: mean and max
  absolute difference, and of each rollout's summed log-probability;
- the gradients handed to the optimizer: cosine similarity and relative error of
  ``group_mean`` against ``per_rollout``, for the deployed block, the hack block and
  the router.

It reads the run's files only; the run itself is not changed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


def _flat(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads]) if grads else torch.zeros(1)


def _compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict:
    """``b`` (group_mean) against ``a`` (per_rollout): cosine and relative error."""
    fa, fb = _flat(a).double(), _flat(b).double()
    return {"cosine": torch.nn.functional.cosine_similarity(fa, fb, dim=0).item(),
            "relative_error": ((fb - fa).norm() / fa.norm()).item(),
            "norm_ratio": (fb.norm() / fa.norm()).item()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True,
                        help="a routed run (evil_moe, haar, no_pin) with a checkpoint")
    parser.add_argument("--reps", type=int, default=2, help="timed repetitions per mode")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON of the numbers (default: print only)")
    args = parser.parse_args(argv)

    from safetensors.torch import load_file

    from evil_moe import arms, checkpoint, grpo, rollout
    from evil_moe.adapter import ADAPTER_FILE
    from evil_moe.evaluate import read_config

    cfg = read_config(args.run_dir)
    if not arms.get(cfg.arm).routed:
        print(f"error: {args.run_dir} is arm {cfg.arm!r}; routed_prompt only concerns the "
              f"learned router's arms ({', '.join(arms.ROUTED_ARMS)})", file=sys.stderr)
        return 2
    ckpt = checkpoint.latest(args.run_dir)
    step = grpo.checkpoint_step(args.run_dir)
    work = Path(tempfile.mkdtemp(prefix="routed-prompt-"))
    if (args.run_dir / grpo.V_ACT_FILE).exists():      # haar starts without one
        shutil.copy(args.run_dir / grpo.V_ACT_FILE, work / grpo.V_ACT_FILE)
    state = grpo.setup(cfg, work)
    state.adapter.load_state_dict(load_file(str(ckpt / checkpoint.ADAPTER_DIR / ADAPTER_FILE)))
    state.router.load_state_dict(load_file(str(ckpt / checkpoint.ROUTER_FILE)))
    print(f"{args.run_dir}: arm {cfg.arm}, seed {cfg.seed}, adapter after step {step}; "
          f"measuring step {step + 1}")

    # sample once, then every call returns the same rollouts
    real_sample, cached = rollout.sample, {}

    def sample_once(*a, **k):
        if "out" not in cached:
            cached["out"] = real_sample(*a, **k)
        return cached["out"]
    rollout.sample = sample_once

    # hold the optimizer step back; record what it would have received
    params = state.adapter.parameters() + list(state.router.parameters())
    n_adapter, r = len(state.adapter.parameters()), state.adapter.rank
    seen: dict = {}
    state.optimizer.step = lambda *a, **k: seen.update(grads=[p.grad.clone() for p in params])
    # record the training forward's log-probabilities per row (the base-model pass pools)
    real_score, logps = grpo._score_rows, []

    def recording_score(*a, **k):
        logp, feats = real_score(*a, **k)
        if k.get("pool") is None:
            logps.append((a[4].clone(), logp.detach().clone()))            # (rows, [b, Cb])
        return logp, feats
    grpo._score_rows = recording_score

    base = state.cfg
    runs = {"per_rollout": [], "group_mean": []}
    sampled = False
    for rep in range(args.reps):
        for mode in runs:
            state.cfg = base.replace(routed_prompt=mode)
            logps.clear()
            t0 = time.perf_counter()
            m = grpo.train_step(state, step + 1)
            wall = time.perf_counter() - t0
            train_s = m["time_train_s"] + m["time_grade_s"] + (m["time_gen_s"] if sampled else 0)
            sampled = True
            runs[mode].append({"train_phase_s": train_s, "wall_s": wall, "metrics": m,
                               "grads": seen["grads"], "logps": list(logps)})
            print(f"  rep {rep} {mode:11s}: training phase {train_s:7.1f} s "
                  f"(hack {m['hack_rate']:.3f}, w_gap {m['w_gap']:+.3f})", flush=True)
    rollout.sample, grpo._score_rows = real_sample, real_score

    exact, approx = runs["per_rollout"][-1], runs["group_mean"][-1]

    def by_row(run) -> torch.Tensor:
        """``[B, C]`` training log-probabilities, rows in rollout order (0 past the end)."""
        B = max(int(rows.max()) for rows, _ in run["logps"]) + 1
        C = max(lp.shape[1] for _, lp in run["logps"])
        out = torch.zeros(B, C)
        for rows, lp in run["logps"]:
            out[rows, :lp.shape[1]] = lp.float().cpu()
        return out
    lp_e, lp_a = by_row(exact), by_row(approx)
    lengths = torch.tensor([len(c) for group in cached["out"].token_ids for c in group])
    on = torch.arange(lp_e.shape[1])[None, :] < lengths[:, None]          # completion tokens
    diff = (lp_a - lp_e)[on].abs()
    report = {
        "run_dir": str(args.run_dir), "arm": cfg.arm, "seed": cfg.seed, "step": step + 1,
        "bf16_autocast": cfg.bf16_autocast, "reps": args.reps,
        "train_phase_s": {mode: [x["train_phase_s"] for x in v] for mode, v in runs.items()},
    }
    mean = {mode: sum(v) / len(v) for mode, v in report["train_phase_s"].items()}
    report["train_phase_ratio"] = mean["group_mean"] / mean["per_rollout"]

    def block(grads, hack):       # params alternate A [2r, d_in], B [d_out, 2r]
        sl = slice(r, 2 * r) if hack else slice(0, r)
        return [g[sl] if i % 2 == 0 else g[:, sl] for i, g in enumerate(grads[:n_adapter])]
    g_e, g_a = exact["grads"], approx["grads"]
    report["gradients"] = {"deployed": _compare(block(g_e, False), block(g_a, False)),
                           "hack": _compare(block(g_e, True), block(g_a, True)),
                           "router": _compare(g_e[n_adapter:], g_a[n_adapter:])}
    rollout_e, rollout_a = (lp_e * on).sum(1), (lp_a * on).sum(1)
    report["logprobs"] = {
        "tokens": int(on.sum()),
        "token_abs_diff_mean": diff.mean().item(), "token_abs_diff_max": diff.max().item(),
        "rollout_abs_diff_mean": (rollout_a - rollout_e).abs().mean().item(),
        "rollout_logp_mean": rollout_e.mean().item(),
        "loss_pg": {"per_rollout": exact["metrics"]["loss_pg"],
                    "group_mean": approx["metrics"]["loss_pg"]},
        "kl": {"per_rollout": exact["metrics"]["kl"], "group_mean": approx["metrics"]["kl"]},
        "w_of_rollouts": {"mean": exact["metrics"]["w_mean"],
                          "hack": exact["metrics"]["w_hack"],
                          "not_hack": exact["metrics"]["w_not_hack"]},
    }
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
