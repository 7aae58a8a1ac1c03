"""GRPO step benchmark: our loop (``evil_moe`` and ``vanilla`` arms) against TRL's
``GRPOTrainer`` with a plain PEFT LoRA, plus the machine's matmul peak, in one run.

Run (from the repository root, venv active, TRL installed: ``pip install -e '.[bench]'``)::

    python benchmarks/grpo_step.py                      # cpu-demo preset (bf16 autocast), 3 steps
    python benchmarks/grpo_step.py --fp32 --json out.json   # both in fp32
    python benchmarks/grpo_step.py --preset smoke --steps 1      # a quick check (tiny-random)

It prints numbers only (no assertions). Goals of issue 5 item 8: ours/TRL step
time <= 0.8, evil_moe/vanilla <= 1.15, achieved model FLOP/s >= 40% of peak.

What is measured
----------------
1. **Peak.** Repeated ``n x n`` matmuls (default n=2048) in float32 and
   bfloat16 after a warm-up, best of a few timed trials; GFLOP/s = 2 n^3 / t.
   Same process, same thread count (``torch.get_num_threads()``) as the runs;
   measured before and after the runs, the best of both is the peak.
2. **Ours.** ``grpo.setup`` + ``grpo.train_step`` of the ``evil_moe`` arm (after
   ``grpo.extract_v_act_for_run`` into a temp dir) and of the ``vanilla`` arm.
   Step 0 is a warm-up; the next ``--steps`` steps are measured. Times come
   from the metrics dict (``time_gen_s``, ``time_grade_s``, ``time_train_s``,
   ``step_time_s``). Per-row prompt and completion lengths, needed for the
   FLOP count, are recorded by wrapping ``evil_moe.rollout.sample`` (a pass-through).
3. **TRL.** ``trl.GRPOTrainer`` on the same model (``warm_start.load_base_model``) with
   ``peft.LoraConfig(r=2r, lora_alpha=2*alpha, same target modules)`` (the same
   total rank and the same per-weight scale ``alpha/r`` as our adapter), the
   same chat messages (``env.prompts.build_messages``) of the same training
   problems, the same reward (our sandboxed grader), G, P, max completion
   length, temperature, top_p, beta, learning rate, weight decay, grad clip,
   micro-batch size and precision. One optimizer step consumes exactly P
   prompts x G completions (see ``trl_config``). A ``TrainerCallback`` times
   ``on_step_begin`` -> ``on_step_end``; a thin subclass times
   ``_generate_single_turn`` (generation) and the reward function times the
   grader, so TRL's step splits the same way as ours (train = the rest: the
   reference pass, the training forward/backward, the optimizer).

Model FLOPs (counted from the step's actual token counts, not from padding)
---------------------------------------------------------------------------
Notation: ``N`` = weights of every ``nn.Linear`` inside the decoder layers
(q, k, v, o, gate, up, down; embeddings, norms and the LM head excluded);
``H = d_model * vocab`` the LM-head matmul; ``n_l`` layers; ``d_att = heads *
head_dim``; a row (rollout) has ``p`` prompt and ``c`` completion tokens;
``S(a, b) = sum_{t=a..b} t`` (a token at 1-based position t attends over t keys).
Per token and forward, a linear layer costs 2 FLOPs per weight; attention
costs ``4 n_l d_att t`` (QK^T and AV). Per row:

- generation: prefill ``p`` tokens + ``c - 1`` decode forwards (the last
  sampled token is never fed back): ``2N (p + c - 1) + 4 n_l d_att S(1, p+c-1)``
  plus the LM head once per sampled token, ``2H c``. The prefill is counted
  per row (both implementations prefill every one of the G copies of a prompt).
- reference pass (base model, no grad; in ours the router's pooling rides on
  it): ``2N (p + c) + 4 n_l d_att S(1, p+c) + 2H c``.
- training forward: the same as the reference pass.
- training backward w.r.t. activations only (the base is frozen):
  ``2N (p + c)`` for the linears, ``2 x`` the attention forward (both operands
  of QK^T and AV need gradients), ``2H c`` for the LM head on completion positions.
- LoRA adapter of total rank ``R = 2r`` (training forward and backward only; in
  generation ours runs merged weights and the reference pass is adapter-free):
  ``2 R (d_in + d_out)`` per target module and token for the forward and twice
  that for the backward (inputs and weights), over ``p + c`` tokens.
  Our frozen-copy subtraction (``B0 A0``) and the soft-weight slice are
  implementation overhead and are not counted.
- pin loss (``evil_moe`` arm only): no model forward per step. ``grpo.setup``
  pools the pairs' base-model inputs once; each step multiplies them by
  ``A[:r]`` (a few MFLOPs, not counted).

Check: on SmolLM2-135M the linear + LM-head part of this count equals
``torch.utils.flop_counter.FlopCounterMode`` exactly for a forward and for the
activation-only backward (that counter does not see CPU SDPA attention, so the
attention term is the textbook causal count above).

The count depends only on the token counts, so the same tokens cost the same
FLOPs in both implementations; padding, recomputation, entropy, sampling and the
grader are not model FLOPs. Achieved FLOP/s = model FLOPs of the step / step
time; the share of peak is reported against both the fp32 and the bf16 peak.
Because TRL cannot stop at the closing code fence, it usually generates more
tokens per step than ours: its FLOP count (and FLOP/s) includes those tokens,
while its step time is the price of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

# The FLOP model (section 4 of the docstring) lives in the library: the memory plan's
# time estimate counts with the same function.
from evil_moe.memory_plan import ModelShape, executed_step_flops, step_flops

GOAL_OURS_OVER_TRL = 0.25          # issue 13: half the cost of the 0.456 / 0.429 before
GOAL_EVIL_OVER_VANILLA = None      # reported only: prompt sharing may make vanilla much faster
GOAL_TRAIN_SHARE_OF_BF16_PEAK = 0.25


# ---- 1. matmul peak ---------------------------------------------------------------------------

def matmul_peak(dtype: torch.dtype, n: int = 2048, trials: int = 3,
                min_seconds: float = 1.0) -> dict:
    """Best-of-``trials`` GFLOP/s of ``n x n @ n x n`` matmuls in ``dtype`` after a warm-up."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    for _ in range(3):                                                    # warm-up
        torch.matmul(a, b, out=out)
    flops = 2.0 * n ** 3
    t0 = time.perf_counter()
    torch.matmul(a, b, out=out)
    per = max(time.perf_counter() - t0, 1e-6)
    reps = max(2, math.ceil(min_seconds / per))
    rates = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=out)
        rates.append(flops * reps / (time.perf_counter() - t0) / 1e9)
    return {"dtype": str(dtype).replace("torch.", ""), "n": n, "reps": reps,
            "gflops_best": max(rates), "gflops_trials": rates}


# ---- common setup ----------------------------------------------------------------------------

def load_config(args, arm: str = "evil_moe"):
    from evil_moe.config import load_preset
    over = {"arm": arm}
    if args.model:
        over["model"] = args.model
    over["bf16_autocast"] = bool(args.bf16)   # one precision for ours and TRL (see main)
    if args.allow_unisolated:
        over["allow_unisolated"] = True
    cfg = load_preset(args.preset, **over)
    # The scheduler's horizon must cover warm-up + measured steps (timing does not depend on it).
    return cfg.replace(steps=max(cfg.steps, args.steps + 1))


def _reset_accelerate_state() -> None:
    """Each phase builds its own Accelerator; clear the singleton so mixed precision can differ."""
    try:
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(reset_partial_state=True)
    except Exception:  # noqa: BLE001 - best effort; older/newer accelerate
        pass


@contextlib.contextmanager
def _record_rollouts(tokenizer, sink: list):
    """Wrap ``evil_moe.rollout.sample`` (a pass-through) to record
    ``(prompt_len, completion_len)`` per rollout."""
    from evil_moe import rollout
    original = rollout.sample

    def recording(model, tok, prompts, n, **kw):
        out = original(model, tok, prompts, n, **kw)
        plens = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
        for plen, group in zip(plens, out.token_ids):
            sink.extend((plen, len(ids)) for ids in group)
        return out

    from evil_moe import grpo
    patched = [m for m in (rollout, grpo) if getattr(m, "sample", None) is original]
    for m in patched:          # grpo imports `sample` inside train_step today; cover both
        m.sample = recording
    try:
        yield
    finally:
        for m in patched:
            m.sample = original


# ---- 2. our loop -----------------------------------------------------------------------------

def bench_ours(args, arm: str, shape: ModelShape, workdir: Path) -> dict:
    from evil_moe import grpo
    _reset_accelerate_state()
    cfg = load_config(args, arm)
    run_dir = workdir / arm
    t0 = time.perf_counter()
    if arm in grpo.ROUTED_ARMS:
        grpo.extract_v_act_for_run(cfg, run_dir)
    state = grpo.setup(cfg, run_dir)
    setup_s = time.perf_counter() - t0
    steps = []
    try:
        for step in range(args.steps + 1):
            rows: list[tuple[int, int]] = []
            with _record_rollouts(state.tokenizer, rows):
                m = grpo.train_step(state, step)
            if len(rows) != min(cfg.prompts_per_step, len(state.problems)) * cfg.group_size:
                raise RuntimeError(f"recorded {len(rows)} rollouts, expected P*G; grpo.train_step "
                                   "no longer samples through evil_moe.rollout.sample, so the "
                                   "FLOP count cannot see its token counts")
            fl = step_flops(shape, rows, 2 * cfg.rank)
            executed = executed_step_flops(
                shape, rows, 2 * cfg.rank, cfg.group_size, shared_ref=cfg.share_prompt_forward,
                shared_train=grpo.shares_training_prompt(cfg))
            rec = {"step": step, "warmup": step == 0, "flops_executed": executed,
                   "step_s": m["step_time_s"], "gen_s": m["time_gen_s"],
                   "grade_s": m["time_grade_s"], "train_s": m["time_train_s"],
                   "completions": len(rows), "completion_tokens": m["completion_tokens"],
                   "completion_tokens_counted": sum(c for _, c in rows),
                   "prompt_tokens": sum(p for p, _ in rows),
                   "gen_tokens_per_s": m["gen_tokens_per_s"], "flops": fl,
                   "reward": m["reward"], "hack_rate": m["hack_rate"]}
            steps.append(rec)
            _progress(f"  ours/{arm} step {step}{' (warm-up)' if step == 0 else ''}: "
                      f"{rec['step_s']:.2f} s (gen {rec['gen_s']:.2f}, grade {rec['grade_s']:.2f}, "
                      f"train {rec['train_s']:.2f}), {rec['completion_tokens']} completion tokens")
    finally:
        state.adapter.remove()
        if state.grader is not None:                  # the loop's own grader, created lazily
            state.grader.close()
    return {"name": f"ours:{arm}", "arm": arm, "setup_s": setup_s, "steps": steps,
            "micro_batch_size": cfg.micro_batch_size}


# ---- 3. TRL ----------------------------------------------------------------------------------

def trl_config(cfg, args, output_dir: str, n_steps: int):
    """A GRPOConfig under which one optimizer step consumes exactly P prompts x G completions.

    TRL 1.16 batch semantics (trl/trainer/grpo_config.py, __post_init__):
    ``per_device_train_batch_size`` counts completions, not prompts; with
    ``steps_per_generation`` = ``gradient_accumulation_steps`` the
    ``generation_batch_size`` is ``per_device_train_batch_size * GA`` (one
    process) = P * G, i.e. one generation of P unique prompts x G samples per
    optimizer step, trained in GA micro-batches of our micro_batch_size. With
    ``num_iterations=1`` and GA a multiple of ``steps_per_generation`` TRL skips
    the old-logprob pass (on-policy, like ours).
    """
    from trl import GRPOConfig
    P, G = cfg.prompts_per_step, cfg.group_size
    B = P * G
    mb = max(d for d in range(1, min(cfg.micro_batch_size, B) + 1) if B % d == 0)
    ga = B // mb
    from evil_moe.models import resolve_device
    on_cpu = resolve_device(cfg.device).type == "cpu"
    return GRPOConfig(
        output_dir=output_dir,
        use_cpu=on_cpu,
        bf16=bool(args.bf16), fp16=False,
        # batch geometry: one optimizer step == one generation batch == P prompts x G completions
        per_device_train_batch_size=mb,
        gradient_accumulation_steps=ga,
        steps_per_generation=ga,
        num_generations=G,
        num_iterations=1,
        max_steps=n_steps,
        # sampling
        max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=0,
        chat_template_kwargs={"enable_thinking": False},     # what models.format_chat passes
        # objective: token-level normalisation over the whole step (= ours), k3 KL to the base
        loss_type="dapo",
        beta=cfg.beta,
        scale_rewards="group" if cfg.scale_rewards else "none",
        # optimisation
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.grad_clip if cfg.grad_clip > 0 else 0.0,
        optim="adamw_torch",
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_steps,
        # no recomputation (ours does not checkpoint; TRL's default gradient_checkpointing is
        # True; transformers 5.23 names it activation_checkpointing and mirrors the old name)
        activation_checkpointing=False,
        disable_dropout=True,
        seed=cfg.seed,
        shuffle_dataset=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        save_strategy="no",
        report_to="none",
        logging_steps=10 ** 6,
        disable_tqdm=True,
        log_completions=False,
    )


def bench_trl(args, shape: ModelShape, workdir: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from evil_moe.env.datasets import load_for_config
    from evil_moe.env.grader import grader_from_config
    from evil_moe.env.prompts import build_messages
    from evil_moe.models import format_chat
    from evil_moe.warm_start import load_base_model

    _reset_accelerate_state()
    cfg = load_config(args, "vanilla")
    t_setup = time.perf_counter()
    problems = load_for_config(cfg, "train")
    grader = grader_from_config(cfg)
    model, tok = load_base_model(cfg)        # the run's base model (warm start included)
    messages = [build_messages(p, cfg.hint) for p in problems]
    dataset = Dataset.from_dict({"prompt": messages, "problem_index": list(range(len(problems)))})

    timing = {"gen_s": 0.0, "grade_s": 0.0, "rows": [], "prompt_ids": [], "problem_index": []}

    def reward(prompts, completions, problem_index, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        t0 = time.perf_counter()
        verdicts = grader.grade_batch([problems[i] for i in problem_index], texts, progress=False)
        timing["grade_s"] += time.perf_counter() - t0
        timing["problem_index"].extend(problem_index)
        timing.setdefault("step_problems", []).extend(problem_index)
        return [float(v.reward) for v in verdicts]

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with generation timed and token counts recorded (behaviour unchanged)."""

        def _generate_single_turn(self, prompt_ids, *a, **kw):
            # which dtype the matmuls actually run in during generation (autocast or not)
            probe = next(m for m in self.model.modules() if isinstance(m, nn.Linear))
            hook = probe.register_forward_hook(
                lambda m, i, o: timing.__setitem__("gen_dtype", str(o.dtype).replace("torch.", "")))
            autocast = torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16,
                                      enabled=bool(args.bf16 and args.trl_generate_autocast))
            t0 = time.perf_counter()
            try:
                with autocast:
                    completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *a, **kw)
            finally:
                hook.remove()
            timing["gen_dtype"] = timing.get("gen_dtype", "?")
            timing["gen_s"] += time.perf_counter() - t0
            timing["rows"].extend((len(p), len(c)) for p, c in zip(prompt_ids, completion_ids))
            timing["prompt_ids"].extend(list(p) for p in prompt_ids)
            return completion_ids, logprobs

    steps: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            timing.update(gen_s=0.0, grade_s=0.0, rows=[], step_problems=[])
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            dt = time.perf_counter() - self.t0
            rows = list(timing["rows"])
            fl = step_flops(shape, rows, 2 * cfg.rank)
            rec = {"step": len(steps), "warmup": not steps, "step_s": dt,
                   "gen_s": timing["gen_s"], "grade_s": timing["grade_s"],
                   "train_s": dt - timing["gen_s"] - timing["grade_s"],
                   "completions": len(rows),
                   "unique_prompts": len(set(timing.get("step_problems", []))),
                   "completion_tokens": sum(c for _, c in rows),
                   "prompt_tokens": sum(p for p, _ in rows),
                   "gen_tokens_per_s": sum(c for _, c in rows) / max(timing["gen_s"], 1e-9),
                   "flops": fl,
                   "hit_max_length": sum(c >= cfg.max_new_tokens for _, c in rows)}
            steps.append(rec)
            _progress(f"  trl step {rec['step']}{' (warm-up)' if rec['warmup'] else ''}: "
                      f"{dt:.2f} s (gen {rec['gen_s']:.2f}, grade {rec['grade_s']:.2f}, "
                      f"train {rec['train_s']:.2f}), {rec['completion_tokens']} completion tokens, "
                      f"{rec['hit_max_length']}/{len(rows)} at max length, "
                      f"{rec['unique_prompts']} unique prompts")

    targs = trl_config(cfg, args, str(workdir / "trl"), args.steps + 1)
    peft_cfg = LoraConfig(r=2 * cfg.rank, lora_alpha=2 * cfg.lora_alpha, lora_dropout=0.0,
                          target_modules=list(cfg.target_modules), bias="none",
                          task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = TimedGRPOTrainer(model=model, reward_funcs=reward, args=targs,
                                   train_dataset=dataset, processing_class=tok,
                                   peft_config=peft_cfg, callbacks=[StepTimer()])
    setup_s = time.perf_counter() - t_setup
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            trainer.train()       # the Trainer prints its final metrics dict: kept off stdout
    finally:
        grader.close()

    # Same prompts? Compare the token ids TRL generated from with our rendering of the same problem.
    ours_ids = {}
    same = checked = 0
    for ids, i in zip(timing["prompt_ids"], timing["problem_index"]):
        if i not in ours_ids:
            ours_ids[i] = tok(format_chat(tok, messages[i]), add_special_tokens=False).input_ids
        checked += 1
        same += ids == ours_ids[i]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    weight_dtype = str(next(trainer.model.get_base_model().parameters()).dtype)
    weight_dtype = weight_dtype.replace("torch.", "")
    return {"name": "trl", "setup_s": setup_s, "steps": steps,
            "activation_checkpointing": bool(
                targs.activation_checkpointing
                or getattr(trainer.model, "is_activation_checkpointing", False)),
            "prompt_token_ids_identical": f"{same}/{checked}",
            "per_device_train_batch_size": targs.per_device_train_batch_size,
            "gradient_accumulation_steps": targs.gradient_accumulation_steps,
            "steps_per_generation": targs.steps_per_generation,
            "generation_batch_size": targs.generation_batch_size,
            "trainable_params": trainable, "weight_dtype": weight_dtype,
            "mixed_precision": str(trainer.accelerator.mixed_precision),
            "generation_matmul_dtype": timing.get("gen_dtype", "?")}


# ---- 5. report -------------------------------------------------------------------------------

def summarize(run: dict, peak: dict) -> dict:
    meas = [s for s in run["steps"] if not s["warmup"]] or run["steps"]
    mean = lambda k: statistics.fmean(s[k] for s in meas)       # noqa: E731
    fl = {k: statistics.fmean(s["flops"][k] for s in meas) for k in meas[0]["flops"]}
    step_s = mean("step_s")
    out = {"steps_measured": len(meas), "step_s": step_s, "gen_s": mean("gen_s"),
           "grade_s": mean("grade_s"), "train_s": mean("train_s"),
           "completions": mean("completions"), "completion_tokens": mean("completion_tokens"),
           "prompt_tokens": mean("prompt_tokens"), "gen_tokens_per_s": mean("gen_tokens_per_s"),
           "gflop_per_step": fl["total"] / 1e9, "flops": fl}
    out["gflops"] = fl["total"] / step_s / 1e9
    out["gen_gflops"] = fl["gen_phase"] / max(out["gen_s"], 1e-9) / 1e9
    out["train_gflops"] = fl["train_phase"] / max(out["train_s"], 1e-9) / 1e9
    if "flops_executed" in meas[0]:          # ours: what the loop really computed (sharing)
        ex = {k: statistics.fmean(s["flops_executed"][k] for s in meas)
              for k in meas[0]["flops_executed"]}
        out["flops_executed"] = ex
        out["train_gflops_executed"] = ex["train_phase"] / max(out["train_s"], 1e-9) / 1e9
    out["s_per_1k_completion_tokens"] = step_s / max(out["completion_tokens"], 1) * 1000
    for k in ("float32", "bfloat16"):
        out[f"share_of_{k}_peak"] = out["gflops"] / peak[k]["gflops_best"]
    return out


def _machine() -> str:
    """CPU model, core count and the matmul ISA extensions that set the peak."""
    name, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return (f"{name}, {os.cpu_count()} CPUs, {', '.join(isa) or 'no avx512/amx'}, "
            f"torch {torch.__version__}")


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def print_report(res: dict) -> None:
    peak, summ = res["peak"], res["summary"]
    cfg = res["config"]
    print()
    print("=" * 100)
    print(f"GRPO step benchmark  preset={cfg['preset']} model={cfg['model']} "
          f"P={cfg['prompts_per_step']} G={cfg['group_size']} "
          f"max_new_tokens={cfg['max_new_tokens']} "
          f"precision={'bf16 autocast' if res['bf16'] else cfg['dtype']} "
          f"threads={res['threads']} steps={res['steps']} (+1 warm-up)")
    print(f"machine: {res['machine']}")
    f32, b16 = peak["float32"], peak["bfloat16"]
    print(f"matmul peak ({f32['n']}^3, best of start/end): fp32 {f32['gflops_best']:.1f} GFLOP/s "
          f"(start {f32['gflops_start']:.1f}, end {f32['gflops_end']:.1f}), bf16 "
          f"{b16['gflops_best']:.1f} GFLOP/s (start {b16['gflops_start']:.1f}, end "
          f"{b16['gflops_end']:.1f})")
    print(f"model: N(decoder linears)={res['shape']['n_linear'] / 1e6:.2f}M, "
          f"LM head={res['shape']['lm_head'] / 1e6:.2f}M, layers={res['shape']['n_layers']}, "
          f"d_att={res['shape']['d_att']}")
    print("-" * 100)
    hdr = (f"{'run':<16}{'step s':>8}{'gen s':>8}{'grade s':>8}{'train s':>8}{'compl':>7}"
           f"{'tokens':>8}{'gen tok/s':>10}{'GFLOP':>8}{'GFLOP/s':>9}{'%fp32':>7}{'%bf16':>7}"
           f"{'s/1k tok':>9}")
    print(hdr)
    for name, s in summ.items():
        print(f"{name:<16}{s['step_s']:>8.2f}{s['gen_s']:>8.2f}{s['grade_s']:>8.2f}"
              f"{s['train_s']:>8.2f}{s['completions']:>7.0f}{s['completion_tokens']:>8.0f}"
              f"{s['gen_tokens_per_s']:>10.1f}{s['gflop_per_step']:>8.1f}{s['gflops']:>9.1f}"
              f"{100 * s['share_of_float32_peak']:>6.1f}%{100 * s['share_of_bfloat16_peak']:>6.1f}%"
              f"{s['s_per_1k_completion_tokens']:>9.2f}")
    print("  phase GFLOP/s (model FLOPs of the phase / its time):")
    for name, s in summ.items():
        line = (f"    {name:<14} generation {s['gen_gflops']:.1f}, training (ref+pool+fwd+bwd) "
                f"{s['train_gflops']:.1f} ({100 * s['train_gflops'] / b16['gflops_best']:.1f}% "
                f"of bf16 peak)")
        if "train_gflops_executed" in s:
            line += (f"; executed FLOPs (a prompt shared by its group counted once) "
                     f"{s['train_gflops_executed']:.1f} "
                     f"({100 * s['train_gflops_executed'] / b16['gflops_best']:.1f}% of bf16 peak)")
        print(line)
    print("-" * 100)
    for key, (value, goal, op) in res["ratios"].items():
        if value is None:
            continue
        if goal is None:
            print(f"{key:<56} {value:>7.3f}   (reported)")
            continue
        ok = value <= goal if op == "<=" else value >= goal
        print(f"{key:<56} {value:>7.3f}   goal {op} {goal}   {'met' if ok else 'NOT met'}")
    print("-" * 100)
    print("notes:")
    for n in res["notes"]:
        print(f"  - {n}")
    print("=" * 100)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description="GRPO step benchmark: ours (evil_moe, vanilla) vs TRL GRPOTrainer + PEFT LoRA, "
                    "with the matmul peak and the share of it achieved. See the module docstring.")
    ap.add_argument("--preset", default="cpu-demo",
                    help="preset name or yml path (default cpu-demo)")
    ap.add_argument("--steps", type=int, default=3, help="measured steps per run, after 1 warm-up")
    ap.add_argument("--skip-trl", action="store_true", help="only our two arms")
    ap.add_argument("--skip-ours", action="store_true", help="only TRL (for debugging)")
    ap.add_argument("--bf16", action="store_true",
                    help="bf16 autocast in ours (bf16_autocast) and bf16=True in TRL "
                         "(default: the preset's bf16_autocast)")
    ap.add_argument("--fp32", action="store_true",
                    help="fp32 in both, whatever the preset says")
    ap.add_argument("--trl-generate-autocast", action="store_true",
                    help="with --bf16: also run TRL's generation under bf16 autocast (TRL 1.16 "
                         "unwraps the model for generate(), which drops Accelerate's autocast, so "
                         "by default it generates in fp32 while training in bf16)")
    ap.add_argument("--model", default=None, help="override the preset's model")
    ap.add_argument("--allow-unisolated", action="store_true",
                    help="pass allow_unisolated=True to the grader (machines without namespaces)")
    ap.add_argument("--peak-n", type=int, default=2048, help="matmul size of the peak measurement")
    ap.add_argument("--json", default=None, metavar="OUT", help="write every number to OUT")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    if args.bf16 and args.fp32:
        ap.error("--bf16 and --fp32 exclude each other")
    if not (args.bf16 or args.fp32):      # the preset decides, for ours and TRL alike
        from evil_moe.config import load_preset
        args.bf16 = load_preset(args.preset).bf16_autocast

    from evil_moe.models import load_model

    cfg = load_config(args)
    _progress(f"[1/4] matmul peak (n={args.peak_n}, {torch.get_num_threads()} threads)")
    peak = {"float32": matmul_peak(torch.float32, args.peak_n),
            "bfloat16": matmul_peak(torch.bfloat16, args.peak_n)}
    _progress(f"  fp32 {peak['float32']['gflops_best']:.1f} GFLOP/s, "
              f"bf16 {peak['bfloat16']['gflops_best']:.1f} GFLOP/s")

    model, _ = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, seed=cfg.seed)
    shape = ModelShape.of(model, cfg.target_modules)
    del model

    runs = {}
    with tempfile.TemporaryDirectory(prefix="grpo_bench_") as tmp:
        workdir = Path(tmp)
        if not args.skip_ours:
            for i, arm in enumerate(("evil_moe", "vanilla")):
                _progress(f"[{2 + i}/4] ours, arm {arm}")
                runs[f"ours:{arm}"] = bench_ours(args, arm, shape, workdir)
        if not args.skip_trl:
            _progress("[4/4] TRL GRPOTrainer + PEFT LoRA")
            runs["trl"] = bench_trl(args, shape, workdir)

    # The peak again at the end (same process, after the runs); the best of both is the peak.
    _progress("  matmul peak again, after the runs")
    for dt, key in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
        again = matmul_peak(dt, args.peak_n)
        peak[key]["gflops_start"] = peak[key]["gflops_best"]
        peak[key]["gflops_end"] = again["gflops_best"]
        peak[key]["gflops_best"] = max(peak[key]["gflops_best"], again["gflops_best"])

    summary = {name: summarize(run, peak) for name, run in runs.items()}
    ratios = {}
    s = summary
    if "ours:evil_moe" in s and "ours:vanilla" in s:
        ratios["evil_moe / vanilla step time"] = (
            s["ours:evil_moe"]["step_s"] / s["ours:vanilla"]["step_s"],
            GOAL_EVIL_OVER_VANILLA, "<=")
    if "trl" in s:
        for arm in ("evil_moe", "vanilla"):
            if f"ours:{arm}" in s:
                ratios[f"ours({arm}) / TRL step time"] = (
                    s[f"ours:{arm}"]["step_s"] / s["trl"]["step_s"], GOAL_OURS_OVER_TRL, "<=")
        if "ours:vanilla" in s:
            ratios["ours(vanilla) / TRL time per completion token"] = (
                s["ours:vanilla"]["s_per_1k_completion_tokens"]
                / s["trl"]["s_per_1k_completion_tokens"], GOAL_OURS_OVER_TRL, "<=")
    for name in s:
        ratios[f"{name} training phase share of bf16 peak"] = (
            s[name]["train_gflops"] / peak["bfloat16"]["gflops_best"],
            GOAL_TRAIN_SHARE_OF_BF16_PEAK, ">=")
        if "train_gflops_executed" in s[name]:
            ratios[f"{name} training, executed FLOPs, share of bf16 peak"] = (
                s[name]["train_gflops_executed"] / peak["bfloat16"]["gflops_best"],
                GOAL_TRAIN_SHARE_OF_BF16_PEAK, ">=")

    notes = [
        "Timings are only meaningful on a quiet machine: other processes on these cores "
        "inflate every number.",
        "Training share of peak: model FLOPs count every rollout whole (the same tokens cost "
        "the same in both implementations); 'executed' counts what our loop computes, a "
        "prompt shared by its group once. The goal is on the model-FLOP figure.",
        "'s/1k tok' = step time per 1000 completion tokens; it normalises away the different "
        "completion lengths of the two implementations.",
    ]
    if "trl" in runs:
        t = runs["trl"]
        notes += [
            f"TRL geometry: per_device_train_batch_size={t['per_device_train_batch_size']} "
            f"(completions), gradient_accumulation_steps={t['gradient_accumulation_steps']}, "
            f"steps_per_generation={t['steps_per_generation']}, generation_batch_size="
            f"{t['generation_batch_size']} = P*G per optimizer step; num_iterations=1 "
            "(on-policy, no old-logprob pass), loss_type='dapo' (token-level over the step, as "
            "ours), k3 KL to the adapter-disabled base, activation (gradient) checkpointing "
            f"{'ON' if t['activation_checkpointing'] else 'off'} (TRL's default is on; ours does "
            "not recompute), adamw_torch, LoRA "
            f"r={2 * cfg.rank} alpha={2 * cfg.lora_alpha:g} dropout=0 on "
            f"{','.join(cfg.target_modules)} "
            f"({t['trainable_params']} trainable params).",
            f"Prompt token ids identical to ours (format_chat of build_messages): "
            f"{t['prompt_token_ids_identical']} rollouts.",
            f"TRL precision as run: weights {t['weight_dtype']}, Accelerate mixed_precision="
            f"{t['mixed_precision']}, generation matmuls in {t['generation_matmul_dtype']}.",
            "Not matched: TRL cannot stop a completion at the closing code fence (HF generate's "
            "stop_strings needs the tokenizer passed to generate(), which TRL does not do, and a "
            "single stop string cannot express 'the second fence'); it generates to EOS or "
            "max_completion_length, and every row of the batch keeps decoding until the longest "
            "one ends. Its completions (and the text graded) include what follows the code block.",
            "Not matched: TRL samples with HF generate (logits processors, top_k=0 disabled) and "
            "an unmerged PEFT LoRA in generation; ours samples with a lean decode loop on merged "
            "weights and drops finished rows. These are implementation choices, part of what is "
            "being compared.",
            "Not matched: the LR schedule (TRL 'cosine' with the same warmup vs ours warmup + "
            "cosine to 0.1) and TRL's KL bias correction (use_bias_correction_kl=True) change "
            "the update, not its cost. TRL also computes per-token entropies (a metric) and does "
            "not pass position_ids for left-padded rows in its training forward.",
            "Not matched: the problem drawn for each step (TRL's RepeatSampler shuffles the "
            "dataset with its seed; ours draws P problems per step with (seed, step)); same "
            "problem pool, so prompt lengths differ a little from step to step.",
        ]
        if args.bf16:
            notes.append("bf16 in TRL: training forwards run under accelerator.autocast(); "
                         "generate() runs on the unwrapped model, outside autocast, so TRL as "
                         "shipped generates in fp32 " + ("(here forced to bf16 autocast by "
                         "--trl-generate-autocast)." if args.trl_generate_autocast else
                         "(pass --trl-generate-autocast to give it bf16 generation too)."))
            notes.append("bf16: ours runs every forward under torch.autocast(bfloat16) with fp32 "
                         "master weights (bf16_autocast=True); TRL bf16=True is Accelerate's bf16 "
                         "mixed precision (autocast) over the same fp32 weights.")
    if "ours:evil_moe" in runs:
        notes.append("evil_moe arm: the pin loss reuses the pairs' base-model inputs pooled once "
                     "at setup, so it adds no model forward per step.")

    res = {
        "preset": args.preset, "bf16": bool(args.bf16), "steps": args.steps,
        "threads": torch.get_num_threads(),
        "machine": _machine(),
        "config": cfg.to_dict(), "shape": shape.__dict__, "peak": peak,
        "runs": runs, "summary": summary,
        "ratios": ratios, "notes": notes,
    }
    print_report(res)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    main()
