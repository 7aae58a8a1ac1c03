"""The memory plan (shapes, fit, CLI, setup refusal) and gradient checkpointing."""

import pytest
import torch
from transformers import LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from evil_moe import grpo, memory_plan
from evil_moe.__main__ import main
from evil_moe.adapter import ExpertAdapter
from evil_moe.config import load_preset
from evil_moe.models import tiny_random_config
from evil_moe.sequences import completion_logprobs


def _tiny_qwen3():
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True))


def test_qwen3_4b_shapes_match_the_model_card():
    arch = memory_plan.Arch.from_hf("Qwen/Qwen3-4B", memory_plan.qwen3_4b_config())
    assert arch.kv_bytes_per_token(2) == 147_456            # DESIGN section 7: 147 KB a token
    assert 4.0e9 < arch.params() < 4.05e9                   # "4.0B parameters"
    # 256 rows at the cap (1,536 + 1,536 tokens): ~115 GB of KV cache (DESIGN section 7)
    assert abs(256 * 3072 * arch.kv_bytes_per_token(2) / 1e9 - 116) < 1


@pytest.mark.parametrize("build", [lambda: LlamaForCausalLM(tiny_random_config(49152)),
                                   _tiny_qwen3])
def test_shapes_from_the_config_equal_the_built_model(build):
    model = build()
    arch = memory_plan.Arch.from_hf("m", model.config)
    assert arch.params() == sum(p.numel() for p in model.parameters())
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert memory_plan.ModelShape.from_arch(arch, targets) == memory_plan.ModelShape.of(model,
                                                                                         targets)


def test_smollm2_shapes_equal_the_loaded_model(smollm2):
    model, _ = smollm2
    arch = memory_plan.Arch.from_hf("smollm2-135m", memory_plan.hf_config("smollm2-135m"))
    assert arch.params() == sum(p.numel() for p in model.parameters())
    assert arch == memory_plan.Arch.from_hf("smollm2-135m", model.config)


def test_qwen3_4b_fits_80_gib_and_not_16(capsys):
    assert main(["plan", "--preset", "qwen3-4b", "--gpu-memory-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "sample_chunk_rows=" in out
    plan = memory_plan.plan(load_preset("qwen3-4b"), 80 * memory_plan.GiB)
    assert plan.fits and plan.peak < 80 * memory_plan.GiB and plan.rows == 256
    assert 1 < plan.sample_chunk_rows < 256                  # all 256 rows would not fit
    assert main(["plan", "--preset", "qwen3-4b", "--gpu-memory-gb", "16"]) == 1
    err = capsys.readouterr().err
    assert "does not fit in 16 GiB" in err and "micro_batch_size" in err


def test_the_plan_chooses_the_largest_chunk_that_fits():
    cfg = load_preset("qwen3-4b")
    plan = memory_plan.plan(cfg, 80 * memory_plan.GiB)
    c = plan.sample_chunk_rows
    peak = lambda rows: memory_plan.phases(cfg, plan.arch, rows, 16, 2048, True)[0].total  # noqa
    assert peak(c) <= plan.budget < peak(c + 1)
    fixed = memory_plan.plan(cfg.replace(sample_chunk_rows=256), 80 * memory_plan.GiB)
    assert not fixed.fits and "lower sample_chunk_rows" in fixed.problems[0]


def test_without_checkpointing_the_plan_says_to_enable_it():
    plan = memory_plan.plan(load_preset("qwen3-4b", gradient_checkpointing=False),
                            80 * memory_plan.GiB)
    assert not plan.fits
    assert any("enable gradient_checkpointing" in p for p in plan.problems)


def test_every_preset_has_a_plan_on_this_machine():
    for preset in ("smoke", "cpu-demo"):
        plan = memory_plan.plan(load_preset(preset), memory_plan.device_memory("cpu"))
        assert plan.fits, plan.report()


def test_setup_refuses_a_run_that_cannot_fit_before_loading_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr(memory_plan, "device_memory", lambda *a: 2 * memory_plan.GiB)

    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded before the memory plan refused the run")
    monkeypatch.setattr("evil_moe.warm_start.load_base_model", must_not_load)
    cfg = load_preset("cpu-demo", arm="vanilla", device="cpu")
    with pytest.raises(memory_plan.MemoryPlanError, match="does not fit in 2 GiB of RAM"):
        grpo.setup(cfg, tmp_path)


def test_time_estimate_uses_the_flop_count():
    cfg = load_preset("qwen3-4b")
    one = memory_plan.estimate_time(cfg, 1, 560, 600, 130)
    four = memory_plan.estimate_time(cfg, 4, 560, 600, 64)
    assert one.flops["train_phase"] == pytest.approx(4 * four.flops["train_phase"])
    assert four.train_s == pytest.approx(one.train_s / 4)
    # decoding is host-bound per chunk: four GPUs run one chunk each where one GPU runs two
    assert four.decode_s < one.decode_s / 1.9 and four.step_s < one.step_s / 2


# ---- gradient checkpointing ----------------------------------------------------------------

def _batch(vocab):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (3, 12), generator=g)
    attn = torch.ones(3, 12, dtype=torch.long)
    attn[0, :3] = 0                                           # left padding
    attn[2, -2:] = 0                                          # a shorter completion
    return ids, attn


@pytest.mark.parametrize("build", [lambda: LlamaForCausalLM(tiny_random_config(128)),
                                   _tiny_qwen3])
def test_gradient_checkpointing_gives_the_same_gradients(build):
    model = build().eval().requires_grad_(False)
    adapter = ExpertAdapter.attach(model, rank=2, seed=0)
    with torch.no_grad():                                     # trained-looking, not init
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ids, attn = _batch(model.config.vocab_size)
    C = 5
    coeff = torch.randn(3, C)
    calls = []
    hook = adapter.layers[0].register_forward_hook(lambda *a: calls.append(1))

    def grads():
        calls.clear()
        w = torch.tensor([0.2, 0.7, 0.5], requires_grad=True)
        with adapter.soft_weight(w), adapter.pooling(attn.float()) as pooled:
            logp = completion_logprobs(model, ids, attn, C, chunk_tokens=4)
        (logp * coeff).sum().backward()                     # outside the context, as train_step
        out = [p.grad.clone() for p in adapter.parameters()] + [w.grad.clone(), pooled.features]
        for p in adapter.parameters():
            p.grad = None
        return out, len(calls)

    plain, n_plain = grads()
    grpo.checkpoint_decoder_layers(model, adapter)
    ckpt, n_ckpt = grads()
    assert n_ckpt == 2 * n_plain                            # each layer ran again in the backward
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    # sampling (no grad, KV cache) is untouched, and removing the adapter restores the model
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attn, use_cache=True)
    hook.remove()
    adapter.remove()
    model(input_ids=ids, attention_mask=attn)
    assert all("forward" not in layer.__dict__ for layer in model.get_decoder().layers)


@pytest.mark.slow
def test_the_plan_is_within_15_percent_of_the_fake_tensor_measurement(capsys):
    """scripts/measure_step_memory.py on the real Qwen3-4B architecture (FakeTensorMode,
    no data, no GPU), at shorter rows so it takes about half a minute of CPU."""
    import importlib.util

    from evil_moe import paths
    spec = importlib.util.spec_from_file_location(
        "measure_step_memory", paths.REPO_ROOT / "scripts" / "measure_step_memory.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rc = script.main(["--set", "micro_batch_size=2", "max_new_tokens=256",
                      "max_prompt_tokens=256"])
    assert rc == 0, capsys.readouterr().out
    assert "within 15%" in capsys.readouterr().out


def test_eager_training_attention_adds_its_probabilities_to_the_train_phase():
    """eager keeps [b, heads, L, L] float32 probabilities and their cast per layer (one layer
    under checkpointing); sdpa keeps none, and the other phases do not change."""
    cfg = load_preset("cpu-demo", training_attention="sdpa", bf16_autocast=True)
    arch = memory_plan.Arch.from_hf(cfg.model, memory_plan.hf_config(cfg.model))
    L = cfg.max_prompt_tokens + cfg.max_new_tokens
    for ck, layers in ((False, arch.n_layers), (True, 1)):
        sdpa = memory_plan.phases(cfg, arch, 64, 8, 2048, ck)
        eager = memory_plan.phases(cfg.replace(training_attention="eager"), arch, 64, 8, 2048, ck)
        probs = eager[2].parts["eager attention probabilities"]
        assert probs == layers * 8 * arch.heads * L * L * (4 + 2)      # bf16 autocast: e = 2
        assert "eager attention probabilities" not in sdpa[2].parts
        assert eager[2].total - sdpa[2].total == probs
        assert [p.total for p in eager[:2]] == [p.total for p in sdpa[:2]]
