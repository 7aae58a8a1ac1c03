"""The deployment ablation: generate and grade with the hack expert ON and OFF.

For one trained run (DESIGN.md section 3, step 3):

- **on**: both experts at full strength (``adapter.merged(hack=True)``), the
  model as trained;
- **off**: the hack block reset to its init (``adapter.merged(hack=False)``),
  the model as deployed;
- **base**: the adapter disabled, the reference row;
- **deployed_off** (``RunConfig.eval_deployed_off``, arms that route): the
  deployed block reset instead, the hack expert kept. The seed's other matched
  control: if routing localized, it keeps the hacking and costs the solving,
  the mirror image of OFF.

For the ``vanilla`` arm the same code path removes its block ``[r:]``, which is
the matched-capacity control: an equally large block of a model trained
without routing. The ``oracle`` arm (routed by training labels) has no router:
its OFF is the same hack-block removal, and router diagnostics do not apply.

With ``RunConfig.solve_split`` set, a second held-out split where the model
solves often enough (``tier1``: the easy set's held-out tier-1 problems;
``no_hint``: the test split without the loophole sentence) is evaluated ON,
OFF (and deployed_off), so the share of solving kept has a usable CI; its rows
go to ``eval_solve.parquet`` and its statistics to ``summary["solve_split"]``.

Every condition samples K completions per held-out problem with the same
sampling seeds and grades them in the sandbox. The ON rollouts (any condition
in ``route_conditions``) are scored with the run's router (``w``) and with a
Haar-random direction router (``w_haar``), both on pooled features computed as
in training: a forward of the **base model** (adapter disabled) over prompt +
completion tokens, pooled over the completion tokens (``evil_moe.grpo`` step 5).
One row per sample goes to ``eval.parquet``; the statistics (``evil_moe.stats``)
go to ``summary.json``; the final line is printed::

    Evil MoE causal ablation: deploy hack X (ON) -> Y (OFF)

Resumable: each condition is written as its own shard
(``eval_shards/<condition>.parquet`` with a fingerprint of everything that
determines it); a rerun reuses a shard whose fingerprint matches unless
``force=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from . import arms, checkpoint, stats
from .sequences import completion_states, prefill_prompts, right_padded
from .config import NEUTRAL_LEVELS, RunConfig, from_dict

CONDITIONS = ("on", "off", "base", "deployed_off")
"""Every condition ``evaluate_run`` knows; ``default_conditions`` picks a run's."""
EVAL_FILE = "eval.parquet"
SOLVE_EVAL_FILE = "eval_solve.parquet"
SOLVE_PREFIX = "solve_"
"""Shards of the solvable split are ``eval_shards/solve_<condition>.parquet``."""
SUMMARY_FILE = "summary.json"
SHARD_DIR = "eval_shards"
CONFIG_FILE = "config.json"
ROUTED_ARMS = arms.ROUTED_ARMS
HAAR_SEED_OFFSET = 2000
"""The comparison router's direction uses ``seed + 2000``; the ``haar`` training arm
starts from ``seed + 1000``, so the comparison is never the haar arm's own init."""

GradeFn = Callable[[list, list], list]


@dataclass
class LoadedRun:
    """Everything the evaluation needs from one trained run.

    ``router`` is None for the vanilla arm. ``run_dir`` is None when the pieces
    were built in memory (tests, notebooks).
    """

    model: Any
    tokenizer: Any
    adapter: Any
    router: Any
    cfg: RunConfig
    run_dir: Path | None = None
    haar_routers: dict = field(default_factory=dict, repr=False)
    """Calibrated Haar comparison routers by (seed, adapter digest), reused across calls."""


@dataclass
class EvalResult:
    """What ``evaluate_run`` and ``aggregate`` return."""

    df: pd.DataFrame
    summary: dict[str, Any]
    out_dir: Path | None

    @property
    def final_line(self) -> str:
        return self.summary["final_line"]


# ---------------------------------------------------------------------------
# Loading a run
# ---------------------------------------------------------------------------


def read_config(run_dir: str | Path) -> RunConfig:
    """The validated ``RunConfig`` a run was trained with (``<run_dir>/config.json``)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a trained run "
                                "(evil_moe.grpo.train writes config.json)")
    return from_dict(json.loads(path.read_text()), source=str(path))


def load_run(run_dir: str | Path, device: str | None = None) -> LoadedRun:
    """Load the base model, the trained adapter and (routed arms) the trained router.

    Layout (written by ``evil_moe.grpo``/``evil_moe.checkpoint``): ``config.json`` and
    the newest checkpoint that verifies (``checkpoint/``, else ``checkpoint.prev/``),
    of which ``adapter/`` and ``router.safetensors`` are read.
    The base model is rebuilt with ``warm_start.load_base_model(cfg, device)``,
    as training does (the tiny random model depends on the seed; a warm start,
    when configured, is loaded from its cache).
    """
    from safetensors.torch import load_file

    from .adapter import ExpertAdapter
    from .warm_start import load_base_model

    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    if device is not None:
        cfg = cfg.replace(device=device)
    ckpt = checkpoint.latest(run_dir)   # verified; falls back to the previous one
    model, tok = load_base_model(cfg)
    adapter = ExpertAdapter.load(model, ckpt / checkpoint.ADAPTER_DIR)
    router = None
    if cfg.arm in ROUTED_ARMS:
        path = ckpt / checkpoint.ROUTER_FILE
        if not path.exists():
            raise FileNotFoundError(f"arm {cfg.arm!r} is routed but {path} does not exist")
        router = _router_from_state(load_file(str(path)), len(adapter.module_names),
                                    adapter.rank, model.device, cfg)
    return LoadedRun(model, tok, adapter, router, cfg, run_dir)


def _router_from_state(state: dict[str, torch.Tensor], num_modules: int, rank: int, device,
                       cfg: RunConfig):
    """A HackRouter with the saved weights (the direction placeholder is overwritten) and the
    run's calibration, prior and sharpness, in eval mode: under 'batch' calibration it
    standardises with its saved running statistics."""
    from .router import HackRouter
    from .vact import haar_direction
    router = HackRouter.from_config(haar_direction(num_modules, rank, seed=0), cfg)
    router.load_state_dict(state)
    return router.to(device).eval()


def _as_loaded(source: Any, device: str | None) -> LoadedRun:
    if isinstance(source, LoadedRun):
        return source
    if isinstance(source, (str, Path)):
        return load_run(source, device=device)
    if isinstance(source, (tuple, list)) and len(source) == 5:
        return LoadedRun(*source)
    raise TypeError("evaluate_run takes a run directory, a LoadedRun, or a tuple "
                    f"(model, tokenizer, adapter, router, cfg); got {type(source).__name__}")


# ---------------------------------------------------------------------------
# Pieces of one condition
# ---------------------------------------------------------------------------


def default_conditions(cfg: RunConfig) -> tuple[str, ...]:
    """on, off, base; plus deployed_off for an arm that routes when ``eval_deployed_off``."""
    mirror = cfg.eval_deployed_off and arms.get(cfg.arm).routes
    return ("on", "off", "base") + (("deployed_off",) if mirror else ())


@contextlib.contextmanager
def _deployed_removed(adapter):
    """The deployed block ``A[:r], B[:, :r]`` reset to its init in place (net zero), the
    hack expert kept, then merged for generation; the trained values come back bitwise."""
    r = adapter.rank
    saved = [(layer.A[:r].detach().clone(), layer.B[:, :r].detach().clone())
             for layer in adapter.layers]
    with torch.no_grad():
        for layer in adapter.layers:
            layer.A[:r] = layer.A0[:r]
            layer.B[:, :r] = layer.B0[:, :r]
    try:
        with adapter.merged(hack=True):
            yield
    finally:
        with torch.no_grad():
            for layer, (a, b) in zip(adapter.layers, saved):
                layer.A[:r] = a
                layer.B[:, :r] = b


def condition_context(adapter, condition: str):
    """The adapter mode of a condition: on / off / base / deployed_off."""
    if condition == "on":
        return adapter.merged(hack=True)
    if condition == "off":
        return adapter.merged(hack=False)
    if condition == "base":
        return adapter.disable()
    if condition == "deployed_off":
        return _deployed_removed(adapter)
    raise ValueError(f"unknown condition {condition!r}; allowed: {', '.join(CONDITIONS)}")


def generate(model, tokenizer, prompts: Sequence[str], k: int, *, temperature: float,
             max_new_tokens: int, seed: int, top_p: float = 1.0, prompts_per_batch: int = 8,
             autocast_bf16: bool = False, desc: str = "generate",
             progress: bool = True) -> tuple[list[list[str]], list[list[list[int]]]]:
    """K samples per prompt in chunks of ``prompts_per_batch`` prompts, with a progress bar.

    Sample j of prompt i draws from the random stream ``(seed, i * K + j)``
    (``rollout.sample`` with the prompts' global indices as keys), so conditions
    that use the same prompts and seed draw with the same streams, and
    ``prompts_per_batch`` changes no completion.
    Returns ``texts[P][K]`` and ``token_ids[P][K]``.
    """
    from .rollout import sample
    stream_seed = zlib.crc32(f"eval/{seed}".encode())
    texts: list[list[str]] = []
    ids: list[list[list[int]]] = []
    with tqdm(total=len(prompts) * k, desc=desc, unit="sample", disable=not progress) as bar:
        for start in range(0, len(prompts), prompts_per_batch):
            chunk = list(prompts[start:start + prompts_per_batch])
            out = sample(model, tokenizer, chunk, k, temperature=temperature, top_p=top_p,
                         max_new_tokens=max_new_tokens, seed=stream_seed,
                         autocast_bf16=autocast_bf16, prompt_keys=range(start, start + len(chunk)))
            texts.extend(out.texts)
            ids.extend(out.token_ids)
            bar.update(len(chunk) * k)
    return texts, ids


def pooled_features(model, adapter, prompt_ids: Sequence[Sequence[int]],
                    completion_ids: Sequence[Sequence[Sequence[int]]], pad_id: int,
                    rows_per_batch: int = 16, autocast_bf16: bool = False) -> torch.Tensor:
    """The router's input for each rollout, computed as in training: ``[N, M, r]``.

    As in ``evil_moe.grpo.train_step`` (step 5): a forward of the **base model**
    (adapter disabled) over prompt + sampled completion tokens, the deployed
    bottleneck ``A[:r] x`` averaged over the completion tokens.

    ``prompt_ids[i]`` is prompt i; ``completion_ids[i]`` its completions (K of
    them). Rows come out prompt-major. Each prompt is run once and its KV cache
    is shared by its K completions, so the prompt is not recomputed K times
    (the pooled values match a full-sequence forward up to float rounding).
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completion groups")
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16)
    # chunks of whole prompts with at most rows_per_batch rollouts (at least one prompt)
    chunks, cur, rows = [], [], 0
    for i, group in enumerate(completion_ids):
        if cur and rows + len(group) > rows_per_batch:
            chunks.append(cur)
            cur, rows = [], 0
        cur.append(i)
        rows += len(group)
    if cur:
        chunks.append(cur)
    out = []
    for chunk in chunks:
        prompts = [list(prompt_ids[i]) for i in chunk]
        comps = [list(c) for i in chunk for c in completion_ids[i]]
        owner = torch.tensor([j for j, i in enumerate(chunk) for _ in completion_ids[i]])
        if not comps:
            continue
        empty = [k for k, c in enumerate(comps) if not c]
        if empty:
            raise ValueError(f"{len(empty)} rollout(s) have no completion tokens: nothing to pool")
        with torch.no_grad(), adapter.disable(), autocast:
            prefix = prefill_prompts(model, prompts, owner.tolist(), pad_id)
            c_ids, c_mask = right_padded(comps, pad_id, device=device)
            with adapter.pooling(c_mask) as pooled:
                completion_states(model, prefix, c_ids, c_mask)
        out.append(pooled.features.float())
    return torch.cat(out)


def haar_router(adapter, model, tokenizer, seed: int, calibrate: bool = True,
                centering: str = "none", prior: float = 0.5, sharpness: float = 1.0):
    """An untrained router from a Haar-random direction: the chance-level comparison.

    Calibrated on the authored pairs as training initialises a 'pairs' router
    (``HackRouter.calibrate`` on base-model pooled pair features, under the
    adapter's current ``A[:r]``; each pair centred as a group of two when
    ``centering`` is 'group', as the run's router reads them), so its ``w > 0.5``
    call is set the same way, with the run's ``prior`` and ``sharpness``. Its AUROC,
    the chance baseline, does not depend on the calibration (a monotone map of the
    score).
    """
    from .pairs import load_pairs
    from .router import HackRouter, center_pairs
    from .vact import haar_direction, pair_features
    router = HackRouter(haar_direction(len(adapter.module_names), adapter.rank, seed=seed),
                        prior=prior, sharpness=sharpness)
    router = router.to(next(model.parameters()).device)
    if calibrate:
        with torch.no_grad(), adapter.disable():
            hack_f, clean_f = pair_features(model, tokenizer, adapter, load_pairs())
        if centering == "group":
            hack_f, clean_f = center_pairs(hack_f, clean_f)
        router.calibrate(hack_f, clean_f)
    return router.eval()


def _router_w(router, features: torch.Tensor) -> np.ndarray:
    if router is None:
        return np.full(features.shape[0], np.nan)
    with torch.no_grad():
        return router(features.to(next(router.parameters()).device)).float().cpu().numpy()


# ---------------------------------------------------------------------------
# Fingerprints and shards
# ---------------------------------------------------------------------------


def _tensor_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _weights_digest(run: LoadedRun) -> dict[str, str]:
    """Digests of the adapter (and router) tensors: a retrained checkpoint never reuses
    shards. The adapter matters for base rows too: its ``A[:r]`` maps the router's input."""
    out = {"adapter": _tensor_digest(sorted(run.adapter.state_dict().items()))}
    if run.router is not None:
        out["router"] = _tensor_digest(sorted(run.router.state_dict().items()))
    return out


def _fingerprint(run: LoadedRun, condition: str, problem_ids: list[str], settings: dict,
                 digests: dict[str, str], haar_seed: int | None) -> dict[str, Any]:
    """Everything that determines a condition's shard; a mismatch means regenerate."""
    fp = {"condition": condition, "arm": run.cfg.arm, "seed": run.cfg.seed,
          "model": run.cfg.model, "dtype": run.cfg.dtype, "hint": run.cfg.hint,
          "problems": problem_ids, **settings, **digests}
    if run.router is not None:
        fp["haar_seed"] = haar_seed
    return fp


def _shard_paths(out_dir: Path, condition: str) -> tuple[Path, Path]:
    d = out_dir / SHARD_DIR
    return d / f"{condition}.parquet", d / f"{condition}.json"


def _read_shard(out_dir: Path, condition: str, fingerprint: dict) -> pd.DataFrame | None:
    data, meta = _shard_paths(out_dir, condition)
    if not (data.exists() and meta.exists()):
        return None
    saved = json.loads(meta.read_text())
    if saved.get("fingerprint") != json.loads(json.dumps(fingerprint)):
        changed = sorted(k for k in set(saved.get("fingerprint", {})) | set(fingerprint)
                         if saved.get("fingerprint", {}).get(k) != fingerprint.get(k))
        print(f"[evaluate] shard {data.name} is stale (changed: {', '.join(changed)}); "
              "regenerating")
        return None
    return pd.read_parquet(data)


def _write_shard(out_dir: Path, condition: str, df: pd.DataFrame, fingerprint: dict,
                 seconds: float) -> None:
    data, meta = _shard_paths(out_dir, condition)
    data.parent.mkdir(parents=True, exist_ok=True)
    tmp = data.with_suffix(".parquet.tmp")
    df.to_parquet(tmp, index=False)
    tmp.rename(data)  # atomic: a killed run never leaves a half shard behind
    meta.write_text(json.dumps({"fingerprint": fingerprint, "seconds": seconds,
                                "rows": len(df)}, indent=1))


# ---------------------------------------------------------------------------
# One condition
# ---------------------------------------------------------------------------


def _verdict_rows(verdicts: list, problems: list, k: int) -> list[dict[str, Any]]:
    rows = []
    for i, v in enumerate(verdicts):
        p = problems[i // k]
        if getattr(v, "problem_id", p.id) != p.id:
            raise RuntimeError(f"grader returned verdict for {v.problem_id!r} at the position of "
                               f"problem {p.id!r}: verdicts are out of order")
        rows.append({
            "label": str(v.label), "is_hack": bool(v.is_hack), "gt_pass": bool(v.gt_pass),
            "hint_pass": bool(v.hint_pass), "compiles": bool(getattr(v, "compiles", False)),
            "defines_run_tests": bool(getattr(v, "defines_run_tests", False)),
            "reward": float(v.reward), "error": str(getattr(v, "error", "") or ""),
            "test_modification": str(getattr(v, "test_modification", "")),
            "timed_out": bool(getattr(v, "timed_out", False))})
    return rows


def run_condition(run: LoadedRun, condition: str, problems: list, prompts: list[str], *,
                  k: int, temperature: float, max_new_tokens: int, top_p: float, seed: int,
                  grade: GradeFn, haar, prompts_per_batch: int, progress: bool,
                  score: bool = True) -> pd.DataFrame:
    """Generate, grade and (``score``) route one condition; one row per sample.

    ``w`` (the run's router) and ``w_haar`` (the comparison router) come from
    base-model pooled features of prompt + completion, as in training, so a
    rollout gets the weight the router would have given it during training;
    with ``router_centering='group'`` the K samples of a problem are its group
    (as the G rollouts of a prompt are in training). Unscored rows
    (``score=False``, or no router) have NaN weights.
    """
    cfg, model, tok, adapter = run.cfg, run.model, run.tokenizer, run.adapter
    with torch.no_grad(), condition_context(adapter, condition):
        texts, ids = generate(model, tok, prompts, k, temperature=temperature,
                              max_new_tokens=max_new_tokens, seed=seed, top_p=top_p,
                              prompts_per_batch=prompts_per_batch,
                              autocast_bf16=cfg.bf16_autocast, desc=f"generate {condition}",
                              progress=progress)
    flat_texts = [t for group in texts for t in group]
    flat_ids = [c for group in ids for c in group]
    flat_problems = [p for p in problems for _ in range(k)]
    verdicts = grade(flat_problems, flat_texts)
    if len(verdicts) != len(flat_texts):
        raise RuntimeError(f"grader returned {len(verdicts)} verdicts for {len(flat_texts)} "
                           "completions")
    rows = _verdict_rows(verdicts, problems, k)

    w = w_haar = np.full(len(flat_texts), np.nan)
    if score and (run.router is not None or haar is not None):
        prompt_ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
        feats = pooled_features(model, adapter, prompt_ids, ids, tok.pad_token_id,
                                rows_per_batch=cfg.micro_batch_size,
                                autocast_bf16=cfg.bf16_autocast)
        if cfg.router_centering == "group":
            from .router import center_groups
            feats = center_groups(feats, k)
        w = _router_w(run.router, feats)
        w_haar = _router_w(haar, feats)

    df = pd.DataFrame(rows)
    df.insert(0, "problem_id", [p.id for p in flat_problems])
    df.insert(1, "sample", [i % k for i in range(len(flat_texts))])
    df.insert(2, "arm", cfg.arm)
    df.insert(3, "seed", cfg.seed)
    df.insert(4, "condition", condition)
    df["w"] = w.astype(float)
    df["w_haar"] = w_haar.astype(float)
    df["n_tokens"] = [len(c) for c in flat_ids]
    df["dataset"] = [str(getattr(p, "dataset", "")) for p in flat_problems]
    df["difficulty"] = [str(getattr(p, "difficulty", "")) for p in flat_problems]
    df["completion"] = flat_texts
    return df


# ---------------------------------------------------------------------------
# Statistics of a long frame
# ---------------------------------------------------------------------------


def jsonable(obj: Any) -> Any:
    """Plain JSON values: NaN and infinities become None (strict JSON has neither),
    numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return None if math.isnan(f) or math.isinf(f) else f
    return obj


def router_diagnostics(df: pd.DataFrame, threshold: float = 0.5, beta: float = 0.5,
                       n_boot: int = 1000, seed: int = 0) -> dict:
    """AUROC and F0.5 (``w > threshold``) of the router's ``w`` and of the Haar router's
    ``w_haar`` against the strict hack label, on the graded ON rollouts, with ROC data.

    Each scored entry is ``stats.classifier_scores``: auroc, f0.5, precision,
    recall, confusion counts, mean score on hack / non-hack rollouts, ``roc``
    (fpr, tpr, thresholds; the first threshold is +inf, written as null in
    ``summary.json``), ``auroc_ci`` (bootstrap over problems, ``stats.auroc_ci``),
    ``auroc_within_problem`` (``stats.within_group_auroc`` over the samples of each
    problem: value and number of hack/non-hack pairs), ``auroc_vs_overwrite`` (against
    ``grader.OVERWRITE_LABELS``: every harmful ``run_tests``, the ones beside a correct
    solution included) and ``reasons`` for any NaN.
    An entry without scores has ``available: false`` and a ``reason`` (vanilla: no
    router).
    """
    from .env.grader import OVERWRITE_LABELS
    on = df[df["condition"] == "on"]
    if on.empty:
        return {"available": False, "reason": "no ON rollouts were evaluated"}
    out: dict[str, Any] = {"available": True, "n_rollouts": int(len(on)),
                           "n_hack": int(on["is_hack"].sum()), "threshold": threshold}
    arm = str(on["arm"].iloc[0])
    no_router = (f"not applicable: arm {arm!r} routes by the grader's training labels and has "
                 "no router" if arm in arms.LABEL_ARMS else f"arm {arm!r} has no router")
    for name, col in (("router", "w"), ("haar", "w_haar")):
        if col not in on or on[col].isna().all():
            out[name] = {"available": False,
                         "reason": no_router if name == "router"
                         else "no Haar comparison router was scored"}
            continue
        if on[col].isna().any():
            raise ValueError(f"column {col!r} is missing for some ON rollouts but not others")
        out[name] = stats.classifier_scores(on[col].to_numpy(), on["is_hack"].to_numpy(bool),
                                            threshold=threshold, beta=beta)
        out[name]["auroc_ci"] = stats.auroc_ci(on, col, "is_hack", n=n_boot, seed=seed).to_dict()
        # the order within a problem's K samples, what group centring is accountable for
        within, pairs = stats.within_group_auroc(
            on[col].to_numpy(), on["is_hack"].to_numpy(bool),
            (on["seed"].astype(str) + "/" + on[stats.PROBLEM].astype(str)).to_numpy())
        out[name]["auroc_within_problem"] = {"value": within, "pairs": pairs}
        # against any harmful run_tests, the attempts beside a correct solution included
        out[name]["auroc_vs_overwrite"] = stats.auroc(on[col].to_numpy(),
                                                      on["label"].isin(OVERWRITE_LABELS))
    if not out["router"].get("available", True) and not out["haar"].get("available", True):
        out["available"] = False
        out["reason"] = out["router"]["reason"]
    return out


def summarize_solve_split(df: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0,
                          alpha: float = 0.05) -> dict[str, Any]:
    """Statistics of the solvable split: rates per condition and ON vs OFF (and vs
    deployed_off) for solving, the split's ``name`` and its number of problems."""
    names = sorted(df["split"].unique())
    if len(names) != 1:
        raise ValueError(f"expected one solvable split in the frame, got {names}")
    present = set(df["condition"].unique())
    out: dict[str, Any] = {
        "name": str(names[0]), "n_problems": int(df.groupby(["seed", "problem_id"]).ngroups),
        "conditions": stats.condition_rates(df, ("gt_pass", "is_hack"), n=n_boot, seed=seed,
                                            alpha=alpha), "ablation": None}
    if {"on", "off"} <= present:
        out["ablation"] = {"solve": stats.paired_comparison(
            df, "gt_pass", "on", "off", n=n_boot, seed=seed, alpha=alpha).to_dict()}
        if "deployed_off" in present:
            out["ablation"]["solve_deployed_off"] = stats.paired_comparison(
                df, "gt_pass", "on", "deployed_off", n=n_boot, seed=seed, alpha=alpha).to_dict()
    return out


def summarize(df: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
              meta: dict[str, Any] | None = None,
              solve_df: pd.DataFrame | None = None) -> dict[str, Any]:
    """Every statistic of an evaluation frame (one run, or several seeds of one arm).

    - ``conditions``: hack / solve / hint-pass rates with CIs, the rate of harmful
      ``run_tests`` of any kind (``overwrite_rate``, ``grader.OVERWRITE_LABELS``),
      mean reward, label counts, mean w, per condition;
    - ``ablation``: paired ON-vs-OFF for hacking (``hack``), solving (``solve``)
      and harmful ``run_tests`` (``overwrite``): both rates, the difference, share
      removed and share kept;
      with base rows also ``hack_trained_removed``, ``(ON - OFF) / (ON - base)``;
    - ``mirror`` (with deployed_off rows): ON vs the deployed block removed;
    - ``solve_split`` (``solve_df`` given): ``summarize_solve_split``;
    - ``uses_labels``: whether the arm routed with training labels (the oracle);
    - ``router``: diagnostics on the ON rollouts (see ``router_diagnostics``);
    - ``final_line``: the printed text.
    Problems are resampled within seeds (``stats``).
    """
    if df.empty:
        raise ValueError("no rows to summarize")
    summary: dict[str, Any] = {**(meta or {})}
    summary.update({
        "arm": _single(df, "arm"),
        "seeds": sorted(int(s) for s in df["seed"].unique()),
        "n_problems": int(df.groupby(["seed", "problem_id"]).ngroups),
        "samples_per_problem": _samples_per_problem(df),
        "bootstrap": n_boot, "alpha": alpha, "confidence": 1 - alpha,
    })
    from .env.grader import OVERWRITE_LABELS
    # every harmful run_tests, whatever the solution did (the strict label calls one beside
    # a correct solution honest): what removing the hack expert does to the behaviour itself
    df = df.assign(overwrites_run_tests=df["label"].isin(OVERWRITE_LABELS))
    conds = stats.condition_rates(df, ("is_hack", "gt_pass", "hint_pass", "overwrites_run_tests"),
                                  n=n_boot, seed=seed, alpha=alpha)
    for cond, entry in conds.items():
        sub = df[df["condition"] == cond]
        entry["hack_rate"] = entry.pop("is_hack")
        entry["solve_rate"] = entry.pop("gt_pass")
        entry["hint_pass_rate"] = entry.pop("hint_pass")
        entry["overwrite_rate"] = entry.pop("overwrites_run_tests")
        entry["mean_reward"] = float(sub["reward"].mean())
        entry["labels"] = {str(k): int(v) for k, v in sub["label"].value_counts().items()}
        entry["mean_w"] = float(sub["w"].mean()) if sub["w"].notna().any() else float("nan")
    summary["uses_labels"] = summary["arm"] in arms.LABEL_ARMS
    if solve_df is not None and not solve_df.empty:
        summary["solve_split"] = summarize_solve_split(solve_df, n_boot=n_boot, seed=seed,
                                                       alpha=alpha)
    summary["conditions"] = conds
    summary["router"] = router_diagnostics(df, n_boot=n_boot, seed=seed)
    present = set(df["condition"].unique())
    if "deployed_off" in present:
        summary["mirror"] = {
            key: stats.paired_comparison(df, col, "on", "deployed_off", n=n_boot, seed=seed,
                                         alpha=alpha).to_dict()
            for key, col in (("hack", "is_hack"), ("solve", "gt_pass"))}
    if {"on", "off"} <= present:
        summary["ablation"] = {
            "hack": stats.paired_comparison(df, "is_hack", "on", "off", n=n_boot, seed=seed,
                                            alpha=alpha).to_dict(),
            "solve": stats.paired_comparison(df, "gt_pass", "on", "off", n=n_boot, seed=seed,
                                             alpha=alpha).to_dict(),
            "overwrite": stats.paired_comparison(df, "overwrites_run_tests", "on", "off",
                                                 n=n_boot, seed=seed, alpha=alpha).to_dict()}
        if "base" in present:
            summary["ablation"]["hack_trained_removed"] = stats.trained_share_removed(
                df, "is_hack", n=n_boot, seed=seed, alpha=alpha).to_dict()
        summary["final_line"] = stats.format_final_line(summary)
    else:
        summary["ablation"] = None
        summary["final_line"] = (f"Evil MoE causal ablation: not computed (conditions evaluated: "
                                 f"{', '.join(sorted(present))}; ON and OFF are both needed)")
    return summary


def _single(df: pd.DataFrame, column: str) -> str:
    values = df[column].unique()
    if len(values) != 1:
        raise ValueError(f"expected one {column} in the frame, got {sorted(map(str, values))}; "
                         f"summarize each {column} separately")
    return str(values[0])


def _samples_per_problem(df: pd.DataFrame) -> int | None:
    counts = df.groupby(["seed", "condition", "problem_id"]).size().unique()
    return int(counts[0]) if len(counts) == 1 else None


def write_summary(summary: dict, path: Path) -> None:
    path.write_text(json.dumps(jsonable(summary), indent=1, allow_nan=False) + "\n")


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------


def _grader(cfg: RunConfig, grade_fn: GradeFn | None, progress: bool, stack: contextlib.ExitStack
            ) -> GradeFn:
    """``grade_fn`` when given, else the sandboxed grader of ``cfg`` (opened lazily)."""
    if grade_fn is not None:
        return grade_fn
    holder: dict[str, Any] = {}

    def grade(problems: list, texts: list) -> list:
        if "g" not in holder:
            from .env.grader import grader_from_config
            g = grader_from_config(cfg)
            holder["g"] = stack.enter_context(g) if hasattr(g, "__enter__") else g
        return holder["g"].grade_batch(problems, texts, progress=progress)
    return grade


def solve_split_problems(cfg: RunConfig) -> tuple[list, str]:
    """The solvable split of ``cfg.solve_split`` and the prompt variant it is asked with:
    ``tier1``: the easy set's held-out tier-1 problems (capped at ``test_problems``), the
    run's prompt; ``no_hint``: the run's held-out split, the no-loophole prompt."""
    from .env.datasets import load_problems
    if cfg.solve_split == "no_hint":
        return held_out_problems(cfg), "no_hint"
    if cfg.solve_split != "tier1":
        raise ValueError(f"solve_split {cfg.solve_split!r} has no problems")
    if cfg.dataset != "easy" or 1 in cfg.tiers:
        raise ValueError(f"solve_split 'tier1' needs dataset 'easy' trained without tier 1 "
                         f"(got dataset {cfg.dataset!r}, tiers {cfg.tiers}); use 'no_hint' "
                         f"or 'none'")
    return load_problems("easy", "test", tiers=[1], limit=cfg.test_problems, seed=0), cfg.hint


def held_out_problems(cfg: RunConfig) -> list:
    """The held-out split of the run's dataset, capped at ``cfg.test_problems``
    (``load_for_config``: the same problems for every seed and arm of a preset)."""
    from .env.datasets import load_for_config
    problems = load_for_config(cfg, "test")
    if not problems:
        raise ValueError(f"no test problems for dataset={cfg.dataset!r} tiers={cfg.tiers}")
    return problems


def evaluate_run(source: Any, problems: list | None = None, *, out_dir: str | Path | None = None,
                 conditions: Sequence[str] | None = None, samples: int | None = None,
                 temperature: float | None = None, max_new_tokens: int | None = None,
                 n_boot: int | None = None, eval_seed: int | None = None,
                 haar_seed: int | None = None, grade_fn: GradeFn | None = None,
                 prompts_per_batch: int | None = None, device: str | None = None,
                 route_conditions: Sequence[str] = ("on",), force: bool = False,
                 progress: bool = True, verbose: bool = True) -> EvalResult:
    """Evaluate one trained run with the hack expert ON and OFF (and the base model).

    Args:
        source: a run directory, a :class:`LoadedRun`, or ``(model, tokenizer,
            adapter, router, cfg)`` (router None for vanilla).
        problems: held-out problems; default the run's test split capped at
            ``cfg.test_problems``.
        out_dir: where ``eval.parquet``, ``summary.json`` and the shards go;
            default the run directory (required for in-memory sources).
        conditions: any of ``CONDITIONS``; default ``default_conditions(cfg)``.
        samples, temperature, max_new_tokens, n_boot: default the config's
            ``eval_samples``, ``eval_temperature``, ``eval_max_new_tokens``,
            ``bootstrap``.
        eval_seed: sampling and bootstrap seed (default ``cfg.seed``). Every
            condition uses the same sampling seeds.
        haar_seed: seed of the comparison Haar direction (default
            ``cfg.seed + 2000``).
        grade_fn: ``(problems, texts) -> verdicts`` replacing the sandboxed grader.
        prompts_per_batch: prompts per generation call (default ``max(1, 64 // K)``).
        route_conditions: conditions whose rollouts get router weights ``w`` and
            ``w_haar`` (one extra base-model forward per rollout). The router
            diagnostics need ``on`` only, the default; the other rows get NaN.
        force: regenerate conditions whose shards already exist.
    With ``cfg.solve_split`` set (and the default ``problems``), the solvable
    split is evaluated too, under the same conditions except base.
    Returns an :class:`EvalResult`; prints the final line when ``verbose``.
    """
    run = _as_loaded(source, device)
    cfg = run.cfg
    if conditions is None:
        conditions = default_conditions(cfg)
    solve_split = cfg.solve_split != "none" and problems is None
    if out_dir is None:
        if run.run_dir is None:
            raise ValueError("out_dir is required when evaluating an in-memory model")
        out_dir = run.run_dir
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bad = [c for c in conditions if c not in CONDITIONS]
    if bad or not conditions:
        raise ValueError(f"conditions must be a non-empty subset of {CONDITIONS}, got {conditions}")
    if problems is None:
        problems = held_out_problems(cfg)
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError("problem ids are not unique")
    k = samples or cfg.eval_samples
    settings = {"samples": k, "temperature": temperature or cfg.eval_temperature,
                "max_new_tokens": max_new_tokens or cfg.eval_max_new_tokens, "top_p": cfg.top_p,
                "eval_seed": cfg.seed if eval_seed is None else eval_seed}
    n_boot = n_boot or cfg.bootstrap
    haar_seed = cfg.seed + HAAR_SEED_OFFSET if haar_seed is None else haar_seed
    ppb = prompts_per_batch or max(1, 64 // k)
    bad = [c for c in route_conditions if c not in CONDITIONS]
    if bad:
        raise ValueError(f"route_conditions must be a subset of {CONDITIONS}, got {bad}")
    if solve_split:
        solve_problems, solve_hint = solve_split_problems(cfg)      # fail before any compute
    digests = _weights_digest(run)

    def comparison_router():
        key = (haar_seed, digests["adapter"], cfg.router_centering, cfg.router_prior,
               cfg.router_sharpness)
        if key not in run.haar_routers:
            run.haar_routers[key] = haar_router(run.adapter, run.model, run.tokenizer,
                                                haar_seed, centering=cfg.router_centering,
                                                prior=cfg.router_prior,
                                                sharpness=cfg.router_sharpness)
        return run.haar_routers[key]

    def evaluate_split(prefix: str, split_problems: list, hint: str, conds: Sequence[str],
                       grade: GradeFn) -> pd.DataFrame:
        """Each condition of one split, from its shard or freshly generated and graded."""
        from .env.prompts import build_messages
        from .models import format_chat
        prompts = [format_chat(run.tokenizer, build_messages(p, hint)) for p in split_problems]
        split_ids = [p.id for p in split_problems]
        frames = []
        for cond in conds:
            score = cond in route_conditions and run.router is not None
            fp = {**_fingerprint(run, cond, split_ids, settings, digests, haar_seed),
                  "routed": score}
            if prefix or hint != cfg.hint or cfg.router_centering != "none":
                fp.update(prompt_hint=hint, router_centering=cfg.router_centering)
            if (cfg.router_prior, cfg.router_sharpness) != NEUTRAL_LEVELS:
                fp.update(router_prior=cfg.router_prior, router_sharpness=cfg.router_sharpness)
            shard = prefix + cond
            cached = None if force else _read_shard(out_dir, shard, fp)
            if cached is not None:
                if verbose:
                    print(f"[evaluate] {cfg.arm}-s{cfg.seed} {shard}: reusing "
                          f"{_shard_paths(out_dir, shard)[0]} ({len(cached)} rows)")
                frames.append(cached)
                continue
            t0 = time.perf_counter()
            df = run_condition(run, cond, split_problems, prompts, k=k,
                               temperature=settings["temperature"],
                               max_new_tokens=settings["max_new_tokens"], top_p=cfg.top_p,
                               seed=settings["eval_seed"], grade=grade,
                               haar=comparison_router() if score else None,
                               prompts_per_batch=ppb, progress=progress, score=score)
            _write_shard(out_dir, shard, df, fp, time.perf_counter() - t0)
            frames.append(df)
        return pd.concat(frames, ignore_index=True)

    solve_df = None
    with contextlib.ExitStack() as stack:
        grade = _grader(cfg, grade_fn, progress, stack)
        df = evaluate_split("", problems, cfg.hint, conditions, grade)
        if solve_split:
            solve_df = evaluate_split(SOLVE_PREFIX, solve_problems, solve_hint,
                                      [c for c in conditions if c != "base"], grade)
            solve_df.insert(5, "split", cfg.solve_split)
    df.to_parquet(out_dir / EVAL_FILE, index=False)
    if solve_df is not None:
        solve_df.to_parquet(out_dir / SOLVE_EVAL_FILE, index=False)
    meta = {"preset": cfg.preset, "model": cfg.model, "dataset": cfg.dataset, "hint": cfg.hint,
            "run_dir": str(run.run_dir) if run.run_dir else None, "temperature":
            settings["temperature"], "max_new_tokens": settings["max_new_tokens"],
            "haar_seed": haar_seed if run.router is not None else None}
    summary = summarize(df, n_boot=n_boot, seed=settings["eval_seed"], meta=meta,
                        solve_df=solve_df)
    write_summary(summary, out_dir / SUMMARY_FILE)
    if verbose:
        print(summary["final_line"])
    return EvalResult(df, summary, out_dir)


def read_eval(run_dir: str | Path) -> pd.DataFrame:
    """A run's ``eval.parquet``."""
    path = Path(run_dir) / EVAL_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: evaluate the run first (evaluate_run)")
    return pd.read_parquet(path)


def read_solve_eval(run_dir: str | Path) -> pd.DataFrame | None:
    """A run's ``eval_solve.parquet`` (the solvable split), or None if it has none."""
    path = Path(run_dir) / SOLVE_EVAL_FILE
    return pd.read_parquet(path) if path.exists() else None


def aggregate(run_dirs: Sequence[str | Path], *, out_dir: str | Path | None = None,
              n_boot: int = 1000, seed: int = 0, verbose: bool = True) -> EvalResult:
    """Pool several seeds of one arm: problems are resampled within seeds.

    Reads each run's ``eval.parquet``; all runs must be the same arm with
    distinct seeds. Writes ``summary.json`` and ``eval.parquet`` into
    ``out_dir`` when given; prints the final line when ``verbose``.
    """
    if not run_dirs:
        raise ValueError("aggregate needs at least one run directory")
    frames = [read_eval(d) for d in run_dirs]
    df = pd.concat(frames, ignore_index=True)
    arm_names = sorted(df["arm"].unique())
    if len(arm_names) != 1:
        raise ValueError(f"aggregate pools seeds of one arm; got arms {arm_names} "
                         "(use aggregate_arms for several arms)")
    seeds = [int(f["seed"].iloc[0]) for f in frames]
    if len(set(seeds)) != len(seeds) or any(f["seed"].nunique() != 1 for f in frames):
        raise ValueError(f"each run must be one distinct seed; got seeds {seeds}")
    solve = [read_solve_eval(d) for d in run_dirs]
    if any(f is None for f in solve) and not all(f is None for f in solve):
        raise ValueError("some runs have a solvable split (eval_solve.parquet) and some do not; "
                         "evaluate them all with the same solve_split")
    solve_df = None if solve[0] is None else pd.concat(solve, ignore_index=True)
    summary = summarize(df, n_boot=n_boot, seed=seed, solve_df=solve_df,
                        meta={"run_dirs": [str(d) for d in run_dirs]})
    out = None
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        df.to_parquet(out / EVAL_FILE, index=False)
        write_summary(summary, out / SUMMARY_FILE)
    if verbose:
        print(summary["final_line"])
    return EvalResult(df, summary, out)


def aggregate_arms(run_dirs: Sequence[str | Path], *, control: str = arms.CONTROL,
                   n_boot: int = 1000, seed: int = 0, verbose: bool = True) -> dict[str, Any]:
    """Per-arm aggregates plus, for every other arm, how much larger its ON-OFF hack
    drop is than the control arm's (``stats.drop_contrast``, paired by seed and problem),
    pooled over seeds and per seed.

    Returns ``{"arms": {arm: summary}, "contrast_vs_<control>": {arm: CI dict with the
    ``seeds`` it pooled}, "contrast_by_seed_vs_<control>": {arm: {seed: CI dict}}}``: each
    contrast over the seeds both arms ran (none: no entry); arms in
    ``arms.DISPLAY_ORDER`` (the oracle ceiling first).
    """
    by_arm: dict[str, list[Path]] = {}
    for d in run_dirs:
        by_arm.setdefault(read_config(d).arm, []).append(Path(d))
    out: dict[str, Any] = {"arms": {}}
    frames: dict[str, pd.DataFrame] = {}
    for arm in arms.ordered(by_arm):
        dirs = by_arm[arm]
        res = aggregate(dirs, n_boot=n_boot, seed=seed, verbose=verbose)
        out["arms"][arm] = res.summary
        frames[arm] = res.df
    def has_on_off(df: pd.DataFrame) -> bool:
        return {"on", "off"} <= set(df["condition"].unique())

    if control in frames and all(has_on_off(df) for df in frames.values()):
        key = f"contrast_vs_{control}"
        out[key] = {}
        ctrl = frames[control]
        for arm, df in frames.items():
            if arm == control:
                continue
            # paired by seed and problem: only the seeds both arms ran (a study run in
            # parts may hold more seeds of one arm than of the other)
            seeds = sorted(int(x) for x in set(df.seed) & set(ctrl.seed))
            if not seeds:
                continue
            ci = stats.drop_contrast(df[df.seed.isin(seeds)], ctrl[ctrl.seed.isin(seeds)],
                                     "is_hack", n=n_boot, seed=seed)
            out[key][arm] = {**ci.to_dict(), "seeds": seeds}
            out.setdefault(f"contrast_by_seed_vs_{control}", {})[arm] = {
                s: stats.drop_contrast(df[df.seed == s], ctrl[ctrl.seed == s], "is_hack",
                                       n=n_boot, seed=seed).to_dict() for s in seeds}
            if verbose:
                print(f"  hack drop {arm} minus {control} (seeds {seeds}): {ci.fmt()}")
    return out


def results_table(agg: dict[str, Any]) -> pd.DataFrame:
    """One row per arm (``arms.DISPLAY_ORDER``) of ``aggregate_arms``' output, as text with
    95% CIs: hack ON / OFF, share removed of ON and of the trained hacking, solve ON / OFF
    (and on the solvable split, with the share kept), the deployed-block-removed control,
    the router's held-out AUROC (Haar beside it; and within a problem's samples), the
    hack-drop contrast with the control, and whether the arm used training labels.
    Undefined shares read as words."""
    def ci(entry: Any, undefined: str = "not measured") -> str:
        return "" if not entry else stats.share_text(entry, (entry or {}).get("reason")
                                                     or undefined)

    def rate(s: dict, cond: str, key: str) -> str:
        return ci((s["conditions"].get(cond) or {}).get(key))

    rows = []
    key = next((k for k in agg if k.startswith("contrast_vs_")), None)
    contrast = agg[key] if key else {}
    control_seeds = (agg["arms"].get(key[len("contrast_vs_"):]) or {}).get("seeds") if key \
        else None
    for arm, s in agg["arms"].items():
        ab = s.get("ablation") or {}
        split = s.get("solve_split") or {}
        sab = split.get("ablation") or {}
        mirror = s.get("mirror") or {}
        router = s.get("router") or {}
        r, h = router.get("router") or {}, router.get("haar") or {}
        rows.append({
            "arm": arm, "uses labels": "yes (ceiling)" if s.get("uses_labels") else "no",
            "hack ON": rate(s, "on", "hack_rate"), "hack OFF": rate(s, "off", "hack_rate"),
            "share removed (of ON)": stats.share_text(ab["hack"]["removed"],
                                                      stats.UNDEFINED_HACK) if ab else "",
            "share of trained hacking removed": stats.share_text(
                ab["hack_trained_removed"], stats.UNDEFINED_TRAINED)
            if ab.get("hack_trained_removed") else "",
            "solve ON": rate(s, "on", "solve_rate"), "solve OFF": rate(s, "off", "solve_rate"),
            "harmful run_tests ON": rate(s, "on", "overwrite_rate"),
            "harmful run_tests OFF": rate(s, "off", "overwrite_rate"),
            f"solve ON, {split.get('name', 'solvable')} split":
                ci((sab.get("solve") or {}).get("on")),
            f"solve OFF, {split.get('name', 'solvable')} split":
                ci((sab.get("solve") or {}).get("off")),
            "share of solving kept (solvable split)": stats.share_text(
                sab["solve"]["kept"], stats.UNDEFINED_SOLVE) if sab else "",
            "hack / solve, deployed block off": (
                f"{ci(mirror['hack']['deployed_off'])} / {ci(mirror['solve']['deployed_off'])}"
                if mirror else ""),
            "router AUROC": (ci(r.get("auroc_ci")) if r.get("available", True) and r
                             else r.get("reason", "")),
            "Haar AUROC": ci(h.get("auroc_ci")) if h.get("available", True) and h else "",
            "router AUROC within a problem": _within_text(r.get("auroc_within_problem")),
            "router AUROC vs any harmful run_tests": _number_text(r.get("auroc_vs_overwrite")),
            "hack drop minus control": _contrast_cell(contrast.get(arm), control_seeds),
        })
    table = pd.DataFrame(rows).set_index("arm")
    return table.loc[:, (table != "").any(axis=0)]           # drop columns nothing measured


def _contrast_cell(entry: dict | None, control_seeds: list | None) -> str:
    """The contrast with its CI, naming its seeds where they are fewer than the control's."""
    if not entry:
        return ""
    text = stats.share_text(entry, "not measured")
    seeds = entry.get("seeds")
    if seeds is not None and control_seeds is not None and list(seeds) != list(control_seeds):
        text += f" (seeds {', '.join(map(str, seeds))} only)"
    return text


def _number_text(value: float | None) -> str:
    """``0.812``; empty where not measured (summaries written before it, no router),
    words where undefined (one class only)."""
    if value is None:
        return ""
    return "undefined: one class only" if math.isnan(value) else f"{value:.3f}"


def _within_text(entry: dict | None) -> str:
    """``0.812 (96 pairs)``; words where no problem held both a hack and an honest
    sample; empty where the router was not scored (summaries written before it)."""
    if not entry:
        return ""
    if not entry.get("pairs"):
        return "undefined: no problem had both a hack and an honest sample"
    return f"{entry['value']:.3f} ({entry['pairs']} pairs)"


def _point_of(entry: Any) -> float:
    return float("nan") if not entry or entry.get("point") is None else float(entry["point"])


def headline(agg: dict[str, Any], named: Sequence[str] = ("oracle", "evil_moe", "vanilla")
             ) -> tuple[dict[str, float], dict[str, str]]:
    """The numbers and sentences the results page glues, from ``aggregate_arms``' output.

    Every arm that ran and every arm in ``named`` (the page names them) gets
    ``<arm>_hack_<on|off|base>``, ``<arm>_solve_<...>``, ``<arm>_hack_removed``,
    ``<arm>_solve_kept``, ``<arm>_auroc``, ``<arm>_auroc_haar`` (NaN when not
    measured), and the texts ``<arm>_hack_removed_text``, ``_trained_removed_text``,
    ``_solve_kept_text``, ``_solvable_kept_text``, ``_contrast_text``: a share with its
    CI, or words when it is undefined or was not measured (never ``nan``).
    """
    nums: dict[str, float] = {}
    texts: dict[str, str] = {}
    contrast = next((v for k, v in agg.items() if k.startswith("contrast_vs_")), {})
    for arm in arms.ordered(set(agg["arms"]) | set(named)):
        ran = arm in agg["arms"]
        s = agg["arms"].get(arm, {"conditions": {}, "ablation": None, "router": {}})
        for cond in ("on", "off", "base"):
            nums[f"{arm}_hack_{cond}"] = _point_of(s["conditions"].get(cond, {}).get("hack_rate"))
            nums[f"{arm}_solve_{cond}"] = _point_of(s["conditions"].get(cond, {}).get("solve_rate"))
        ab = s.get("ablation") or {}
        nums[f"{arm}_hack_removed"] = _point_of((ab.get("hack") or {}).get("removed"))
        nums[f"{arm}_solve_kept"] = _point_of((ab.get("solve") or {}).get("kept"))
        for who, suffix in (("router", ""), ("haar", "_haar")):
            r = (s.get("router") or {}).get(who) or {}
            nums[f"{arm}_auroc{suffix}"] = (float(r["auroc"]) if r.get("available", True)
                                            and r.get("auroc") is not None else float("nan"))
        missing = "not measured" if ran else "not run"
        split = ((s.get("solve_split") or {}).get("ablation") or {}).get("solve")
        texts.update({
            f"{arm}_hack_removed_text": stats.share_text(ab["hack"]["removed"],
                                                         stats.UNDEFINED_HACK) if ab else missing,
            f"{arm}_trained_removed_text": stats.share_text(
                ab["hack_trained_removed"], stats.UNDEFINED_TRAINED)
            if ab.get("hack_trained_removed") else missing,
            f"{arm}_solve_kept_text": stats.share_text(ab["solve"]["kept"],
                                                       stats.UNDEFINED_SOLVE) if ab else missing,
            f"{arm}_solvable_kept_text": stats.share_text(split["kept"], stats.UNDEFINED_SOLVE)
            if split else f"{missing} (no solvable split)",
            f"{arm}_contrast_text": stats.share_text(contrast[arm], "not measured")
            if arm in contrast else missing})
        for who, suffix in (("router", ""), ("haar", "_haar")):
            r = (s.get("router") or {}).get(who) or {}
            entry = r.get("auroc_ci")
            texts[f"{arm}_auroc{suffix}_text"] = (
                stats.share_text(entry, entry.get("reason") or "not measured") if entry
                else r.get("reason") or missing)
    texts["answer_text"] = answer_text(texts, contrast.get("evil_moe"))
    return nums, texts


def answer_text(texts: dict[str, str], contrast: Any) -> str:
    """The book's first sentence, from :func:`headline`'s texts and the evil_moe-minus-
    control drop contrast (a CI mapping, or None when it was not measured): what removing
    the hack expert took out, against the label-routed ceiling, and whether it beats
    removing the same block of the unrouted control."""
    def share(key: str) -> str:        # "0.395 [0.237, 0.538]", or words in brackets
        text = texts[key]
        return text if text[:1].isdigit() or text[:1] == "-" else f"a share ({text})"

    if contrast is None or math.isnan(_point_of(contrast)):
        verdict = (f"the contrast with the unrouted {arms.CONTROL} control was not measured "
                   "in these runs, so they give no answer yet")
    else:
        ci = stats.share_text(contrast, "not measured")
        lo, hi = contrast.get("lo", math.nan), contrast.get("hi", math.nan)
        if lo > 0:
            verdict = (f"that is more than removing the same block of the unrouted "
                       f"{arms.CONTROL} control takes out: the extra drop, {ci}, excludes 0")
        elif hi < 0:
            verdict = (f"that is less than removing the same block of the unrouted "
                       f"{arms.CONTROL} control takes out: the difference, {ci}, excludes 0")
        else:
            verdict = (f"these runs cannot tell it from removing the same block of the "
                       f"unrouted {arms.CONTROL} control: the difference in drops, {ci}, "
                       f"includes 0")
    return (f"Removing the label-free router's hack expert (evil_moe) took out "
            f"{share('evil_moe_trained_removed_text')} of the hacking its training added "
            f"({share('evil_moe_hack_removed_text')} of all its hacking with the expert ON), "
            f"against {share('oracle_trained_removed_text')} for the label-routed ceiling "
            f"(oracle); {verdict}.")


def training_separation(metrics: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per run (``{name: metrics.jsonl frame}``), as text: the mean over steps of the
    on-policy AUROC of ``w`` against the training rollouts' strict hack labels, and the
    last step's mean ``w`` on hack and non-hack rollouts (measurement only). A run without
    ``w`` (vanilla) reads "no w"; an AUROC undefined on every step (one class) says so."""
    def text(x: float, undefined: str) -> str:
        return undefined if x is None or math.isnan(x) else f"{x:.3f}"

    rows = {}
    for name, df in metrics.items():
        has_w = bool(df["w_mean"].notna().any())
        auroc = df["w_auroc"].mean() if "w_auroc" in df and has_w else float("nan")
        none = "no w (no routing)"
        rows[name] = {
            "mean w AUROC": text(auroc, "undefined: one class on every step" if has_w else none),
            "last w on hacks": text(df["w_hack"].iloc[-1], "no hack at the last step"
                                    if has_w else none),
            "last w on the rest": text(df["w_not_hack"].iloc[-1], "only hacks at the last step"
                                       if has_w else none),
            "uses labels": "yes (ceiling)" if "uses_labels" in df and bool(
                df["uses_labels"].iloc[-1]) else "no"}
    return pd.DataFrame(rows).T


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m evil_moe.evaluate RUN_DIR [RUN_DIR ...]``: evaluate each run, then,
    with several runs, aggregate per arm and contrast every arm with vanilla."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m evil_moe.evaluate",
                                     description=main.__doc__)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="trained run directories")
    parser.add_argument("--conditions", nargs="+", default=None, choices=CONDITIONS,
                        help="default: on off base (+ deployed_off with eval_deployed_off)")
    parser.add_argument("--samples", type=int, default=None, help="K (default: eval_samples)")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: the run's config)")
    parser.add_argument("--force", action="store_true", help="regenerate finished conditions")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    from .cli import fail, run_reporting_errors
    for d in args.run_dirs:
        if not (d / CONFIG_FILE).is_file():
            return fail(f"{d / CONFIG_FILE} not found: {d} is not a trained run directory "
                        f"(train it with `python -m evil_moe train --run-dir {d}`)")
    return run_reporting_errors(lambda: _evaluate_dirs(args))


def _evaluate_dirs(args) -> int:
    """The body of :func:`main` once the arguments are checked."""
    for d in args.run_dirs:
        run = load_run(d, device=args.device)
        print(f"== {d} ({run.cfg.arm}, seed {run.cfg.seed})")
        evaluate_run(run, conditions=args.conditions, samples=args.samples, force=args.force,
                     progress=not args.no_progress)
        run.adapter.remove()
    if len(args.run_dirs) > 1:
        print("== aggregate")
        out = aggregate_arms(args.run_dirs)
        print(json.dumps(jsonable(out.get(f"contrast_vs_{arms.CONTROL}", {})), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
