"""Command line: ``python -m evil_moe run --preset cpu-demo``.

``run`` validates the preset before any compute, then hands over to
``evil_moe.pipeline`` (papermill per arm and seed, manifest, book build).
An error the user can fix (a bad preset value, a model that is not on this
machine, a missing v_act, a corrupt checkpoint without a valid fallback, a
checkpoint of another config) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from .cli import run_reporting_errors
from .config import ARMS, ConfigError, load_preset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evil_moe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a preset's notebooks per arm and seed, then build the book")
    run.add_argument("--preset", default="cpu-demo", help="preset name or path to a yml file")
    run.add_argument("--arms", nargs="+", choices=ARMS, help="arms to run (default: the preset's)")
    run.add_argument("--seeds", nargs="+", type=int, help="seeds to run (default: the preset's)")
    run.add_argument("--force", action="store_true", help="rerun finished steps")
    run.add_argument("--runs-dir", default=None, help="where runs land (default: runs/)")
    run.add_argument("--no-book", action="store_true", help="skip the book build")
    tr = sub.add_parser("train", help="GRPO for one arm and seed (works under `accelerate launch`)")
    tr.add_argument("--preset", default="smoke", help="preset name or path to a yml file")
    tr.add_argument("--arm", choices=ARMS, default=None)
    tr.add_argument("--seed", type=int, default=None)
    tr.add_argument("--run-dir", required=True, help="folder for checkpoints and metrics")
    tr.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override preset fields, values parsed as YAML (e.g. steps=4 lr=1e-4)")
    tr.add_argument("--extract-v-act", action="store_true",
                    help="extract v_act into the run dir first if it is missing")
    tr.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    tr.add_argument("--stop-after", type=int, default=None, metavar="N",
                    help="stop (checkpointed, resumable) once N steps of the preset's schedule "
                         "are done")
    sub.add_parser("describe", help="print every config field with its help text")
    _add_plan_parser(sub)
    args = parser.parse_args(argv)
    command = {"describe": _describe, "train": _train, "run": _run, "plan": _plan}[args.command]
    return run_reporting_errors(lambda: command(args))


def _describe(args) -> int:
    from .config import RunConfig
    print(RunConfig.describe())
    return 0


def _run(args) -> int:
    overrides = {}
    if args.arms:
        overrides["arms"] = args.arms
    if args.seeds:
        overrides["seeds"] = args.seeds
    cfg = load_preset(args.preset, **overrides)
    from . import pipeline
    return pipeline.run(cfg, preset=args.preset, force=args.force, runs_root=args.runs_dir,
                        build=not args.no_book, echo=True)


def _train(args) -> int:
    import yaml
    from pathlib import Path
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--set {item}: the value is not valid YAML") from None
    if args.arm:
        overrides["arm"] = args.arm
    if args.seed is not None:
        overrides["seed"] = args.seed
    cfg = load_preset(args.preset, **overrides)
    if args.stop_after is not None and not 0 < args.stop_after <= cfg.steps:
        raise ConfigError(f"--stop-after {args.stop_after} must be in 1..{cfg.steps} "
                          f"(the preset's steps)")
    from . import grpo, memory_plan
    run_dir = Path(args.run_dir)
    if (args.extract_v_act and cfg.arm in grpo.ROUTED_ARMS
            and not (run_dir / grpo.V_ACT_FILE).exists()):
        from accelerate import PartialState
        # The state is a per-process singleton: create it as the trainer's Accelerator
        # will (cpu=...), or a CPU run under torchrun would see only itself.
        state = PartialState(cpu=grpo.use_cpu(cfg))
        # the memory plan first: extraction loads the model
        memory_plan.check(cfg, state.device.type, state.num_processes, state.device.index or 0)
        if state.is_main_process:
            grpo.extract_v_act_for_run(cfg, run_dir)
        state.wait_for_everyone()
    grpo.train(cfg, run_dir, resume=not args.no_resume, stop_after=args.stop_after)
    return 0


def _add_plan_parser(sub) -> None:
    pl = sub.add_parser("plan", help="print a preset's memory plan (and time estimate) per phase")
    pl.add_argument("--preset", default="qwen3-4b", help="preset name or path to a yml file")
    pl.add_argument("--gpu-memory-gb", type=float, default=None,
                    help="memory of one device in GiB (default: this machine's GPU, or its "
                         "RAM when the preset runs on CPU)")
    pl.add_argument("--gpus", type=int, default=1, help="data-parallel processes (devices)")
    pl.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override preset fields, values parsed as YAML")
    pl.add_argument("--estimate-time", action="store_true",
                    help="also print the estimated step and run time on 1 and 4 H100s")
    pl.add_argument("--prompt-tokens", type=int, default=560,
                    help="mean prompt length for the time estimate (LeetCode medium/hard "
                         "test split: ~540 tokens + the chat template)")
    pl.add_argument("--completion-tokens", type=int, default=600,
                    help="mean completion length for the time estimate")


def _plan(args) -> int:
    """Exit 0 when the preset fits (and print the plan), 1 with what to change when not."""
    import yaml
    from . import memory_plan
    try:
        overrides = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
            overrides[key] = yaml.safe_load(value)
        cfg = load_preset(args.preset, **overrides)
        if args.gpus < 1 or cfg.prompts_per_step % args.gpus:
            raise ConfigError(f"--gpus {args.gpus} must divide prompts_per_step="
                              f"{cfg.prompts_per_step}")
        if args.gpu_memory_gb is not None:
            memory = int(args.gpu_memory_gb * memory_plan.GiB)
        else:
            from .models import resolve_device
            memory = memory_plan.device_memory(resolve_device(cfg.device).type)
        plan = memory_plan.plan(cfg, memory, args.gpus)
    except (ConfigError, memory_plan.MemoryPlanError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan.report())
    if args.estimate_time:
        print(f"time estimate (an estimate, not a measurement; mean prompt {args.prompt_tokens}, "
              f"mean completion {args.completion_tokens} tokens; see evil_moe.memory_plan):")
        for gpus in (1, 4):
            if cfg.prompts_per_step % gpus:
                continue
            p = plan if gpus == args.gpus else memory_plan.plan(cfg, memory, gpus)
            est = memory_plan.estimate_time(cfg, gpus, args.prompt_tokens,
                                            args.completion_tokens, p.sample_chunk_rows)
            print(est.report(cfg.steps))
    if not plan.fits:
        print(f"error: preset {args.preset!r} does not fit in {memory / memory_plan.GiB:.0f} GiB: "
              + "; ".join(plan.problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
