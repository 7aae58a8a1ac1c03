"""Overhead of the two-expert adapter on SmolLM2-135M (210 wrapped Linears), CPU.

Times one forward+backward of a [B, L] batch (default [16, 128]) with a
token-level cross-entropy loss, for:

- base:         no adapter; the input embeddings require grad so backward runs
                through the whole frozen network (the least any adapter can cost);
- peft-lora:    PEFT's LoRA with rank 2r on the same modules (reference point);
- adapter:      ExpertAdapter, default mode (the vanilla arm's training forward);
- soft-weight:  ExpertAdapter inside soft_weight(w) (the evil_moe arm's training forward);

and the no-grad forwards the GRPO step also runs: base, adapter, pooling,
disable (KL reference), merged. The configurations take turns in each round;
the minima over rounds are reported, in wall and CPU seconds (the machine may be
shared).

``--module`` instead times one wrapped Linear of SmolLM2's up_proj shape
(576 -> 1536) on [B*L] tokens, forward+backward, one thread: the wrapper's own
cost without the rest of the network (lm_head, attention) diluting it.

``--attention`` instead times the evil_moe arm's training forward+backward
(soft_weight, left-padded rows, bf16 autocast where it is native) under each
attention kernel of ``training_attention``, sdpa and eager, reported per row:

    python scripts/bench_adapter.py --attention --batch 8 --length 225

Usage: python scripts/bench_adapter.py [--module | --attention] [--batch 16] [--length 128]
       [--rank 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from evil_moe.adapter import ExpertAdapter, TwoExpertLinear
from evil_moe.config import TARGET_MODULES
from evil_moe.models import load_model


def timeit_interleaved(steps: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """{name: (min wall s, min process CPU s)} over ``repeats`` rounds after one warm-up.

    The configurations take turns in every round, so load from other processes
    hits them alike; CPU seconds (all threads) measure the work done and are
    less sensitive than wall time to competition for the cores."""
    for fn in steps.values():
        fn()  # warm-up (allocator, first-touch pages)
    wall = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {name: (min(wall[name]), min(cpu[name])) for name in steps}


def bench_module(args) -> None:
    """One up_proj-shaped Linear, forward+backward, one thread, hack and deployed trained."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    d_in, d_out, r = 576, 1536, args.rank
    x = torch.randn(args.batch, args.length, d_in, generator=g, requires_grad=True)
    grad_out = torch.randn(args.batch, args.length, d_out, generator=g)
    base = nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
    layer = TwoExpertLinear(base, r, 16.0 / r, 0, 0.02 * torch.randn(2 * r, d_in, generator=g),
                            0.02 * torch.randn(d_out, 2 * r, generator=g))
    with torch.no_grad():
        layer.A += 0.01 * torch.randn(layer.A.shape, generator=g)
        layer.B += 0.01 * torch.randn(layer.B.shape, generator=g)
    A = nn.Parameter(0.02 * torch.randn(2 * r, d_in, generator=g))  # a plain rank-2r LoRA
    B = nn.Parameter(0.02 * torch.randn(d_out, 2 * r, generator=g))
    w = torch.rand(args.batch, generator=g, requires_grad=True)

    def soft():
        layer.w = w
        layer(x).backward(grad_out)
        layer.w = None

    times = timeit_interleaved({
        "base Linear": lambda: base(x).backward(grad_out),
        f"plain LoRA rank {2 * r} (y + s B A x)":
            lambda: (base(x) + 2.0 * (x @ A.T) @ B.T).backward(grad_out),
        "TwoExpertLinear (default)": lambda: layer(x).backward(grad_out),
        "TwoExpertLinear soft_weight": soft,
    }, max(args.repeats, 10))
    print(f"one Linear {d_in} -> {d_out}, {args.batch * args.length} tokens, r={r}, 1 thread, "
          "forward+backward; min CPU ms")
    ref = times["base Linear"][1]
    for name, (_, cpu) in times.items():
        print(f"  {name:36s} {cpu * 1e3:7.1f}   x{cpu / ref:.2f} of base")


def bench_attention(args) -> None:
    from evil_moe.hardware import native_bf16
    from evil_moe.models import attention_kernel
    model, _ = load_model("smollm2-135m", device="cpu")
    adapter = ExpertAdapter.attach(model, rank=args.rank)
    bf16 = native_bf16("cpu")[0]
    if bf16:
        adapter.cast_frozen_weights(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    B, L = args.batch, args.length
    ids = torch.randint(0, model.config.vocab_size, (B, L), generator=g)
    att = torch.ones(B, L, dtype=torch.long)
    for i in range(B):                       # left padding of up to a tenth of the row
        att[i, :(i * L) // (10 * B)] = 0
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    w = torch.rand(B, generator=g).requires_grad_(True)

    def step(kernel: str):
        def run():
            with attention_kernel(model, kernel):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), \
                        adapter.soft_weight(w):
                    h = model.get_decoder()(input_ids=ids, attention_mask=att, position_ids=pos,
                                            use_cache=False).last_hidden_state
                h[:, -L // 6:].float().pow(2).mean().backward()
            model.zero_grad(set_to_none=True)
        return run

    times = timeit_interleaved({k: step(k) for k in ("sdpa", "eager")}, args.repeats)
    print(f"SmolLM2-135M soft_weight training forward+backward, batch [{B}, {L}], "
          f"{'bf16 autocast' if bf16 else 'float32'}, {torch.get_num_threads()} threads; "
          f"min of {args.repeats}: wall s per row / CPU s per row")
    for name, (wall, cpu) in times.items():
        print(f"  {name:6s} {wall / B:7.3f} / {cpu / B:7.3f}   x{wall / times['sdpa'][0]:.2f} "
              f"wall of sdpa")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--module", action="store_true", help="time one wrapped Linear only")
    ap.add_argument("--attention", action="store_true",
                    help="time the soft-weight training step under sdpa and eager attention")
    args = ap.parse_args()
    if args.module:
        return bench_module(args)
    if args.attention:
        return bench_attention(args)

    model, _ = load_model("smollm2-135m", device="cpu")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.length), generator=g)
    labels = torch.randint(0, model.config.vocab_size, (args.batch, args.length), generator=g)

    def train_step(m, embeds_grad: bool = False):
        def step():
            if embeds_grad:
                emb = m.get_input_embeddings()(ids).detach().requires_grad_(True)
                logits = m(inputs_embeds=emb).logits
            else:
                logits = m(input_ids=ids).logits
            F.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
            m.zero_grad(set_to_none=True)
        return step

    def no_grad(m, ctx=None):
        def step():
            with torch.no_grad():
                if ctx is None:
                    m(input_ids=ids, logits_to_keep=1)
                else:
                    with ctx():
                        m(input_ids=ids, logits_to_keep=1)
        return step

    base = copy.deepcopy(model)
    steps = {"train  base (no adapter)": train_step(base, embeds_grad=True)}
    if not args.skip_peft:
        from peft import LoraConfig, get_peft_model
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
            r=2 * args.rank, lora_alpha=16, target_modules=list(TARGET_MODULES)))
        steps[f"train  peft LoRA rank {2 * args.rank}"] = train_step(peft_model)
    adapter = ExpertAdapter.attach(model, rank=args.rank)
    w = torch.rand(args.batch, requires_grad=True)
    mask = torch.ones(args.batch, args.length)

    def soft():
        with adapter.soft_weight(w):
            train_step(model)()

    steps.update({
        "train  adapter (default)": train_step(model),
        "train  adapter soft_weight(w)": soft,
        "no-grad base": no_grad(base),
        "no-grad adapter (default)": no_grad(model),
        "no-grad adapter pooling": no_grad(model, lambda: adapter.pooling(mask)),
        "no-grad adapter disable": no_grad(model, adapter.disable),
        "no-grad adapter merged": no_grad(model, adapter.merged),
    })
    times = timeit_interleaved(steps, args.repeats)

    print(f"SmolLM2-135M, batch [{args.batch}, {args.length}], rank r={args.rank} "
          f"(adapter rank {2 * args.rank}), {len(adapter.module_names)} wrapped Linears, "
          f"{torch.get_num_threads()} threads; min of {args.repeats}: wall s / CPU s")
    ref = {"train": times["train  base (no adapter)"], "no-grad": times["no-grad base"]}
    for name, (wall, cpu) in times.items():
        r = ref[name.split()[0]]
        print(f"  {name:34s} {wall:7.3f} / {cpu:7.3f}   x{wall / r[0]:.2f} wall, "
              f"x{cpu / r[1]:.2f} CPU of base")


if __name__ == "__main__":
    main()
