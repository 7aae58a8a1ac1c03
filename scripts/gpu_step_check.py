"""One full-shape GRPO step of the qwen3-4b preset on a GPU, measured phase by phase.

The check the memory plan and the time estimate (``evil_moe.memory_plan``) are
judged against. It runs the library's own ``grpo.setup`` and ``grpo.train_step``
(sampling with the plan's chunk, sandboxed grading, the base-model reference
pass, the micro-batched training forward and backward under gradient
checkpointing, AdamW) on transformers' ``Qwen3ForCausalLM`` with Qwen3-4B's
config (``memory_plan.qwen3_4b_config``) and **random weights**: the machine
it was written for cannot reach the hub. So it measures shapes, memory and
time, not behaviour:

- random weights almost never sample EOS or a closing fence, so every rollout
  runs to ``max_new_tokens`` (1,536): the slowest, largest step the preset
  allows, an upper bound for sampling;
- the tokenizer is SmolLM2's (49,152 ids; ``--tokenizer``, saved with
  ``save_pretrained``): it renders the LeetCode prompts (their lengths differ
  from Qwen's tokenizer by a few percent) and decodes sampled ids above its
  vocabulary to nothing, so every program fails to grade as a solution;
- the LeetCode problems are the test file (``--leetcode-dir`` holds it under
  both file names): only their prompt lengths matter here.

``--gpu-memory-gib`` caps PyTorch's allocator (``set_per_process_memory_fraction``)
and hands the same figure to the memory plan, so a larger card behaves as an
80 GB one (79.6 GiB is what an H100 80GB reports); the CUDA context sits outside
the cap. Per phase it records the allocator's peak beside the plan's figure,
and the phase times beside ``memory_plan.estimate_time``'s H100 estimate.
Results go to ``--out`` (``gpu_step_check.json``) after every step.

    python scripts/gpu_step_check.py --tokenizer .gpucheck/tokenizer \\
        --leetcode-dir .gpucheck/leetcode --out /tmp/gpu-check       # on the GPU
    python scripts/gpu_step_check.py --tiny ...                       # a 2-layer dry run on CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from evil_moe import grpo, memory_plan, rollout
from evil_moe.config import load_preset

GiB = memory_plan.GiB


class PhasePeaks:
    """The allocator's peak per phase: sampling, the no-grad reference pass, training.

    ``rollout.sample`` and ``grpo._score_rows`` are wrapped (train_step looks
    both up when it runs); the reference pass is every no-grad ``_score_rows``
    call, and the training phase runs from the first call with gradients to
    the end of the step (its backward included).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peaks: dict[str, float] = {}
        self.seconds = {"reference": 0.0}
        self._sample, self._score = rollout.sample, grpo._score_rows

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def _close(self, phase: str) -> None:
        if self.cuda:
            self._sync()
            self.peaks[phase] = max(self.peaks.get(phase, 0.0),
                                    torch.cuda.max_memory_allocated() / GiB)
            torch.cuda.reset_peak_memory_stats()

    def __enter__(self):
        def sample(*args, **kwargs):
            self._close("before_sample")
            out = self._sample(*args, **kwargs)
            self._close("sample")
            return out

        def score(*args, **kwargs):
            if torch.is_grad_enabled():
                return self._score(*args, **kwargs)
            t0 = time.perf_counter()
            out = self._score(*args, **kwargs)
            self._close("reference")
            self.seconds["reference"] += time.perf_counter() - t0
            return out

        rollout.sample, grpo._score_rows = sample, score
        return self

    def end_step(self) -> None:
        self._close("train")

    def __exit__(self, *exc):
        rollout.sample, grpo._score_rows = self._sample, self._score


def _model(tiny: bool, device: torch.device, vocab: int):
    from transformers import AutoModelForCausalLM
    hf = memory_plan.qwen3_4b_config()
    if tiny:        # the same architecture, two small layers
        hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers = 256, 512, 2
        hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim = 4, 2, 64
        hf.vocab_size = vocab
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16)
    return model.eval().requires_grad_(False)


def decode_profile(state, cfg, out: Path, report: dict, chunk_rows: int,
                   one_chunk: bool = False) -> None:
    """Where a sampling step's time goes: per-token cost at two chunk sizes (only the
    plan's with ``one_chunk``) and two cache lengths (flat in both = launch- or
    host-bound, growing = bandwidth-bound), and a torch.profiler table of a short decode."""
    from torch.profiler import ProfilerActivity, profile
    model, tok, adapter = state.model, state.tokenizer, state.adapter
    prompts = state.prompts[:cfg.prompts_per_step]
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def timed(rows: int, new_tokens: int) -> tuple[float, int]:
        """Seconds to decode ``new_tokens`` for about ``rows`` rows, and the rows decoded."""
        n = max(1, rows // len(prompts))                   # samples per prompt
        used = prompts[:max(1, rows // n)]
        sync()
        t0 = time.perf_counter()
        with adapter.merged(hack=True):
            rollout.sample(model, tok, used, n, max_new_tokens=new_tokens,
                           autocast_bf16=cfg.bf16_autocast)
        sync()
        return time.perf_counter() - t0, len(used) * n

    timed(16, 4)                                           # warm-up
    rows_big = (chunk_rows // cfg.group_size) * cfg.group_size or cfg.group_size
    table = {}
    for rows in (rows_big, max(cfg.group_size, rows_big // 2))[:1 if one_chunk else 2]:
        t_short, decoded = timed(rows, 16)
        t_long, _ = timed(rows, 272)
        table[decoded] = {"s_per_token_marginal": (t_long - t_short) / 256,
                          "t_16_s": t_short, "t_272_s": t_long}
        print(f"decode: {decoded} rows, 16 tokens {t_short:.2f} s, 272 tokens "
              f"{t_long:.2f} s: {(t_long - t_short) / 256 * 1e3:.1f} ms a token (marginal)",
              flush=True)
    report["decode"] = table
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        timed(rows_big, 24)
    text = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
    (out / "decode_profile.txt").write_text(
        text + "\n\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(text, flush=True)
    (out / "gpu_step_check.json").write_text(json.dumps(report, indent=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arm", default="evil_moe")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=420.0,
                    help="start no further step after this many seconds")
    ap.add_argument("--gpu-memory-gib", type=float, default=79.6,
                    help="cap the allocator at this much (0 = the whole device)")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--leetcode-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer Qwen3 on CPU, 2 x 2 rollouts")
    ap.add_argument("--decode-profile", action="store_true",
                    help="profile the sampling decode instead of running a step")
    ap.add_argument("--decode-one-chunk", action="store_true",
                    help="with --decode-profile: time the plan's chunk only, not also half of it")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import transformers
    from transformers import AutoTokenizer
    overrides = dict(arm=args.arm, seed=0, leetcode_dir=args.leetcode_dir)
    if args.tiny:
        overrides.update(device="cpu", prompts_per_step=2, group_size=2, micro_batch_size=2,
                         max_new_tokens=8)
    cfg = load_preset("qwen3-4b", **overrides)
    device = torch.device("cuda" if cfg.device == "cuda" else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine, or pass --tiny for a CPU dry run")
        return 2
    report = {"arm": cfg.arm, "torch": torch.__version__, "transformers": transformers.__version__,
              "tiny": args.tiny, "steps": []}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        report.update(gpu=props.name, gpu_total_gib=props.total_memory / GiB)
        if args.gpu_memory_gib > 0:
            cap = int(args.gpu_memory_gib * GiB)
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / props.total_memory))
            memory_plan.device_memory = lambda *_a, **_k: cap   # the plan sizes for the cap
            report["allocator_cap_gib"] = args.gpu_memory_gib
    print(json.dumps({k: v for k, v in report.items() if k != "steps"}), flush=True)

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    t0 = time.perf_counter()
    model = _model(args.tiny, device, len(tok))
    report["model_params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
    report["model_init_s"] = time.perf_counter() - t0
    print(f"model: {report['model_params_b']:.2f} B parameters, bf16, random "
          f"({report['model_init_s']:.0f} s)", flush=True)

    run_dir = out / "run"
    from evil_moe import arms
    if arms.get(cfg.arm).start == "v_act":
        t0 = time.perf_counter()
        ext = grpo.extract_v_act_for_run(cfg, run_dir, model_and_tokenizer=(model, tok))
        report["v_act_s"] = time.perf_counter() - t0
        print(f"v_act from {len(ext.pair_ids)} pairs in {report['v_act_s']:.1f} s", flush=True)

    from evil_moe.env.grader import grader_from_config
    from evil_moe.env.sandbox import SandboxUnavailableError
    try:
        grader = grader_from_config(cfg)
        report["grading"] = "sandbox"
    except SandboxUnavailableError as e:
        print(f"GRADING SKIPPED: the sandbox is unavailable here ({e}); every rollout is "
              f"scored as a failure without running it", flush=True)
        grader, report["grading"] = None, f"skipped: {e}"

    def grade_fn(problems, texts):
        if grader is not None:
            return grader.grade_batch(problems, texts, progress=False)
        from evil_moe.env.grader import Verdict
        return [Verdict(problem_id=p.id, compiles=False, gt_pass=False, hint_pass=False,
                        defines_run_tests=False, response_tests_pass_canonical=None,
                        response_tests_pass_wrong=None, label="not_graded", reward=0.0,
                        code="", error="not graded") for p in problems]

    t0 = time.perf_counter()
    state = grpo.setup(cfg, run_dir, grade_fn=grade_fn, model_and_tokenizer=(model, tok))
    report["setup_s"] = time.perf_counter() - t0
    mem = memory_plan.device_memory(device.type)
    plan = memory_plan.plan(cfg, mem)
    report["plan"] = {"memory_gib": mem / GiB, "sample_chunk_rows": plan.sample_chunk_rows,
                      "micro_batch": plan.micro_batch, "peak_gib": plan.peak / GiB,
                      **{f"{n}_gib": plan.phase(n).total / GiB
                         for n in ("sample", "reference", "train")}}
    print(plan.report(), flush=True)
    lengths = [len(ids) for ids in state.prompt_ids]
    report["prompt_tokens_mean"] = sum(lengths) / len(lengths)

    if args.decode_profile:
        decode_profile(state, cfg, out, report, plan.sample_chunk_rows, args.decode_one_chunk)
        return 0

    with PhasePeaks(device) as peaks:
        for step in range(args.steps):
            if step and time.perf_counter() - t_start > args.max_seconds:
                print(f"stopping before step {step}: past --max-seconds", flush=True)
                break
            peaks.peaks.clear()
            peaks.seconds["reference"] = 0.0
            try:
                m = grpo.train_step(state, step)
            except torch.OutOfMemoryError as e:      # the finding: record it, then stop
                report["out_of_memory"] = {"step": step, "peaks_gib": dict(peaks.peaks),
                                           "message": str(e).splitlines()[0]}
                (out / "gpu_step_check.json").write_text(json.dumps(report, indent=1))
                print(f"OUT OF MEMORY in step {step} after phases {sorted(peaks.peaks)}: "
                      f"{report['out_of_memory']['message']}", flush=True)
                return 1
            peaks.end_step()
            c = m["completion_tokens"] / (cfg.prompts_per_step * cfg.group_size)
            est = memory_plan.estimate_time(cfg, 1, round(report["prompt_tokens_mean"]),
                                            max(1, round(c)), plan.sample_chunk_rows)
            row = {"step": step, "step_time_s": m["step_time_s"], "time_gen_s": m["time_gen_s"],
                   "time_grade_s": m["time_grade_s"], "time_reference_s": peaks.seconds["reference"],
                   "time_train_s": m["time_train_s"] - peaks.seconds["reference"],
                   "completion_tokens_mean": c, "gen_tokens_per_s": m["gen_tokens_per_s"],
                   "peak_gib": dict(peaks.peaks),
                   "estimate_h100_s": {"decode": est.decode_s, "prefill": est.prefill_s,
                                       "reference_train": est.train_s, "step": est.step_s},
                   "loss_pg": m["loss_pg"], "kl": m["kl"], "w_mean": m["w_mean"],
                   "grad_norm_hack": m["grad_norm_hack"], "hack_rate": m["hack_rate"]}
            report["steps"].append(row)
            (out / "gpu_step_check.json").write_text(json.dumps(report, indent=1))
            print(json.dumps(row), flush=True)
    if grader is not None:
        grader.close()

    print(f"\n  {'phase':<10}{'plan GiB':>10}{'peak GiB':>10}   time (s)")
    last = report["steps"][-1]
    times = {"sample": last["time_gen_s"], "reference": last["time_reference_s"],
             "train": last["time_train_s"]}
    for name in ("sample", "reference", "train"):
        print(f"  {name:<10}{report['plan'][name + '_gib']:>10.1f}"
              f"{last['peak_gib'].get(name, float('nan')):>10.1f}   {times[name]:8.1f}")
    e = last["estimate_h100_s"]
    print(f"  grading {last['time_grade_s']:.1f} s; step {last['step_time_s']:.1f} s measured, "
          f"{e['step']:.1f} s estimated for one H100 (decode {e['decode']:.0f} + prefill "
          f"{e['prefill']:.0f} + reference/train {e['reference_train']:.0f}); "
          f"{cfg.steps} steps = {last['step_time_s'] * cfg.steps / 3600:.2f} h at this step's time")
    print(f"  total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
