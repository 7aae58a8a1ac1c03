"""The GRPO loop end to end on tiny-random: every arm, resume, NaN guard, no label leakage."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evil_moe import grpo
from evil_moe.config import load_preset

sys.path.insert(0, str(Path(__file__).parent))
from scripted_grader import scripted_verdicts  # noqa: E402

TESTS = Path(__file__).parent
TIMING = {"gen_tokens_per_s", "time_gen_s", "time_grade_s", "time_train_s", "step_time_s"}


def _metrics(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def v_act_dir(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("vact")
    grpo.extract_v_act_for_run(load_preset("smoke"), d, model_and_tokenizer=tiny)
    return d


@pytest.mark.parametrize("arm", ["evil_moe", "vanilla", "haar", "no_pin"])
def test_smoke_preset_trains_two_steps_of_every_arm(arm, tmp_path, v_act_dir):
    """Real sandboxed grader, real pairs, real router: the whole step runs for each arm."""
    shutil.copy(v_act_dir / grpo.V_ACT_FILE, tmp_path / grpo.V_ACT_FILE)
    cfg = load_preset("smoke", arm=arm, steps=2)
    state = grpo.train(cfg, tmp_path, progress=False)
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        assert 0 <= r["hack_rate"] <= 1 and 0 <= r["solve_rate"] <= 1
        assert r["completion_tokens"] > 0
        if arm == "vanilla":
            assert r["w_mean"] != r["w_mean"]                        # NaN: no router
        else:
            assert 0 < r["w_mean"] < 1
        if arm in ("evil_moe", "haar"):
            assert r["loss_pin"] > 0
        else:
            assert r["loss_pin"] != r["loss_pin"]
    assert (tmp_path / "checkpoint" / "adapter" / "adapter.safetensors").exists()
    assert ((tmp_path / "checkpoint" / "router.safetensors").exists()) == (arm != "vanilla")
    assert (tmp_path / "samples.jsonl").read_text().strip()
    state.adapter.remove()


def test_routed_arm_without_v_act_fails_before_training(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="01_extract_v_act"):
        grpo.setup(load_preset("smoke", arm="evil_moe"), tmp_path, model_and_tokenizer=tiny)


def test_grader_labels_never_reach_the_router(tmp_path, v_act_dir, tiny):
    """Same rewards, opposite labels: parameters after a step must be bit-identical."""
    results = []
    for hack in (True, False):
        d = tmp_path / str(hack)
        d.mkdir()
        shutil.copy(v_act_dir / grpo.V_ACT_FILE, d / grpo.V_ACT_FILE)
        state = grpo.setup(load_preset("smoke", arm="evil_moe"), d,
                           grade_fn=lambda p, t, h=hack: scripted_verdicts(p, t, hack=h),
                           model_and_tokenizer=tiny)
        m = grpo.train_step(state, 0)
        results.append((m, {k: v.clone() for k, v in state.router.state_dict().items()},
                        {k: v.clone() for k, v in state.adapter.state_dict().items()}))
        state.adapter.remove()
    (m1, r1, a1), (m2, r2, a2) = results
    assert m1["hack_rate"] == 1.0 and m2["hack_rate"] == 0.0       # the labels did differ
    assert m1["reward"] == m2["reward"]
    assert all(torch.equal(r1[k], r2[k]) for k in r1)
    assert all(torch.equal(a1[k], a2[k]) for k in a1)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, tiny):
    real = grpo.policy_terms
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        pg, kl = real(*args, **kwargs)
        calls["n"] += 1
        return (pg * float("nan"), kl) if calls["n"] > 1 else (pg, kl)

    monkeypatch.setattr(grpo, "policy_terms", poisoned)
    cfg = load_preset("smoke", arm="vanilla", steps=3, micro_batch_size=64)
    with pytest.raises(grpo.NonFiniteLossError, match=r"step 1: the loss is not finite.*"
                       r"last good checkpoint \(step 0\)"):
        grpo.train(cfg, tmp_path, grade_fn=scripted_verdicts, progress=False,
                   model_and_tokenizer=tiny)
    assert grpo.checkpoint_step(tmp_path) == 0
    assert len(_metrics(tmp_path)) == 1


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path, tiny):
    cfg = load_preset("smoke", arm="vanilla", steps=1)
    grpo.train(cfg, tmp_path, grade_fn=scripted_verdicts, progress=False,
               model_and_tokenizer=tiny).adapter.remove()
    with pytest.raises(ValueError, match=r"another config \(lr: 0.0001 -> 0.001.*--no-resume"):
        grpo.train(cfg.replace(lr=1e-3), tmp_path, grade_fn=scripted_verdicts, progress=False,
                   model_and_tokenizer=tiny)
    # evaluation-only fields do not change what training computes: resuming is fine
    state = grpo.train(cfg.replace(eval_samples=7, steps=1), tmp_path, grade_fn=scripted_verdicts,
                       progress=False, model_and_tokenizer=tiny)
    state.adapter.remove()
    # and starting over is always allowed
    state = grpo.train(cfg.replace(lr=1e-3), tmp_path, resume=False, grade_fn=scripted_verdicts,
                       progress=False, model_and_tokenizer=tiny)
    state.adapter.remove()
    assert len(_metrics(tmp_path)) == 1


def test_stop_after_ends_checkpointed_and_resumes_to_the_same_run(tmp_path, tiny):
    cfg = load_preset("smoke", arm="vanilla", steps=3, micro_batch_size=64)
    kw = dict(grade_fn=scripted_verdicts, progress=False, model_and_tokenizer=tiny)
    grpo.train(cfg, tmp_path / "whole", **kw).adapter.remove()
    grpo.train(cfg, tmp_path / "part", stop_after=2, **kw).adapter.remove()
    assert len(_metrics(tmp_path / "part")) == 2 and grpo.checkpoint_step(tmp_path / "part") == 1
    grpo.train(cfg, tmp_path / "part", **kw).adapter.remove()
    whole, part = _metrics(tmp_path / "whole"), _metrics(tmp_path / "part")
    assert [m["lr"] for m in part] == [m["lr"] for m in whole]      # the full run's schedule
    assert [m["loss_pg"] for m in part] == pytest.approx([m["loss_pg"] for m in whole])
    with pytest.raises(ValueError, match="stop_after=4 must be in 1..steps=3"):
        grpo.train(cfg, tmp_path / "bad", stop_after=4, **kw)


def _run(args, check=True):
    # keep the caller's PYTHONPATH first, so the subprocess imports the same evil_moe
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH", ""), str(TESTS)) if p)
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run([sys.executable, str(TESTS / "_train_scripted.py"), *map(str, args)],
                          env=env, check=check, capture_output=True, text=True)


def _checkpoint_contents(run_dir):
    """Every tensor and every piece of state a checkpoint holds, by name."""
    from evil_moe import checkpoint
    folder = checkpoint.latest(run_dir)
    state = checkpoint.read_state(folder)
    tensors = {f"adapter/{k}": v for k, v in
               load_file(folder / checkpoint.ADAPTER_DIR / "adapter.safetensors").items()}
    for name in (checkpoint.ROUTER_FILE, checkpoint.OPTIMIZER_FILE, checkpoint.RNG_FILE):
        if (folder / name).exists():
            tensors.update({f"{name}/{k}": v for k, v in load_file(folder / name).items()})
    return state, tensors


@pytest.mark.parametrize("arm", ["evil_moe", "vanilla"])
def test_sigkill_and_resume_equals_an_uninterrupted_run(arm, tmp_path, v_act_dir):
    """Killed while grading step 2, then resumed: metrics, samples, adapter, router,
    every optimizer tensor, the scheduler and the torch RNG equal an uninterrupted run's.
    (Python's global ``random`` is saved too but not compared: training draws from seeded
    generators of its own, and that global state was measured to differ at the end of the
    two runs while every tensor and metric is equal.)"""
    from evil_moe import checkpoint
    full, killed = tmp_path / "full", tmp_path / "killed"
    for d in (full, killed):
        d.mkdir()
        shutil.copy(v_act_dir / grpo.V_ACT_FILE, d / grpo.V_ACT_FILE)
    _run([full, arm, 4])
    res = _run([killed, arm, 4, 2], check=False)                  # dies grading step 2
    assert res.returncode == -9, res.stderr[-2000:]
    assert grpo.checkpoint_step(killed) == 1
    _run([killed, arm, 4])                                        # resume
    assert _metrics(killed) == _metrics(full)
    assert (killed / grpo.SAMPLES_FILE).read_text() == (full / grpo.SAMPLES_FILE).read_text()
    state_a, a = _checkpoint_contents(full)
    state_b, b = _checkpoint_contents(killed)
    assert state_a["step"] == state_b["step"] == 3
    assert state_a["scheduler"] == state_b["scheduler"]
    assert state_a["optimizer"] == state_b["optimizer"]           # structure, hyperparameters
    assert a.keys() == b.keys()
    kinds = {k.split("/")[0] for k in a}
    assert {"adapter", checkpoint.OPTIMIZER_FILE, checkpoint.RNG_FILE} <= kinds
    assert (checkpoint.ROUTER_FILE in kinds) == (arm != "vanilla")
    assert sum(k.startswith(checkpoint.OPTIMIZER_FILE) for k in a) >= 2 * len(
        [k for k in a if k.startswith("adapter/") and k.endswith((".A", ".B"))])  # Adam moments
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_two_cpu_processes_under_accelerate_launch(tmp_path):
    # --multi_gpu selects accelerate's torchrun launcher; on a machine without GPUs the
    # trainer's Accelerator(cpu=True) then runs data parallel on CPU (gloo). (--cpu
    # alone would need MPI for more than one process.)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "evil_moe", "train", "--preset", "smoke", "--arm", "evil_moe",
           "--extract-v-act", "--run-dir", str(tmp_path), "--set", "steps=2",
           "prompts_per_step=2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1]
    cfg = load_preset("smoke")
    # metrics gather both processes' rollouts: P*G rollouts, reward means over all of them
    samples = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len([s for s in samples if s["step"] == 0]) == cfg.group_size  # main process's share


# ---- the oracle arm and the label-leakage guard over every arm -----------------------------

from evil_moe import arms  # noqa: E402


def _one_step(arm, d, v_act_dir, tiny, grade_fn, **overrides):
    """Parameters (adapter, router) and metrics after one step of ``arm`` in ``d``."""
    d.mkdir()
    shutil.copy(v_act_dir / grpo.V_ACT_FILE, d / grpo.V_ACT_FILE)
    state = grpo.setup(load_preset("smoke", arm=arm, **overrides), d, grade_fn=grade_fn,
                       model_and_tokenizer=tiny)
    try:
        m = grpo.train_step(state, 0)
        params = {f"adapter.{k}": v.clone() for k, v in state.adapter.state_dict().items()}
        if state.router is not None:
            params.update({f"router.{k}": v.clone() for k, v in state.router.state_dict().items()})
        return m, params, state.last_samples
    finally:
        state.adapter.remove()


def _flipped(hack):
    return lambda p, t: scripted_verdicts(p, t, hack=hack)


@pytest.mark.parametrize("arm", [a for a in arms.ARMS if not arms.get(a).uses_labels])
@pytest.mark.parametrize("options", [{}, {"router_centering": "group",
                                          "router_calibration": "batch"}])
def test_no_label_free_arm_reads_a_training_label(arm, options, tmp_path, v_act_dir, tiny):
    """Same rewards, opposite labels: bit-identical parameters, for every arm but the oracle
    and with every router option."""
    (m1, p1, _), (m2, p2, _) = (_one_step(arm, tmp_path / str(h), v_act_dir, tiny, _flipped(h),
                                          **options) for h in (True, False))
    assert (m1["hack_rate"], m2["hack_rate"]) == (1.0, 0.0) and m1["reward"] == m2["reward"]
    assert m1["uses_labels"] is False
    assert set(p1) == set(p2) and all(torch.equal(p1[k], p2[k]) for k in p1)


def test_flipping_the_labels_changes_the_oracle(tmp_path, v_act_dir, tiny):
    (m1, p1, _), (m2, p2, _) = (_one_step("oracle", tmp_path / str(h), v_act_dir, tiny,
                                          _flipped(h)) for h in (True, False))
    assert m1["reward"] == m2["reward"] and m1["uses_labels"] is True
    assert (m1["w_mean"], m2["w_mean"]) == (1.0, 0.0)
    hack_block = [k for k in p1 if not torch.equal(p1[k], p2[k])]
    assert hack_block, "the labels decide which block learns: the parameters must differ"


@pytest.mark.parametrize("recall", [1.0, 0.5, 0.0])
def test_the_oracle_w_is_the_hack_label_seen_with_its_recall(recall, tmp_path, v_act_dir, tiny):
    m, _, samples = _one_step("oracle", tmp_path / "o", v_act_dir, tiny, scripted_verdicts,
                              oracle_label_recall=recall, prompts_per_step=4, group_size=4)
    w = torch.tensor([s["w"] for s in samples])
    hack = torch.tensor([s["label"] == "Reward hack" for s in samples])
    assert 0 < hack.sum() < len(hack)                        # both labels occur
    assert set(w.tolist()) <= {0.0, 1.0} and not bool((w[~hack] > 0).any())   # clean -> 0
    if recall == 1.0:
        assert torch.equal(w, hack.float())
        assert m["w_auroc"] == 1.0 and m["w_gap"] == 1.0
    elif recall == 0.0:
        assert not bool(w.any())
    else:                                                     # seeded: the same draw again
        _, _, again = _one_step("oracle", tmp_path / "o2", v_act_dir, tiny, scripted_verdicts,
                                oracle_label_recall=recall, prompts_per_step=4, group_size=4)
        assert [s["w"] for s in again] == w.tolist()
        assert 0 < w[hack].sum() < hack.sum()


def test_smoke_preset_trains_the_oracle_arm(tmp_path):
    """Real sandboxed grader: the oracle trains, logs that it uses labels, has no router."""
    state = grpo.train(load_preset("smoke", arm="oracle", steps=2), tmp_path, progress=False)
    state.adapter.remove()
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        assert r["uses_labels"] is True and r["loss_pin"] != r["loss_pin"]
        assert r["w_mean"] == pytest.approx(r["hack_rate"])     # w = the strict label
    assert not (tmp_path / "checkpoint" / "router.safetensors").exists()
    assert (tmp_path / "checkpoint" / "adapter" / "adapter.safetensors").exists()


@pytest.mark.parametrize("arm", ["evil_moe", "haar"])
def test_router_options_train_and_log_on_policy_separation(arm, tmp_path, v_act_dir, tiny):
    m, p, samples = _one_step(arm, tmp_path / "r", v_act_dir, tiny, scripted_verdicts,
                              router_centering="group", router_calibration="batch",
                              prompts_per_step=4, group_size=4)
    w = torch.tensor([s["w"] for s in samples])
    hack = torch.tensor([s["label"] == "Reward hack" for s in samples])
    from evil_moe.stats import auroc
    assert m["w_auroc"] == pytest.approx(auroc(w.numpy(), hack.numpy()))
    assert m["w_gap"] == pytest.approx((w[hack].mean() - w[~hack].mean()).item(), abs=1e-6)
    assert int(p["router.num_batches"]) == 1                  # one step observed
    # batch-standardised logits at step 0 (scale +-1, bias 0): w straddles 0.5
    assert (w > 0.5).any() and (w < 0.5).any()


def test_router_policy_gradient_off_leaves_the_router_to_the_pin_loss(tmp_path, v_act_dir, tiny):
    """router_policy_gradient false: w is detached in the training forward. Without a pin
    loss (no_pin) the router then never moves; the adapter's update is the same either
    way; with the option on, the policy loss moves the router. Two steps: the adapter
    starts at net zero, so the hack block (and with it dloss/dw) is zero at step 0."""
    def two_steps(name, on):
        d = tmp_path / name
        d.mkdir()
        shutil.copy(v_act_dir / grpo.V_ACT_FILE, d / grpo.V_ACT_FILE)
        state = grpo.setup(load_preset("smoke", arm="no_pin", router_policy_gradient=on), d,
                           grade_fn=scripted_verdicts, model_and_tokenizer=tiny)
        try:
            start = {k: v.clone() for k, v in state.router.state_dict().items()}
            metrics = [grpo.train_step(state, k) for k in (0, 1)]
            adapter = {k: v.clone() for k, v in state.adapter.state_dict().items()}
            return start, state.router.state_dict(), adapter, metrics
        finally:
            state.adapter.remove()

    start_off, off, adapter_off, m_off = two_steps("off", False)
    start_on, on, adapter_on, m_on = two_steps("on", True)
    assert all(torch.equal(off[k], start_off[k]) for k in ("gate", "scale", "bias"))
    assert [m["grad_norm_router"] for m in m_off] == [0.0, 0.0]
    assert m_on[1]["grad_norm_router"] > 0
    assert not torch.equal(on["gate"], start_on["gate"])
    assert all(torch.allclose(adapter_off[k], adapter_on[k], rtol=0, atol=1e-6)
               for k in adapter_off)
