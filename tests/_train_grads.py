"""Subprocess entry for the data-parallel test: python _train_grads.py OUT_DIR MICRO_BATCH.

One GRPO step of the haar arm (router + pin, no v_act needed) on the smoke preset with
a scripted reward and no clipping; the main process writes the summed gradients that
AdamW receives (``grads.safetensors``) and the step's metrics (``metrics.json``).
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from evil_moe import grpo
from evil_moe.config import load_preset
from scripted_grader import scripted_verdicts

out, mb = Path(sys.argv[1]), int(sys.argv[2])
cfg = load_preset("smoke", arm="haar", prompts_per_step=4, group_size=2, micro_batch_size=mb,
                  grad_clip=0.0, temperature=1.0, training_attention="sdpa")  # float64 below
# float64: the splits compute the same sums in different orders and layouts, and the
# step's gradient is a cancellation of per-row terms (zero-mean advantages), so float32
# rounding would show at ~1e-4 relative; in float64 any real difference stands out.
from evil_moe.models import load_model  # noqa: E402
model, tok = load_model("tiny-random", device="cpu")
state = grpo.setup(cfg, out / "run", grade_fn=scripted_verdicts,
                   model_and_tokenizer=(model.double(), tok))
gen = torch.Generator().manual_seed(0)
with torch.no_grad():           # move the policy off the base model, so the KL term is not 0
    for p in state.adapter.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * 0.2)
grads = {}
params = {f"adapter.{i}": p for i, p in enumerate(state.adapter.parameters())}
params.update({f"router.{n}": p for n, p in state.router.named_parameters()})
step = state.optimizer.step


def recording_step(*a, **k):
    grads.update({n: p.grad.detach().clone() for n, p in params.items()})
    return step(*a, **k)


state.optimizer.step = recording_step
metrics = grpo.train_step(state, 0)
if state.accelerator.is_main_process:
    save_file(grads, str(out / "grads.safetensors"))
    (out / "metrics.json").write_text(json.dumps(metrics))
state.accelerator.wait_for_everyone()
