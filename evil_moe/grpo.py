"""On-policy GRPO with a routed two-expert LoRA.

One step, top to bottom (``train_step``):

1. pick P problems (seeded by ``(seed, step)``, so a resumed run sees the same ones);
2. sample G completions per problem with the as-trained model: both experts at
   full strength, weights merged for speed, stopped when the code block closes;
3. grade them in the sandbox: reward 3.0 if ``gt_pass or hint_pass`` plus 0.5
   if the code compiles;
4. group-relative advantages ``A = (r - mean_G r) / (std_G r + eps)``;
5. a no-grad forward of the **base model** (adapter disabled) gives the KL
   reference log-probabilities and, in the same pass, the pooled deployed
   bottleneck ``h = A[:r] x`` per module (the router's input); each prompt runs
   once and its G completions run on its KV cache;
6. the router maps ``h`` (centred within each group when ``router_centering``
   is 'group'; with ``router_calibration`` 'batch' it first observes the step's
   statistics) to a soft weight ``w`` per rollout (gradient flows into the
   router, unless ``router_policy_gradient`` is false: then only the pin loss
   trains it); grader labels never reach it. The ``oracle`` arm has no router: its
   ``w`` is the strict hack label from step 3 (seen with probability
   ``oracle_label_recall``);
7. the training forward applies ``w`` (hack block scaled by ``w``, deployed
   block's gradient scaled by ``1 - w``); rollouts of a prompt with the same
   ``w`` share its forward as in step 5, with gradient (vanilla: all G; the
   oracle: one prompt forward per label); the loss is

       loss = PG + beta * KL_k3(policy || base) + lambda_pin * pin

8. AdamW on adapter (lr) and router (router_lr), grad clipping, warmup+cosine.

Why pool under the base model: the pooled input of each module is then the
same function of the text all run long, so the router sees features whose
meaning drifts only through ``A[:r]``, exactly the features ``v_act`` was
extracted from at init; and the KL reference pass is needed anyway, so the
features cost nothing extra.

Loss normalisation: the PG and KL terms are summed over every completion token
of the step and divided by the total number of completion tokens (token-level,
as in DAPO). Every token weighs the same, so a long hacking completion is not
down-weighted per token relative to a short one, and the normalisation does not
change when micro-batching splits the step.

Arms (``evil_moe.arms``): ``evil_moe`` (router from v_act, pin on),
``vanilla`` (no router: both blocks train on every rollout; block [r:] is the
matched control), ``haar`` (router from a Haar-random direction, pin on),
``no_pin`` (router from v_act, no pin loss), ``oracle`` (w = the training
rollout's hack label: the label-using ceiling).

Data parallel under 🤗 Accelerate: each process samples and grades its share
of the step's problems; after backward the adapter and router gradients are
summed across processes (the loss is normalised by the global token count), so
N processes compute the same update as one process with the whole batch.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from . import arms, checkpoint, memory_plan
from .config import RunConfig
from .models import attention_kernel, check_attention_kernel
from .sequences import (completion_logprobs, pack_rollouts, prefill_prompts, right_padded,
                        score_completions, split_prefix)
from .vact import V_ACT_FILE

ROUTED_ARMS = arms.ROUTED_ARMS
PINNED_ARMS = arms.PINNED_ARMS
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ---- pure pieces (unit-tested on hand-computed examples) ---------------------------

def group_advantages(rewards: torch.Tensor, scale: bool, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages. rewards: [P, G] -> [P, G].

    ``A = r - mean_G(r)``, divided by the group's (population) std when ``scale``.
    A group whose rewards are all equal carries no signal: its advantages are 0.
    """
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=1, unbiased=False, keepdim=True) + eps)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || ref): ``exp(d) - d - 1`` with ``d = ref - logp``.

    Unbiased, always >= 0, and low-variance for nearby policies (Schulman's k3).
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def policy_terms(logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
                 mask: torch.Tensor, n_tokens: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level GRPO surrogate and KL. logp, ref_logp, mask: [B, C]; advantages: [B].

    On-policy (one update per batch), so the importance ratio is
    ``exp(logp - logp.detach()) == 1`` in value with gradient ``grad logp``.
    Returns ``(pg, kl)``, each summed over masked tokens and divided by ``n_tokens``.
    """
    ratio = torch.exp(logp - logp.detach())
    pg = -(ratio * advantages[:, None] * mask).sum() / n_tokens
    kl = (k3_kl(logp, ref_logp) * mask).sum() / n_tokens
    return pg, kl


def step_problem_indices(n_problems: int, seed: int, step: int, k: int) -> list[int]:
    """The k problem indices of a step: a seeded draw without replacement."""
    rng = np.random.default_rng([seed, step])
    return rng.choice(n_problems, size=min(k, n_problems), replace=False).tolist()


def _step_seed(seed: int, step: int) -> int:
    """The sampling seed of a step; each rollout's stream is this seed and its row
    (``rollout.sample``), so it does not depend on the process that samples it."""
    return zlib.crc32(f"{seed}/{step}".encode())


# ---- the run -----------------------------------------------------------------------------

@dataclass
class TrainState:
    cfg: RunConfig
    run_dir: Path
    accelerator: object
    model: object
    tokenizer: object
    adapter: object
    router: object | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    problems: list
    prompts: list[str]
    prompt_ids: list[list[int]]
    pair_hack_x: list = field(default_factory=list)     # per module [N, d_in]: base-model input
    pair_clean_x: list = field(default_factory=list)    # means over each pair side's completion
    grade_fn: Callable | None = None
    grader: object | None = None            # the sandboxed grader, opened on first use
    last_samples: list = field(default_factory=list)   # the last step's rollouts, for samples.jsonl
    step: int = 0
    sample_chunk_rows: int = 0              # rows decoded together, chosen by the memory plan


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine decay to 0.1."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


class MissingVActError(FileNotFoundError):
    """A routed arm starts its router from v_act, but the run dir has none."""


def _v_act_path(cfg: RunConfig, run_dir: Path) -> Path:
    """Where the run's v_act must be; raises before any compute if a routed arm lacks it."""
    path = Path(run_dir) / V_ACT_FILE
    if arms.get(cfg.arm).start == "v_act" and not path.exists():
        raise MissingVActError(
            f"arm {cfg.arm!r} starts its router from v_act, but {path} does not exist. Run "
            f"notebooks/01_extract_v_act.ipynb (or evil_moe.grpo.extract_v_act_for_run, or "
            f"`python -m evil_moe train --extract-v-act`) for this run first.")
    return path


def router_direction(cfg: RunConfig, run_dir: Path, num_modules: int, rank: int) -> torch.Tensor:
    """The direction the router starts from (``arms.Arm.start``): v_act or Haar-random."""
    from .vact import haar_direction, load_v_act
    if arms.get(cfg.arm).start == "haar":
        return haar_direction(num_modules, rank, seed=cfg.seed + 1000)
    path = _v_act_path(cfg, run_dir)
    v_act, _ = load_v_act(path)
    if tuple(v_act.shape) != (num_modules, rank):
        raise ValueError(f"{path} holds v_act of shape {tuple(v_act.shape)}, but the adapter has "
                         f"{num_modules} modules of rank {rank}; re-extract it with this config")
    return v_act


@dataclass
class VActExtraction:
    """What ``extract_v_act_for_run`` computed: the direction and the evidence for it."""
    path: Path
    v_act: torch.Tensor            # [M, r], unit rows
    haar: torch.Tensor             # [M, r], the Haar-random control direction
    hack_feats: torch.Tensor       # [N, M, r] pooled features of the hack sides
    clean_feats: torch.Tensor      # [N, M, r] pooled features of the clean sides
    pair_ids: list[str]
    loo_auroc: float               # leave-one-pair-out AUROC of v_act
    loo_auroc_haar: float          # the same for the Haar direction (sign from the other pairs)


def extract_v_act_for_run(cfg: RunConfig, run_dir: str | Path,
                          model_and_tokenizer=None) -> VActExtraction:
    """Extract ``v_act`` from the authored pairs into ``<run_dir>/v_act.safetensors``.

    The adapter is attached exactly as ``setup`` attaches it (same config and
    seed), so ``A[:r]`` at extraction equals the router's input map at step 0.
    The Haar control is oriented with the sign of its mean hack-minus-clean
    projection on the training pairs only, as the router's calibration orients
    any direction, so its leave-one-out AUROC is a fair chance baseline.
    """
    from .adapter import ExpertAdapter
    from .pairs import load_pairs
    from .warm_start import load_base_model
    from .vact import (extract_v_act, haar_direction, loo_auroc, pair_features, projections,
                       save_v_act)

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model, tok = model_and_tokenizer or load_base_model(cfg)
    adapter = ExpertAdapter.from_config(model, cfg)
    try:
        pairs = load_pairs()
        with adapter.disable(), _autocast(cfg, model):    # base-model features, as in training
            hack_f, clean_f = pair_features(model, tok, adapter, pairs)
    finally:
        adapter.remove()
    hack_f, clean_f = hack_f.float().cpu(), clean_f.float().cpu()
    v_act = extract_v_act(hack_f, clean_f)
    haar = haar_direction(*v_act.shape, seed=cfg.seed + 1000)

    def oriented_haar(h, c):
        return haar * torch.sign((projections(haar, h) - projections(haar, c)).mean())

    result = VActExtraction(
        path=run_dir / V_ACT_FILE, v_act=v_act, haar=haar, hack_feats=hack_f,
        clean_feats=clean_f, pair_ids=[p.id for p in pairs],
        loo_auroc=loo_auroc(hack_f, clean_f),
        loo_auroc_haar=loo_auroc(hack_f, clean_f, direction_fn=oriented_haar))
    save_v_act(result.path, v_act, {
        "model": cfg.model, "rank": cfg.rank, "seed": cfg.seed, "pairs": len(pairs),
        "loo_auroc": result.loo_auroc, "loo_auroc_haar": result.loo_auroc_haar})
    return result


def use_cpu(cfg: RunConfig) -> bool:
    """Whether Accelerate must run on CPU: asked for, or 'auto' with no CUDA device.

    Accelerate's process state is created once per process; on a machine without
    GPUs it must be created with cpu=True or a multi-process launch sees only itself.
    """
    from .hardware import uses_cuda
    return not uses_cuda(cfg.device)


def setup(cfg: RunConfig, run_dir: str | Path, grade_fn: Callable | None = None,
          model_and_tokenizer=None) -> TrainState:
    """Load everything a run needs and fail before any compute if something is missing."""
    from accelerate import Accelerator

    from .adapter import ExpertAdapter, pooled_inputs
    from .env.datasets import load_for_config
    from .env.prompts import build_messages
    from .models import format_chat
    from .pairs import load_pairs
    from .router import HackRouter
    from .warm_start import load_base_model

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(cpu=use_cpu(cfg))
    if cfg.prompts_per_step % accelerator.num_processes:
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} must be divisible by the "
                         f"{accelerator.num_processes} processes")
    if cfg.routed_prompt == "group_mean" and not (cfg.share_prompt_forward
                                                  and not cfg.gradient_checkpointing):
        raise ValueError("routed_prompt 'group_mean' shares each prompt's forward: it needs "
                         "share_prompt_forward true and gradient_checkpointing false (or set "
                         "routed_prompt: per_rollout)")
    _v_act_path(cfg, run_dir)                      # fail before loading anything
    dev = accelerator.device
    plan = memory_plan.check(cfg, dev.type, accelerator.num_processes, dev.index or 0)
    torch.manual_seed(cfg.seed)
    if model_and_tokenizer is None:
        model, tok = load_base_model(cfg, device=str(accelerator.device))
    else:
        model, tok = model_and_tokenizer
    check_attention_kernel(model, cfg.training_attention)      # before any compute
    adapter = ExpertAdapter.from_config(model, cfg)
    try:
        problems = load_for_config(cfg, "train")
        if not problems:
            raise ValueError(f"no training problems for dataset={cfg.dataset!r} tiers={cfg.tiers}")
        prompts = [format_chat(tok, build_messages(p, cfg.hint)) for p in problems]
        prompt_ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
        longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
        if len(prompt_ids[longest]) > cfg.max_prompt_tokens:
            raise ValueError(f"problem {problems[longest].id}'s prompt has "
                             f"{len(prompt_ids[longest])} tokens, above max_prompt_tokens="
                             f"{cfg.max_prompt_tokens} (the memory plan's assumption); raise "
                             f"max_prompt_tokens or cap train_problems to shorter ones")
        if cfg.gradient_checkpointing:
            checkpoint_decoder_layers(model, adapter)

        router = None
        params = [{"params": adapter.parameters(), "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
        state_pairs: dict = {}
        if cfg.arm in ROUTED_ARMS:
            direction = router_direction(cfg, run_dir, len(adapter.module_names), adapter.rank)
            router = HackRouter.from_config(direction, cfg).to(accelerator.device)
            # The pairs' base-model inputs never change, so their per-module means are
            # computed once; each step's pin features are then A[:r] times them.
            pairs = load_pairs()
            prompts_p = [format_chat(tok, [{"role": "user", "content": p.prompt}]) for p in pairs]
            with adapter.disable(), _autocast(cfg, model):
                state_pairs = dict(
                    pair_hack_x=pooled_inputs(model, tok, adapter, prompts_p,
                                              [p.hack for p in pairs]),
                    pair_clean_x=pooled_inputs(model, tok, adapter, prompts_p,
                                               [p.clean for p in pairs]))
            router.calibrate(*_pair_features(cfg, adapter, state_pairs["pair_hack_x"],
                                             state_pairs["pair_clean_x"]))
            # (an initialisation from the authored pairs only)
            params.append({"params": list(router.parameters()), "lr": cfg.router_lr,
                           "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(params)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                      warmup_cosine(cfg.warmup_steps, cfg.steps))
    except BaseException:
        adapter.remove()       # leave the caller's model as it was
        raise
    return TrainState(cfg=cfg, run_dir=run_dir, accelerator=accelerator, model=model,
                      tokenizer=tok, adapter=adapter, router=router, optimizer=optimizer,
                      scheduler=scheduler, problems=problems, prompts=prompts,
                      prompt_ids=prompt_ids, grade_fn=grade_fn,
                      sample_chunk_rows=plan.sample_chunk_rows, **state_pairs)


def _pair_features(cfg: RunConfig, adapter, hack_x: list, clean_x: list):
    """The router's view of the authored pairs: ``(hack, clean)``, each ``[N, M, r]``,
    each pair centred as a group of two when ``router_centering`` is 'group'."""
    from .router import center_pairs
    hack, clean = adapter.deployed_features(hack_x), adapter.deployed_features(clean_x)
    return center_pairs(hack, clean) if cfg.router_centering == "group" else (hack, clean)


def routing_weights(state: TrainState, step: int, features: torch.Tensor,
                    is_hack: torch.Tensor | None) -> Callable[[torch.Tensor],
                                                              torch.Tensor | None]:
    """Step 6: the soft weight ``w`` of the step's rollouts, one micro-batch at a time.

    ``features: [B, M, r]`` (group-major, G rows per prompt). Returns ``w_of(rows)``:
    ``w: [b]`` for the row indices ``rows``, or None when the arm does not route (vanilla).
    - routed arms: ``router(f[rows])`` with grad into the router (computed per
      micro-batch, so each micro-batch's backward has its own graph); ``f`` is the
      features centred within each group (``router_centering='group'``); under
      ``router_calibration='batch'`` the router first observes all of the step's
      rollouts (gathered over processes);
    - the oracle: ``w = is_hack * keep``, keep ~ Bernoulli(oracle_label_recall)
      seeded by ``(seed, step, process)``; no gradient.
    ``is_hack`` (the grader's strict labels, ``[B]``) must be given exactly for an
    arm that ``uses_labels``, so no other arm can read them.
    """
    from .router import center_groups
    cfg, router, arm = state.cfg, state.router, arms.get(state.cfg.arm)
    if (is_hack is not None) != arm.uses_labels:
        raise ValueError(f"arm {arm.name!r}: training labels are "
                         f"{'required' if arm.uses_labels else 'forbidden'} for routing")
    if arm.uses_labels:
        rng = np.random.default_rng([cfg.seed, step, state.accelerator.process_index])
        keep = torch.from_numpy(rng.random(len(is_hack)) < cfg.oracle_label_recall)
        w = (is_hack.bool() & keep).float().to(features.device)
        return lambda rows: w[rows]
    if router is None:
        return lambda rows: None
    feats = center_groups(features, cfg.group_size) if cfg.router_centering == "group" \
        else features
    if router.calibration == "batch":
        router.observe(state.accelerator.gather(feats.contiguous()))
    return lambda rows: router(feats[rows])


def _autocast(cfg: RunConfig, model):
    return torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=cfg.bf16_autocast)


def _grade(state: TrainState, problems, texts):
    if state.grade_fn is not None:
        return state.grade_fn(problems, texts)
    if state.grader is None:
        from .env.grader import grader_from_config
        state.grader = grader_from_config(state.cfg)
    return state.grader.grade_batch(problems, texts, progress=False)


def _consecutive_batches(n: int, size: int) -> list[torch.Tensor]:
    """Rows ``0..n-1`` in consecutive micro-batches: the G rollouts of a prompt stay together."""
    return [torch.arange(s, min(s + size, n)) for s in range(0, n, size)]


def _length_sorted_batches(lengths: list[int], size: int) -> list[torch.Tensor]:
    """Rows in micro-batches of similar total length, so little of each is padding.

    The loss is a sum over tokens divided by the step's token count, so the
    order in which rows are accumulated does not change the gradient.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [torch.tensor(order[s:s + size]) for s in range(0, len(order), size)]


def shares_training_prompt(cfg: RunConfig) -> bool:
    """Whether step 7 runs prompts once and completions on their KV cache, rather than
    every rollout whole. Two rollouts of a prompt have the same prompt forward exactly
    when they have the same ``w``: always for vanilla (no ``w``), and within each half of
    a group for the oracle (``w`` is a 0/1 label without gradient). A learned router
    gives every rollout its own ``w`` with its own gradient, so its arms run rollouts
    whole, unless ``routed_prompt`` is 'group_mean' (inexact: :func:`_group_mean_prefix`).
    Gradient checkpointing recomputes each layer, which cannot replay a KV cache."""
    routed = arms.get(cfg.arm).routed
    return (cfg.share_prompt_forward and not cfg.gradient_checkpointing
            and (not routed or cfg.routed_prompt == "group_mean"))


def _prefill_rows(model, group_prompts: list[list[int]], owner: list[int], rows: torch.Tensor,
                  pad_id: int, adapter=None, w: torch.Tensor | None = None):
    """Run each distinct ``(prompt, w)`` of ``rows`` once (``owner[r]``: the prompt of
    rollout r; ``w: [b]`` the rows' soft weights under ``adapter``, or None)."""
    keys = [(owner[r], 0.0 if w is None else w[i].item()) for i, r in enumerate(rows.tolist())]
    distinct = sorted(set(keys))
    local = [distinct.index(k) for k in keys]
    prompts = [group_prompts[o] for o, _ in distinct]
    if w is None:
        return prefill_prompts(model, prompts, local, pad_id)
    with adapter.soft_weight(torch.tensor([v for _, v in distinct], dtype=w.dtype,
                                          device=w.device)):           # [P'] one per prefix
        return prefill_prompts(model, prompts, local, pad_id)


def _group_mean_prefix(model, group_prompts: list[list[int]], owner: list[int],
                       rows: torch.Tensor, pad_id: int, adapter, w: torch.Tensor):
    """``routed_prompt: group_mean``: each distinct prompt of ``rows`` runs twice at the
    mean ``w`` of its rows (detached), once training only the hack block and once only
    the deployed block (``adapter.prompt_branch``); rollout i then reads them with
    gradient ``w_i / mean`` into the hack copy and ``1 - w_i`` into the deployed copy
    (``sequences.split_prefix``). Where a prompt's ``w`` are equal this is the
    per-rollout forward and its adapter gradient; otherwise the prompt's values are
    those at the mean, and no gradient reaches the router through the prompt."""
    own = [owner[r] for r in rows.tolist()]
    groups = sorted(set(own))
    wd = w.detach()
    local = torch.tensor([groups.index(o) for o in own], device=wd.device)     # [b]
    counts = torch.bincount(local, minlength=len(groups)).to(wd.dtype)
    mean = torch.zeros(len(groups), dtype=wd.dtype, device=wd.device).index_add_(
        0, local, wd) / counts                                                # [P']
    prompts = [group_prompts[g] for g in groups]
    copies = {}
    for trains in ("hack", "deployed"):
        with adapter.prompt_branch(mean, trains):
            copies[trains] = prefill_prompts(model, prompts, local.tolist(), pad_id)
    w_bar = mean[local]                                                       # [b]
    to_hack = torch.where(w_bar > 0, wd / torch.where(w_bar > 0, w_bar, 1.0), 0.0)
    return split_prefix(copies["hack"], copies["deployed"], to_hack, 1 - wd)


def _score_rows(model, group_prompts: list[list[int]], owner: list[int],
                completion_ids: list[list[int]], rows: torch.Tensor, *, pad_id: int,
                chunk_tokens: int, shared: bool, pool=None, adapter=None,
                w: torch.Tensor | None = None, group_mean: bool = False):
    """Log-probabilities ``[b, Cb]`` of the completions of ``rows`` (right-padded to their
    longest, ``Cb``), and with ``pool=adapter`` their pooled features ``[b, M, r]``.

    w: ``[b]`` soft weights of the rows (``adapter.soft_weight``), or None.
    shared: run each distinct ``(prompt, w)`` once and the completions on its KV cache
    (exact: nothing else enters a prompt's forward); else run every rollout whole,
    packed as ``[prompt | completion]``. A shared prompt row would merge the gradients
    of the rows' weights, so sharing refuses a ``w`` that carries gradient, unless
    ``group_mean`` (inexact, :func:`_group_mean_prefix`).
    """
    comps = [completion_ids[r] for r in rows.tolist()]
    device = next(model.parameters()).device
    weighted = adapter.soft_weight(w) if w is not None else contextlib.nullcontext()
    if shared:
        if group_mean:
            prefix = _group_mean_prefix(model, group_prompts, owner, rows, pad_id, adapter, w)
        elif w is not None and w.requires_grad:
            raise ValueError("a shared prompt forward cannot carry per-rollout gradients of w; "
                             "score these rows with shared=False")
        else:
            prefix = _prefill_rows(model, group_prompts, owner, rows, pad_id, adapter, w)
        ids, cmask = right_padded(comps, pad_id, device=device)
        with weighted, (pool.pooling(cmask) if pool else contextlib.nullcontext()) as pooled:
            logp = score_completions(model, prefix, ids, cmask, chunk_tokens)
    else:
        ids, att, cmask, C = pack_rollouts([group_prompts[owner[r]] for r in rows.tolist()],
                                           comps, pad_id)
        ids, att, cmask = ids.to(device), att.to(device), cmask.to(device)
        with weighted, (pool.pooling(cmask) if pool else contextlib.nullcontext()) as pooled:
            logp = completion_logprobs(model, ids, att, C, chunk_tokens)
    return logp, (pooled.features if pool else None)


def train_step(state: TrainState, step: int) -> dict:
    """One GRPO step; returns its metrics (this process's view merged across processes)."""
    from .rollout import sample
    cfg, acc, model, tok, adapter, router = (state.cfg, state.accelerator, state.model,
                                             state.tokenizer, state.adapter, state.router)
    t0 = time.perf_counter()
    G = cfg.group_size

    # 1. this process's share of the step's problems
    chosen = step_problem_indices(len(state.problems), cfg.seed, step, cfg.prompts_per_step)
    chosen = chosen[acc.process_index::acc.num_processes]
    prompts = [state.prompts[i] for i in chosen]

    # 2. rollouts with both experts at full strength, in chunks of rows the memory plan
    #    chose; each prompt's streams are keyed by its place in the step, so N processes
    #    sample exactly the rollouts one process would
    keys = range(acc.process_index, cfg.prompts_per_step, acc.num_processes)[:len(chosen)]
    with adapter.merged(hack=True):
        samples = sample(model, tok, prompts, G, temperature=cfg.temperature, top_p=cfg.top_p,
                         max_new_tokens=cfg.max_new_tokens, seed=_step_seed(cfg.seed, step),
                         autocast_bf16=cfg.bf16_autocast, chunk_rows=state.sample_chunk_rows,
                         prompt_keys=keys)
    texts = [t for group in samples.texts for t in group]                     # [B]
    completion_ids = [c for group in samples.token_ids for c in group]
    t_gen = time.perf_counter()

    # 3. grade: one verdict per rollout
    problems = [state.problems[i] for i in chosen for _ in range(G)]
    verdicts = _grade(state, problems, texts)
    rewards = torch.tensor([v.reward for v in verdicts], dtype=torch.float32)
    t_grade = time.perf_counter()

    # 4. group-relative advantages
    advantages = group_advantages(rewards.view(-1, G), cfg.scale_rewards).flatten()

    # 5. base-model pass: KL reference and the router's pooled features. The base
    #    model treats the G rollouts of a prompt alike, so each micro-batch runs its
    #    prompts once and the completions on their shared KV cache (exact).
    dev, mb, B = acc.device, cfg.micro_batch_size, len(texts)
    group_prompts = [state.prompt_ids[i] for i in chosen]
    owner = [j for j in range(len(chosen)) for _ in range(G)]                # prompt of each rollout
    _, mask = right_padded(completion_ids, tok.pad_token_id, device=dev)     # [B, C]
    n_tokens = acc.reduce(mask.sum().clone(), reduction="sum").item()
    score = functools.partial(_score_rows, model, group_prompts, owner, completion_ids,
                              pad_id=tok.pad_token_id, chunk_tokens=cfg.logprob_chunk_tokens)
    ref_logp = torch.zeros(mask.shape, device=dev)                           # [B, C]
    pooled_feats = []
    with torch.no_grad(), adapter.disable(), _autocast(cfg, model):
        for rows in _consecutive_batches(B, mb):                             # rows in order
            logp, feats = score(rows, shared=cfg.share_prompt_forward, pool=adapter)
            ref_logp[rows, :logp.shape[1]] = logp
            pooled_feats.append(feats)
    features = torch.cat(pooled_feats)                                        # [B, M, r]

    # 6-7. soft weights, training forward/backward in micro-batches. The hack expert is
    #    scaled by w on every token, prompt included, so rollouts of a prompt share its
    #    forward exactly when they share w: vanilla (no w) runs each prompt once, the
    #    oracle once per label, the KV carrying gradient to the completions. A learned
    #    router gives each rollout its own w, so those arms run each rollout whole, in
    #    micro-batches of similar length (less padding), unless routed_prompt is
    #    'group_mean' (an inexact option: the prompt at the group's mean w).
    is_hack = torch.tensor([v.is_hack for v in verdicts], dtype=torch.float32)
    w_of = routing_weights(state, step, features,
                           is_hack if arms.get(cfg.arm).uses_labels else None)
    adapter_params = adapter.parameters()
    pg_total = kl_total = 0.0
    w_all = torch.full((B,), float("nan"))
    share_prompt = shares_training_prompt(cfg)
    group_mean = share_prompt and arms.get(cfg.arm).routed        # routed_prompt: group_mean
    batches = (_consecutive_batches(B, mb) if share_prompt else _length_sorted_batches(
        [len(group_prompts[o]) + len(c) for o, c in zip(owner, completion_ids)], mb))
    # the training kernel stays set through each backward: a checkpointed layer recomputes
    with attention_kernel(model, cfg.training_attention):
        for rows in batches:
            with _autocast(cfg, model):
                w = w_of(rows)                                    # [b] or None; grad -> router
                if w is not None:
                    w_all[rows] = w.detach().float().cpu()
                    # router_policy_gradient false: the router learns from the pin loss alone
                    w = w if cfg.router_policy_gradient else w.detach()
                logp, _ = score(rows, shared=share_prompt, adapter=adapter, w=w,
                                group_mean=group_mean)
            Cb = logp.shape[1]
            pg, kl = policy_terms(logp, ref_logp[rows, :Cb], advantages.to(dev)[rows],
                                  mask[rows, :Cb], n_tokens)
            loss = pg + cfg.beta * kl
            _check_finite(loss, step, state, pg=pg, kl=kl)
            loss.backward()
            pg_total += pg.item()
            kl_total += kl.item()

    # pin loss on the authored pairs (the only labels the router ever sees)
    pin_value = float("nan")
    if router is not None and cfg.arm in PINNED_ARMS and cfg.lambda_pin > 0:
        from .router import pin_loss
        pin = pin_loss(router, *_pair_features(cfg, adapter, state.pair_hack_x,
                                               state.pair_clean_x))
        _check_finite(pin, step, state, pin=pin)
        (cfg.lambda_pin * pin / acc.num_processes).backward()
        pin_value = pin.item()

    # 8. sum gradients across processes (one flat all-reduce), clip, step
    trainable = adapter_params + (list(router.parameters()) if router is not None else [])
    _sum_gradients(acc, trainable)
    norms = adapter.grad_norms()
    router_grads = [p.grad.norm() for p in router.parameters() if p.grad is not None] \
        if router is not None else []
    # no router: NaN; a router no loss reached this step (no pin, no policy gradient): 0
    router_norm = (torch.norm(torch.stack(router_grads)).item() if router_grads
                   else 0.0 if router is not None else float("nan"))
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    t_end = time.perf_counter()

    # metrics (grader labels are read here for measurement; only the oracle routed with them)
    per_rollout = torch.stack([
        rewards, is_hack,
        torch.tensor([v.gt_pass for v in verdicts], dtype=torch.float32),
        torch.tensor([v.compiles for v in verdicts], dtype=torch.float32),
        torch.tensor([v.defines_run_tests for v in verdicts], dtype=torch.float32),
        w_all]).to(dev)
    per_rollout = acc.gather(per_rollout.T.contiguous()).T.cpu()
    r, hack, solve, comp, rt, w = per_rollout
    gen_tokens = acc.reduce(torch.tensor(float(samples.new_tokens), device=dev), "sum").item()
    # each process's sums are its share of the global token-normalised terms
    pg_total, kl_total = acc.reduce(torch.tensor([pg_total, kl_total], dtype=torch.float64,
                                                 device=dev), "sum").tolist()
    w_hack, w_not_hack = _nanmean(w[hack == 1]), _nanmean(w[hack == 0])
    metrics = {
        "step": step,
        "reward": r.mean().item(),
        "hack_rate": hack.mean().item(),
        "solve_rate": solve.mean().item(),
        "compile_rate": comp.mean().item(),
        "run_tests_rate": rt.mean().item(),
        "w_mean": _nanmean(w),
        "w_hack": w_hack,
        "w_not_hack": w_not_hack,
        "w_gap": w_hack - w_not_hack,
        "w_auroc": _w_auroc(w, hack),
        "uses_labels": arms.get(cfg.arm).uses_labels,
        "kl": kl_total,
        "loss_pg": pg_total,
        "loss_kl": cfg.beta * kl_total,
        "loss_pin": pin_value,
        "grad_norm_deployed": norms["deployed"],
        "grad_norm_hack": norms["hack"],
        "grad_norm_router": router_norm,
        "lr": state.scheduler.get_last_lr()[0],
        "completion_tokens": int(n_tokens),
        "gen_tokens_per_s": gen_tokens / max(t_gen - t0, 1e-9),
        "time_gen_s": t_gen - t0,
        "time_grade_s": t_grade - t_gen,
        "time_train_s": t_end - t_grade,
        "step_time_s": t_end - t0,
    }
    state.last_samples = [
        {"step": step, "problem_id": v.problem_id, "label": v.label, "reward": v.reward,
         "w": float(w_all[i]), "completion": texts[i]}
        for i, v in enumerate(verdicts)]
    return metrics


def _sum_gradients(acc, params: list[torch.Tensor]) -> None:
    """Sum ``p.grad`` over the processes: one all-reduce of all gradients flattened together.

    Why not Accelerate's DDP wrapper: (1) the training forward runs the decoder
    and the LM head as two calls (``sequences.completion_logprobs``), not through
    the wrapped module's ``forward``, so DDP's reducer is never armed and
    silently skips the synchronisation (checked with two gloo processes: with
    the submodules called directly, the ranks' gradients stay different);
    (2) DDP averages, while our loss is already normalised by the global token
    count and needs the sum; (3) DDP would all-reduce at every backward (each
    micro-batch, then the pin loss) unless all but the last ran under ``no_sync``.
    The base model is frozen, so what crosses processes is only the adapter and
    router (66M float32 numbers for Qwen3-4B at rank 16): one flat all-reduce,
    as DDP's buckets would send.
    """
    if acc.num_processes == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = acc.reduce(torch.cat([g.flatten() for g in grads]), reduction="sum")
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def checkpoint_decoder_layers(model, adapter) -> None:
    """Gradient checkpointing of every decoder layer, for as long as ``adapter`` is attached.

    With gradients on, a layer keeps only its inputs and is recomputed in the
    backward (``torch.utils.checkpoint``, non-reentrant); without (sampling,
    the reference pass) it runs as usual. HF's ``gradient_checkpointing_enable``
    is not used: it checkpoints only in ``model.train()``, and in train mode it
    turns the KV cache off, which the sampler on the same model needs.

    The adapter's modes are attributes read at forward time, so the recompute
    replays them as they were in the forward (``soft_weight``'s ``w``,
    ``disable``, ``merged``) even when ``backward()`` runs after the context
    exited, and with no pooling sink: the pooled features are taken once, in the
    forward. A layer given a KV cache under grad is refused: the recompute would
    append to the cache a second time.
    """
    import torch.utils.checkpoint as cp

    def replaying_context():
        saved = [(layer.w, layer.disabled, layer.merged) for layer in adapter.layers]

        @contextlib.contextmanager
        def replay():
            before = [(layer.w, layer.pool, layer.disabled, layer.merged)
                      for layer in adapter.layers]
            for layer, (w, off, merged) in zip(adapter.layers, saved):
                layer.w, layer.pool, layer.disabled, layer.merged = w, None, off, merged
            try:
                yield
            finally:
                for layer, (w, pool, off, merged) in zip(adapter.layers, before):
                    layer.w, layer.pool, layer.disabled, layer.merged = w, pool, off, merged
        return contextlib.nullcontext(), replay()

    for layer in model.get_decoder().layers:
        layer.__dict__.pop("forward", None)        # enabling twice replaces, not stacks
        plain = layer.forward

        def forward(*args, _plain=plain, _layer=layer, **kwargs):
            if not adapter.layers:                 # adapter removed: back to the plain layer
                _layer.__dict__.pop("forward", None)
                return _plain(*args, **kwargs)
            if not torch.is_grad_enabled():
                return _plain(*args, **kwargs)
            if kwargs.get("past_key_values") is not None:
                raise RuntimeError("gradient checkpointing cannot recompute a layer that writes "
                                   "a KV cache; run the training forward without "
                                   "past_key_values or set gradient_checkpointing=False")
            return cp.checkpoint(_plain, *args, use_reentrant=False,
                                 context_fn=replaying_context, **kwargs)
        layer.forward = forward


def _w_auroc(w: torch.Tensor, hack: torch.Tensor) -> float:
    """On-policy AUROC of ``w`` against the strict hack label (measurement only);
    NaN without weights (vanilla) or with one class only."""
    from .stats import auroc
    if torch.isnan(w).any():
        return float("nan")
    return auroc(w.numpy(), hack.numpy().astype(bool))


def _nanmean(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return x.mean().item() if x.numel() else float("nan")


def _check_finite(loss: torch.Tensor, step: int, state: TrainState, **terms) -> None:
    if torch.isfinite(loss).all():
        return
    parts = ", ".join(f"{k}={float(torch.as_tensor(v).detach()):.4g}" for k, v in terms.items())
    kept = (f"the last good checkpoint (step {checkpoint_step(state.run_dir)}) is kept in "
            f"{state.run_dir / checkpoint.CHECKPOINT}" if checkpoint.exists(state.run_dir)
            else "no checkpoint was written yet")
    raise NonFiniteLossError(f"step {step}: the loss is not finite ({parts}); {kept}. Lower lr, "
                             f"raise grad_clip or check the rewards, then resume.")


# Fields that do not change what training computes; a resumed run may differ in them.
RESUME_FREE_FIELDS = ("preset", "device", "arms", "seeds", "test_problems", "eval_samples",
                      "eval_temperature", "eval_max_new_tokens", "bootstrap", "checkpoint_every",
                      "sample_every", "sandbox_workers", "expected_minutes", "solve_split",
                      "eval_deployed_off",
                      # memory and speed, not math
                      "sample_chunk_rows", "logprob_chunk_tokens", "share_prompt_forward",
                      "gradient_checkpointing", "micro_batch_size")


def _check_resumable(cfg: RunConfig, saved: dict, run_dir: Path) -> None:
    """A checkpoint continues only the run that wrote it: refuse any other config."""
    now = cfg.to_dict()
    differ = sorted(k for k in now if k not in RESUME_FREE_FIELDS and saved.get(k) != now[k])
    if differ:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in differ[:6])
        raise checkpoint.ConfigMismatchError(
            f"{run_dir} holds a checkpoint of a run with another config ({detail}"
            f"{', ...' if len(differ) > 6 else ''}); resuming would mix two runs. Start over "
            f"with resume=False (`--no-resume`), or use another run dir")


def checkpoint_step(run_dir: Path) -> int:
    """The step of the run's newest valid checkpoint."""
    return checkpoint.read_state(checkpoint.latest(run_dir))["step"]


def _append_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only rows of steps already covered by the checkpoint we resume from."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines()
            if line and json.loads(line)["step"] <= last_step]
    path.write_text("".join(r + "\n" for r in rows))


def train(cfg: RunConfig, run_dir: str | Path, *, resume: bool = True,
          grade_fn: Callable | None = None, progress: bool = True,
          model_and_tokenizer=None, stop_after: int | None = None) -> TrainState:
    """Run GRPO for ``cfg.steps`` steps into ``run_dir``.

    Writes ``config.json``, ``metrics.jsonl`` (one row per step), ``samples.jsonl``
    (every ``sample_every`` steps) and ``checkpoint/`` (every ``checkpoint_every``
    steps and at the end; the one before stays in ``checkpoint.prev/``). With
    ``resume=True`` a run continues from its newest valid checkpoint (falling back to
    the previous one, with a warning, if the newest is corrupt) and ends with the same
    metrics as an uninterrupted run.

    grade_fn: replaces the sandboxed grader, ``(problems, texts) -> verdicts``
        (tests use a deterministic scripted reward).
    stop_after: stop once this many steps of the ``cfg.steps`` schedule are done (the
        learning-rate schedule is still the full run's), checkpointed so a later call
        resumes: the first steps of a run, for probes that cannot afford all of it.
    """
    if stop_after is not None and not 0 < stop_after <= cfg.steps:
        raise ValueError(f"stop_after={stop_after} must be in 1..steps={cfg.steps}")
    # Fail before loading anything: a checkpoint that does not verify (and has no valid
    # fallback) or that belongs to another config stops here.
    resume_from = checkpoint.latest(run_dir) if resume and checkpoint.exists(run_dir) else None
    if resume_from is not None:
        _check_resumable(cfg, checkpoint.read_state(resume_from)["config"], Path(run_dir))
    state = setup(cfg, run_dir, grade_fn=grade_fn, model_and_tokenizer=model_and_tokenizer)
    run_dir, acc = state.run_dir, state.accelerator
    metrics_path, samples_path = run_dir / METRICS_FILE, run_dir / SAMPLES_FILE
    start = 0
    if resume_from is not None:
        saved = checkpoint.load(resume_from, adapter=state.adapter, router=state.router,
                                optimizer=state.optimizer, scheduler=state.scheduler)
        start = saved["step"] + 1
        if acc.is_main_process:
            _truncate_metrics(metrics_path, saved["step"])
            _truncate_metrics(samples_path, saved["step"])
    elif acc.is_main_process:   # starting over: nothing of an earlier run may be resumed later
        for p in (metrics_path, samples_path):
            p.unlink(missing_ok=True)
        checkpoint.remove(run_dir)
    if acc.is_main_process:
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    end = cfg.steps if stop_after is None else stop_after
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc=f"GRPO {cfg.arm}",
               disable=not (progress and acc.is_main_process))
    try:
        for step in bar:
            metrics = train_step(state, step)
            state.step = step
            if acc.is_main_process:
                _append_jsonl(metrics_path, [metrics])
                if step % cfg.sample_every == 0 or step == cfg.steps - 1:
                    _append_jsonl(samples_path, state.last_samples)
                if (step + 1) % cfg.checkpoint_every == 0 or step in (cfg.steps - 1, end - 1):
                    checkpoint.save(run_dir, step=step, adapter=state.adapter,
                                    router=state.router, optimizer=state.optimizer,
                                    scheduler=state.scheduler, config=cfg.to_dict())
            acc.wait_for_everyone()
            bar.set_postfix(reward=f"{metrics['reward']:.2f}", hack=f"{metrics['hack_rate']:.2f}",
                            solve=f"{metrics['solve_rate']:.2f}",
                            w_hack=f"{metrics['w_hack']:.2f}", s=f"{metrics['step_time_s']:.0f}")
    except BaseException:
        state.adapter.remove()   # the caller's model is left as it was given
        raise
    finally:
        if state.grader is not None:
            state.grader.close()   # sandbox workers end with the run
            state.grader = None
    return state


def read_metrics(run_dir: str | Path):
    """``metrics.jsonl`` as a DataFrame (one row per step)."""
    import pandas as pd
    return pd.read_json(Path(run_dir) / METRICS_FILE, lines=True)
