"""Why the router's on-policy separation decays: the gate, or the features it reads?

    python scripts/router_drift.py RUN_DIR

A training run's rollouts of step ``K``, the step after its older checkpoint
(``checkpoint.prev``), were scored by the router and the deployed ``A[:r]`` as they stood
before that step. This script re-scores the same rollouts (``samples.jsonl``: problem
and completion text, re-tokenised) four ways, crossing the router and the adapter as
``grpo.setup`` made them (step 0) with those of the checkpoint before step ``K``:

* router 0, adapter 0: ``v_act``'s router on features in the initial basis;
* router 0, adapter K: only the features' basis ``A[:r]`` moved;
* router K, adapter 0: only the gate, scale and bias moved (pin loss, policy loss);
* router K, adapter K: what training used (checks the script: ``w`` as logged).

Features are pooled under the base model, as ``grpo.train_step`` step 5 does, so
``A[:r]`` is the only way the adapter changes them. Printed per combination: the
AUROC of ``w`` against the logged strict hack label, within GRPO groups
(``stats.within_group_auroc``) and overall, and mean ``w`` on hacks and on the rest.
If router 0 still separates the step-K rollouts, the router drifted; if it does not,
the rollouts themselves (what a hack looks like under the policy) moved away from
what ``v_act`` was extracted from. Labels are read for measurement only.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from evil_moe import checkpoint, grpo
from evil_moe.config import from_dict
from evil_moe.env.grader import HACK_LABEL
from evil_moe.stats import auroc, within_group_auroc
from router_options import base_pooled_features      # scripts/, beside this file


def pooled_features(state, rows: pd.DataFrame) -> torch.Tensor:
    """``[B, M, r]`` pooled deployed features of the rollouts ``rows`` (group-major)."""
    tok, G = state.tokenizer, state.cfg.group_size
    index = {p.id: i for i, p in enumerate(state.problems)}
    chosen = [index[pid] for pid in rows["problem_id"].iloc[::G]]
    completion_ids = [tok(t, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]
                      for t in rows["completion"]]
    return base_pooled_features(state, [state.prompt_ids[i] for i in chosen],
                                [j for j in range(len(chosen)) for _ in range(G)],
                                completion_ids)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    args = ap.parse_args(argv)
    d = args.run_dir
    prev = d / "checkpoint.prev"
    if not prev.exists():
        raise SystemExit(f"error: {prev} does not exist: train at least 2 steps first")
    saved = checkpoint.read_state(prev)
    step = saved["step"] + 1           # the rollouts this state scored
    cfg = from_dict(saved["config"], source=str(prev))
    samples = pd.read_json(d / grpo.SAMPLES_FILE, lines=True)
    rows = samples[samples["step"] == step].reset_index(drop=True)
    if rows.empty:
        raise SystemExit(f"error: {d / grpo.SAMPLES_FILE} has no rollouts of step {step}")
    hack = (rows["label"] == HACK_LABEL).to_numpy()
    group = np.arange(len(rows)) // cfg.group_size

    from evil_moe.warm_start import load_base_model
    state = grpo.setup(cfg, d, grade_fn=lambda p, t: [], model_and_tokenizer=load_base_model(cfg))
    router0, adapter0 = copy.deepcopy(state.router.state_dict()), \
        copy.deepcopy(state.adapter.state_dict())
    checkpoint.load(prev, adapter=state.adapter, router=state.router,
                    optimizer=state.optimizer, scheduler=state.scheduler)
    routerK, adapterK = copy.deepcopy(state.router.state_dict()), \
        copy.deepcopy(state.adapter.state_dict())

    feats = {}
    for name, weights in (("0", adapter0), (str(step), adapterK)):
        state.adapter.load_state_dict(weights)
        feats[name] = pooled_features(state, rows)
    out = []
    state.router.eval()      # batch calibration: the running statistics (none: no effect)
    for rname, rweights in (("0", router0), (str(step), routerK)):
        state.router.load_state_dict(rweights)
        for aname, f in feats.items():
            if cfg.router_calibration == "batch":
                state.router.train()
            w = grpo.routing_weights(state, step, f, None)(torch.arange(len(rows)))
            w = w.detach().float().numpy()
            within, pairs = within_group_auroc(w, hack, group)
            out.append({"router": f"step {rname}", "adapter A[:r]": f"step {aname}",
                        "auroc_within": within, "pairs": pairs, "auroc": auroc(w, hack),
                        "w_hack": float(w[hack].mean()), "w_not_hack": float(w[~hack].mean()),
                        "max_abs_diff_to_logged": float(np.abs(w - rows["w"]).max())})
    table = pd.DataFrame(out)
    print(f"{d}: step {step}, {len(rows)} rollouts, hack rate {hack.mean():.3f}")
    print(table.round(3).to_string(index=False))
    (d / f"router_drift_step{step}.json").write_text(json.dumps(out, indent=1))
    state.adapter.remove()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
