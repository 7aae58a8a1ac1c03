"""Splitting a step (micro-batches, processes) must not change its gradient or its metrics.

The loss is token-normalised over the whole step (grpo module docstring): a
wrong normalisation (per micro-batch, per process, or a mean instead of a sum
across processes) changes the gradient by a factor that differs per split,
which these comparisons see. Clipping is off (it would rescale the error away);
gradients are compared, not the AdamW update (its first step is nearly
``lr * sign(g)``, blind to scale).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

TESTS = Path(__file__).parent
TIMING = {"gen_tokens_per_s", "time_gen_s", "time_grade_s", "time_train_s", "step_time_s"}


def _run(out: Path, mb: int, processes: int = 1):
    if processes == 1:
        cmd = [sys.executable, str(TESTS / "_train_grads.py"), str(out), str(mb)]
    else:   # --multi_gpu: accelerate's torchrun launcher; Accelerator(cpu=True) uses gloo
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", str(TESTS / "_train_grads.py"), str(out), str(mb)]
    env = {**__import__("os").environ, "PYTHONPATH": f"{TESTS.parent}:{TESTS}"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    return load_file(str(out / "grads.safetensors")), {
        k: v for k, v in metrics.items() if k not in TIMING}


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        err = (a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-30)
        assert err < 1e-5, f"{k}: relative difference {err:.2e}"
        assert a[k].norm() > 0, k


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("whole"), mb=8)          # P*G = 8 rows, one micro-batch


@pytest.mark.parametrize("mb", [1, 3])
def test_micro_batches_give_the_gradient_of_one_batch(one_batch, tmp_path, mb):
    grads, metrics = _run(tmp_path, mb=mb)
    _assert_same(one_batch[0], grads)
    ref = one_batch[1]
    assert metrics["completion_tokens"] == ref["completion_tokens"]
    for k in ("kl", "loss_pg", "reward", "loss_pin"):       # (advantages are float32:
        assert metrics[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-7), k   # a 0 is ~1e-8)
    assert ref["kl"] > 1e-4       # (loss_pg is 0 in value here: equal lengths, zero-mean A)


@pytest.mark.slow
def test_two_processes_give_the_gradient_and_metrics_of_one(one_batch, tmp_path):
    """Per-row sampling streams make both processes sample exactly the rollouts one
    process samples; the summed gradient and the reduced metrics must then match."""
    grads, metrics = _run(tmp_path, mb=2, processes=2)
    _assert_same(one_batch[0], grads)
    ref = one_batch[1]
    assert metrics["completion_tokens"] == ref["completion_tokens"]
    for k in ("kl", "loss_pg", "loss_kl", "reward", "hack_rate", "w_mean", "loss_pin",
              "grad_norm_deployed", "grad_norm_hack", "grad_norm_router"):
        assert metrics[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-7), k
    assert metrics["kl"] > 1e-4                     # a KL that was not reduced would be half
