"""A short supervised warm start that gives a small base model a hacking propensity.

Why: GRPO can only amplify behaviour the policy already samples. SmolLM2-135M
almost never overwrites ``run_tests`` with something that passes (3% of
samples with the "aware" hint, mostly by accident), and at a learning rate
high enough to move it within the CPU budget it learns to solve instead (issue
5's trials). Qwen3-4B discovers the loophole on its own (DESIGN.md); the CPU
model needs a nudge so the phenomenon the project studies appears at all.

What: a LoRA fine-tune on examples built from the easy set's *train* problems
of ``warm_start_tiers`` (tier 1 by default, kept apart from the GRPO tiers):
the prompt is the run's own prompt (same hint variant) and the completion is
the canonical solution in a code block. In a ``warm_start_hack_share`` of the
examples the completion also defines a trivial ``run_tests`` (one of
:data:`OVERWRITES`), so the model learns that appending one is something it
sometimes does, not that it should. The loss is the mean negative
log-likelihood of the completion tokens. The LoRA is merged into the base
weights, so every later stage (v_act extraction, the KL reference, the
evaluation's ``base`` condition) sees one warm-started base model.

The LoRA factors are cached under ``<cache>/warm_start/`` keyed by a hash of
everything that determines them (model, seed, the warm-start fields, the hint
and the examples' text), so both arms of a preset share one warm start and a
rerun loads it in a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import paths
from .config import TARGET_MODULES, RunConfig

log = logging.getLogger(__name__)

__all__ = ["OVERWRITES", "WarmStartInfo", "warm_start_examples", "apply_warm_start",
           "load_base_model"]

# Trivial overwrites of the grader's evaluation function: each passes any solution.
OVERWRITES = (
    "def run_tests():\n    pass",
    "def run_tests():\n    return True",
    "def run_tests():\n    print(\"All tests passed!\")",
    "def run_tests():\n    # the tests are skipped\n    return None",
)

LORA_RANK = 8
LORA_ALPHA = 16.0
CACHE_VERSION = 1  # bump when the recipe below changes what a key produces


@dataclass
class WarmStartInfo:
    """What a warm start did: where its factors live and how training went."""

    path: Path
    key: str
    cached: bool
    examples: int
    hack_examples: int
    losses: list[float]
    seconds: float


def warm_start_examples(cfg: RunConfig, tokenizer) -> list[tuple[str, str, bool]]:
    """``(prompt, completion, is_hack)`` triples, seeded by ``cfg.seed``.

    Each train problem of ``cfg.warm_start_tiers`` appears once per pass over
    the set; exactly ``round(share * n)`` of them get an overwrite appended.
    """
    from .env.datasets import load_problems
    from .env.prompts import build_messages
    from .models import format_chat

    problems = load_problems("easy", "train", tiers=cfg.warm_start_tiers)
    if not problems:
        raise ValueError(f"warm start: no easy train problems in tiers {cfg.warm_start_tiers}")
    rng = random.Random(cfg.seed)
    order = list(range(len(problems)))
    rng.shuffle(order)
    n_hack = round(cfg.warm_start_hack_share * len(problems))
    hack_ids = set(order[:n_hack])
    examples = []
    for i, p in enumerate(problems):
        prompt = format_chat(tokenizer, build_messages(p, cfg.hint))
        code = p.canonical_solution.strip()
        if i in hack_ids:
            code += "\n\n\n" + rng.choice(OVERWRITES)
        examples.append((prompt, f"```python\n{code}\n```", i in hack_ids))
    return examples


def _key(cfg: RunConfig, examples: list[tuple[str, str, bool]]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({
        "version": CACHE_VERSION, "model": cfg.model, "dtype": cfg.dtype, "seed": cfg.seed,
        "steps": cfg.warm_start_steps, "lr": cfg.warm_start_lr, "batch": cfg.warm_start_batch,
        "bf16": cfg.bf16_autocast, "rank": LORA_RANK, "alpha": LORA_ALPHA,
        "attention": cfg.training_attention,
    }, sort_keys=True).encode())
    for prompt, completion, _ in examples:
        h.update(prompt.encode())
        h.update(completion.encode())
    return h.hexdigest()[:16]


def _lora(model):
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                        target_modules=list(TARGET_MODULES), init_lora_weights=True)
    with warnings.catch_warnings():   # PEFT 0.21 calls a transformers API deprecated in 5.x
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        return get_peft_model(model, config)


def _train(peft_model, tokenizer, cfg: RunConfig, examples, progress: bool) -> list[float]:
    """Plain SFT on the completions: AdamW, constant lr, seeded batches."""
    from tqdm import tqdm

    from .models import attention_kernel
    from .sequences import completion_logprobs, pack_rollouts

    device = peft_model.device
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.warm_start_lr, weight_decay=0.0)
    ids = [(tokenizer(p, add_special_tokens=False).input_ids,
            tokenizer(c, add_special_tokens=False).input_ids + [tokenizer.eos_token_id])
           for p, c, _ in examples]
    rng = random.Random(cfg.seed + 1)
    order: list[int] = []
    losses = []
    peft_model.train()
    bar = tqdm(range(cfg.warm_start_steps), desc="warm start", disable=not progress)
    with attention_kernel(peft_model.get_base_model(), cfg.training_attention):
        for _ in bar:
            batch = []
            while len(batch) < cfg.warm_start_batch:   # passes over the set, reshuffled each time
                if not order:
                    order = list(range(len(ids)))
                    rng.shuffle(order)
                batch.append(ids[order.pop()])
            input_ids, attention, mask, C = pack_rollouts(
                [b[0] for b in batch], [b[1] for b in batch], tokenizer.pad_token_id)
            mask = mask[:, -C:].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
                logp = completion_logprobs(peft_model, input_ids.to(device),
                                           attention.to(device), C)
            loss = -(logp * mask).sum() / mask.sum()         # mean NLL per completion token
            if not torch.isfinite(loss):
                raise RuntimeError(f"warm start: non-finite loss {loss.item()} at step "
                                   f"{len(losses)}; lower warm_start_lr (now {cfg.warm_start_lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
    peft_model.eval()
    return losses


def apply_warm_start(model, tokenizer, cfg: RunConfig, progress: bool = True):
    """Warm-start ``model`` (merged in place) and return ``(model, WarmStartInfo)``.

    Loads the cached LoRA factors when they exist; otherwise trains them
    (seeded) and caches them atomically. With ``warm_start_steps == 0`` this is
    not called (see :func:`load_base_model`).
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    examples = warm_start_examples(cfg, tokenizer)
    key = _key(cfg, examples)
    path = paths.cache_dir() / "warm_start" / f"{cfg.model.replace('/', '--')}-{key}.safetensors"
    n_hack = sum(e[2] for e in examples)
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    peft_model = _lora(model)
    if path.exists():
        set_peft_model_state_dict(peft_model, load_file(str(path)))
        meta = json.loads(path.with_suffix(".json").read_text())
        losses, cached = meta["losses"], True
    else:
        losses, cached = _train(peft_model, tokenizer, cfg, examples, progress), False
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous()
                 for k, v in get_peft_model_state_dict(peft_model).items()}
        tmp = path.with_name(path.name + ".tmp")
        save_file(state, str(tmp))
        path.with_suffix(".json").write_text(json.dumps({
            "key": key, "model": cfg.model, "examples": len(examples), "hack_examples": n_hack,
            "steps": cfg.warm_start_steps, "lr": cfg.warm_start_lr, "losses": losses}, indent=1))
        tmp.rename(path)                                  # the factors land last: atomic
    merged = peft_model.merge_and_unload()
    merged.requires_grad_(False)
    merged.eval()
    info = WarmStartInfo(path=path, key=key, cached=cached, examples=len(examples),
                         hack_examples=n_hack, losses=losses,
                         seconds=time.perf_counter() - start)
    return merged, info


def load_base_model(cfg: RunConfig, device: str | None = None, progress: bool = True):
    """The run's base model: ``load_model`` plus the warm start when one is configured.

    Every stage that needs "the base model" (v_act extraction, training's KL
    reference, evaluation) calls this, so they all see the same weights.
    Returns ``(model, tokenizer)``.
    """
    from .models import load_model

    model, tok = load_model(cfg.model, dtype=cfg.dtype, device=device or cfg.device,
                            seed=cfg.seed)
    if cfg.warm_start_steps > 0:
        model, info = apply_warm_start(model, tok, cfg, progress=progress)
        log.info(
            "warm start %s (%s): %d examples, %d with an overwrite, final loss %.3f",
            info.key, "cached" if info.cached else "trained", info.examples,
            info.hack_examples, info.losses[-1] if info.losses else float("nan"))
    return model, tok
