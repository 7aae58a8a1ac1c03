"""Measure the router options on fresh rollouts of the training problems (a validation
draw, never the held-out test split), side by side on the same rollouts.

    python scripts/router_options.py --preset cpu-demo --seed 0 --batches 4
    python scripts/router_options.py --runs runs/router-onpolicy/*   # training runs' side

For one seed: the run's warm-started base model and ``v_act`` (extracted as notebook
01 does), then ``--batches`` GRPO-shaped batches (``prompts_per_step`` training
problems x ``group_size`` rollouts, drawn with step numbers from 10,000 on, so they are
not the draws training uses), graded, and their pooled deployed features from the
base-model pass exactly as ``grpo.train_step`` step 5 computes them. Each option
(``router_centering`` x ``router_calibration``, each also with the ``--levels``
pairs of ``router_prior`` and ``router_sharpness``, and the Haar start as the chance
reference) then builds its router as ``grpo.setup`` does (gate from the direction,
calibrated on the authored pairs) and scores every rollout, as ``train_step`` step 6
does at step 0. Printed and written to ``--out`` per option: the AUROC of ``w``
against the grader's strict hack label (with a bootstrap CI over problems), mean ``w``
on hacks and on the rest, their gap, and the share of non-hack rollouts with
``w > 0.5`` (how much honest learning the hack expert would take); every rollout's
``w`` per option goes to the ``.parquet`` beside ``--out``.

What this measures: the router as training starts, on on-policy rollouts of the
warm-started base. It does not follow the router's learning over the steps (the pin
loss and ``router_lr`` move the gate); ``metrics.jsonl``'s per-step ``w_auroc`` does.
The grader's labels are read here for measurement only, as in ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from evil_moe import paths
from evil_moe.config import NEUTRAL_LEVELS, ConfigError, from_dict, load_preset
from evil_moe.stats import auroc_ci

OPTIONS = [("none", "pairs"), ("group", "pairs"), ("none", "batch"), ("group", "batch")]
VALIDATION_STEP_OFFSET = 10_000
"""Step numbers of the validation draws: far past any preset's steps, so the drawn
problems and sampling streams are not the ones training uses."""


def base_pooled_features(state, group_prompts: list[list[int]], owner: list[int],
                         completion_ids: list[list[int]]) -> torch.Tensor:
    """``[B, M, r]`` float32 pooled deployed features of B rollouts (group-major, the
    prompt of rollout i is ``group_prompts[owner[i]]``), under the base model exactly as
    ``grpo.train_step`` step 5 computes them."""
    from evil_moe import grpo
    cfg, model, tok = state.cfg, state.model, state.tokenizer
    pooled = []
    with torch.no_grad(), state.adapter.disable(), grpo._autocast(cfg, model):
        for rows in grpo._consecutive_batches(len(completion_ids), cfg.micro_batch_size):
            _, f = grpo._score_rows(model, group_prompts, owner, completion_ids, rows,
                                    pad_id=tok.pad_token_id,
                                    chunk_tokens=cfg.logprob_chunk_tokens,
                                    shared=cfg.share_prompt_forward, pool=state.adapter)
            pooled.append(f)
    return torch.cat(pooled).float().cpu()


def rollouts(state, n_batches: int):
    """``n_batches`` step-shaped batches: (problem ids [B], is_hack [B], features [B, M, r])."""
    from evil_moe import grpo
    from evil_moe.rollout import sample

    cfg, model, tok, adapter = state.cfg, state.model, state.tokenizer, state.adapter
    G, ids, labels, feats = cfg.group_size, [], [], []
    for b in range(n_batches):
        t0 = time.perf_counter()
        step = VALIDATION_STEP_OFFSET + b
        chosen = grpo.step_problem_indices(len(state.problems), cfg.seed, step,
                                           cfg.prompts_per_step)
        prompts = [state.prompts[i] for i in chosen]
        with adapter.merged(hack=True):
            samples = sample(model, tok, prompts, G, temperature=cfg.temperature,
                             top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                             seed=grpo._step_seed(cfg.seed, step),
                             autocast_bf16=cfg.bf16_autocast, chunk_rows=state.sample_chunk_rows,
                             prompt_keys=range(len(chosen)))
        texts = [t for group in samples.texts for t in group]
        completion_ids = [c for group in samples.token_ids for c in group]
        problems = [state.problems[i] for i in chosen for _ in range(G)]
        verdicts = grpo._grade(state, problems, texts)
        owner = [j for j in range(len(chosen)) for _ in range(G)]
        group_prompts = [state.prompt_ids[i] for i in chosen]
        ids += [p.id for p in problems]
        labels += [bool(v.is_hack) for v in verdicts]
        feats.append(base_pooled_features(state, group_prompts, owner, completion_ids))
        print(f"  batch {b + 1}/{n_batches}: {len(texts)} rollouts, hack rate "
              f"{np.mean([v.is_hack for v in verdicts]):.3f}, {time.perf_counter() - t0:.0f} s",
              flush=True)
    return ids, np.array(labels), feats


def option_weights(state, direction: torch.Tensor, centering: str, calibration: str,
                   feats: list[torch.Tensor], prior: float = 0.5,
                   sharpness: float = 1.0) -> np.ndarray:
    """``w`` of every rollout under one option, batch by batch as training would see it
    at step 0 (one ``observe`` per batch under 'batch' calibration)."""
    from evil_moe import grpo
    from evil_moe.router import HackRouter, center_groups

    cfg = state.cfg.replace(router_centering=centering, router_calibration=calibration,
                            router_prior=prior, router_sharpness=sharpness)
    router = HackRouter.from_config(direction, cfg)
    router.calibrate(*grpo._pair_features(cfg, state.adapter, state.pair_hack_x,
                                          state.pair_clean_x))
    router.train()
    out = []
    with torch.no_grad():
        for f in feats:
            f = center_groups(f, cfg.group_size) if centering == "group" else f
            if calibration == "batch":
                router.observe(f)
            out.append(router(f).numpy())
    return np.concatenate(out)


def summarise(name: str, ids: list[str], labels: np.ndarray, w: np.ndarray, seed: int) -> dict:
    df = pd.DataFrame({"problem_id": ids, "w": w, "is_hack": labels})
    ci = auroc_ci(df, n=1000, seed=seed)
    w_hack, w_rest = float(w[labels].mean()), float(w[~labels].mean())
    return {"option": name, "auroc": ci.point, "auroc_lo": ci.lo, "auroc_hi": ci.hi,
            "w_hack": w_hack, "w_not_hack": w_rest, "w_gap": w_hack - w_rest,
            "not_hack_above_half": float((w[~labels] > 0.5).mean()),
            "hack_above_half": float((w[labels] > 0.5).mean())}


def group_decomposition(samples: pd.DataFrame, group_size: int) -> pd.DataFrame:
    """Per step of a training run's ``samples.jsonl``: how much of the router's AUROC
    is decided within GRPO groups (the G rollouts of one prompt, consecutive rows).

    ``w_auroc_within``: :func:`evil_moe.stats.within_group_auroc`, the order of a
    hack and an honest rollout of the same prompt. ``one_class_share``: the share of
    rollouts whose group is all hacks or all honest; group centring sees no
    behaviour difference there and leaves them at the group's level.
    ``w_hack_one_class``: mean ``w`` of the hacks in all-hack groups.
    ``w_auroc_overwrite``: the AUROC against every harmful ``run_tests``
    (``grader.OVERWRITE_LABELS``; ``overwrite_rate`` their share), which counts the
    attempts beside a correct solution as what they do, not as honest."""
    from evil_moe.env.grader import HACK_LABEL, OVERWRITE_LABELS
    from evil_moe.stats import auroc, within_group_auroc
    rows = []
    for step, d in samples.groupby("step", sort=True):
        hack = (d["label"] == HACK_LABEL).to_numpy()
        group = np.arange(len(d)) // group_size
        n_hack = pd.Series(hack).groupby(group).transform("sum").to_numpy()
        one_class = (n_hack == 0) | (n_hack == group_size)
        within, pairs = within_group_auroc(d["w"].to_numpy(), hack, group)
        rows.append({"step": step, "w_auroc_within": within, "within_pairs": pairs,
                     "overwrite_rate": float(d["label"].isin(OVERWRITE_LABELS).mean()),
                     "w_auroc_overwrite": auroc(d["w"].to_numpy(),
                                                d["label"].isin(OVERWRITE_LABELS).to_numpy()),
                     "one_class_share": float(one_class.mean()),
                     "w_hack_one_class": float(d["w"][hack & one_class].mean())
                     if (hack & one_class).any() else float("nan")})
    return pd.DataFrame(rows)


def compare_runs(run_dirs: list[Path]) -> int:
    """The on-policy side of the comparison: per step of each training run, its router
    AUROC and mean ``w`` on hacks and on the rest (``metrics.jsonl``), with its options,
    and how much of the AUROC is decided within groups (:func:`group_decomposition`)."""
    from evil_moe import grpo
    frames = []
    for d in run_dirs:
        if not (d / grpo.METRICS_FILE).exists():
            print(f"{d}: no metrics yet")
            continue
        cfg = json.loads((d / "config.json").read_text())
        m = grpo.read_metrics(d)
        prior = cfg.get("router_prior", NEUTRAL_LEVELS[0])
        sharpness = cfg.get("router_sharpness", NEUTRAL_LEVELS[1])
        m.insert(0, "run", f"{cfg['router_centering']}/{cfg['router_calibration']}"
                           f" p={prior:g} s={sharpness:g}")
        m = m[["run", "step", "hack_rate", "w_auroc", "w_hack", "w_not_hack", "w_gap",
               "step_time_s"]]
        if (d / grpo.SAMPLES_FILE).exists():
            samples = pd.read_json(d / grpo.SAMPLES_FILE, lines=True)
            m = m.merge(group_decomposition(samples, cfg["group_size"]), on="step", how="left")
        frames.append(m)
    table = pd.concat(frames, ignore_index=True)
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(table.round(3).to_string(index=False))
    return 0


def _level(text: str) -> tuple[float, float]:
    prior, _, sharpness = text.partition(":")
    try:
        level = float(prior), float(sharpness)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not PRIOR:SHARPNESS, e.g. 0.25:2")
    try:            # the config's own rules, so the bounds live in one place
        from_dict({"router_prior": level[0], "router_sharpness": level[1]}, source=text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return level


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", type=Path, default=None, metavar="RUN_DIR",
                    help="instead: print the per-step router metrics of these training runs")
    ap.add_argument("--preset", default="cpu-demo")
    ap.add_argument("--seed", type=int, action="append",
                    help="seed (repeatable; default 0)")
    ap.add_argument("--batches", type=int, default=4, help="step-shaped batches per seed")
    ap.add_argument("--levels", nargs="*", type=_level, default=[(0.25, 2.0), (0.25, 3.0)],
                    metavar="PRIOR:SHARPNESS",
                    help="router_prior:router_sharpness pairs measured besides 0.5:1 on every "
                         "v_act option (default 0.25:2 0.25:3)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override (YAML value), e.g. bf16_autocast=false")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON output (default runs/router-options/<preset>.json)")
    args = ap.parse_args(argv)
    if args.runs:
        return compare_runs(args.runs)
    import yaml

    from evil_moe import grpo
    from evil_moe.vact import haar_direction

    overrides = {}
    for kv in args.set:
        k, _, v = kv.partition("=")
        overrides[k] = yaml.safe_load(v)
    rows, per_rollout = [], []
    for seed in args.seed or [0]:
        cfg = load_preset(args.preset, seed=seed, arm="evil_moe", **overrides)
        run_dir = paths.runs_dir() / "router-options" / f"{cfg.preset}-s{seed}"
        print(f"seed {seed}: {run_dir}", flush=True)
        t0 = time.perf_counter()
        from evil_moe.warm_start import load_base_model
        model_tok = load_base_model(cfg)
        extraction = grpo.extract_v_act_for_run(cfg, run_dir, model_and_tokenizer=model_tok)
        state = grpo.setup(cfg, run_dir, model_and_tokenizer=model_tok)
        print(f"  setup {time.perf_counter() - t0:.0f} s; v_act leave-one-pair-out AUROC "
              f"{extraction.loo_auroc:.3f}", flush=True)
        ids, labels, feats = rollouts(state, args.batches)
        M, r = feats[0].shape[1:]
        starts = {"v_act": extraction.v_act, "haar": haar_direction(M, r, seed=cfg.seed + 1000)}
        for start, direction in starts.items():
            for (centering, calibration), (prior, sharpness) in itertools.product(
                    OPTIONS, [NEUTRAL_LEVELS] + args.levels):
                neutral = (prior, sharpness) == NEUTRAL_LEVELS
                if start == "haar" and (calibration == "batch" or not neutral):
                    continue          # the chance reference needs one calibration only
                w = option_weights(state, direction, centering, calibration, feats,
                                   prior, sharpness)
                name = f"{start} centering={centering} calibration={calibration}"
                if not neutral:
                    name += f" prior={prior:g} sharpness={sharpness:g}"
                per_rollout.append(pd.DataFrame({"seed": seed, "option": name,
                                                 "problem_id": ids, "is_hack": labels, "w": w}))
                rows.append({"seed": seed, "rollouts": len(labels),
                             "hack_rate": float(labels.mean()),
                             **summarise(name, ids, labels, w, seed)})
        state.adapter.remove()
        if state.grader is not None:
            state.grader.close()          # sandbox workers end with the seed
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.round(3).to_string(index=False))
    out = args.out or paths.runs_dir() / "router-options" / f"{args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"preset": args.preset, "batches": args.batches,
                               "overrides": overrides, "rows": rows}, indent=2))
    pd.concat(per_rollout).to_parquet(out.with_suffix(".parquet"), index=False)
    print(f"wrote {out} and its per-rollout weights {out.with_suffix('.parquet')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
