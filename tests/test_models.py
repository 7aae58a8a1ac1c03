
import pytest
import torch

from evil_moe.models import (ModelUnavailableError, format_chat, generate_text, load_model,
                             tiny_random_config)


def test_tiny_random_loads_and_generates(tiny):
    model, tok = tiny
    assert model.config.num_hidden_layers == 2
    assert model.config.vocab_size == len(tok)
    assert not any(p.requires_grad for p in model.parameters())
    text = generate_text(model, tok, format_chat(tok, [{"role": "user", "content": "hi"}]), 6)
    assert isinstance(text, str)
    # Generation really ran: 6 new tokens were produced (random weights, so no EOS yet).
    enc = tok(format_chat(tok, [{"role": "user", "content": "hi"}]), return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == enc.input_ids.shape[1] + 6


def test_tiny_random_is_seeded():
    a, _ = load_model("tiny-random", device="cpu", seed=3)
    b, _ = load_model("tiny-random", device="cpu", seed=3)
    c, _ = load_model("tiny-random", device="cpu", seed=4)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_tokenizer_pads_left_for_batched_generation(tiny):
    _, tok = tiny
    assert tok.padding_side == "left" and tok.pad_token is not None


def test_format_chat_uses_the_template(tiny):
    _, tok = tiny
    s = format_chat(tok, [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert s.startswith("<|im_start|>system\nS<|im_end|>") and s.endswith("<|im_start|>assistant\n")


def test_hub_id_offline_gives_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-evil-moe-hf-home")
    with pytest.raises(ModelUnavailableError, match=r"Could not load model 'Qwen/Qwen3-4B'.*"
                       r"huggingface-cli download Qwen/Qwen3-4B"):
        load_model("Qwen/Qwen3-4B", device="cpu")


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model("tiny-random", dtype="int8")


def test_tiny_config_is_small():
    cfg = tiny_random_config(100)
    assert cfg.num_hidden_layers == 2 and cfg.hidden_size <= 128


@pytest.mark.slow
def test_smollm2_answers_a_sum_offline(smollm2):
    model, tok = smollm2
    assert model.config.num_hidden_layers == 30
    prompt = format_chat(tok, [{"role": "user", "content": "What is the sum of 3 and 4?"}])
    answer = generate_text(model, tok, prompt, max_new_tokens=20)
    assert "7" in answer, answer


@pytest.mark.slow
def test_smollm2_second_load_uses_the_safetensors_cache(smollm2):
    from evil_moe.models import _smollm2_cache
    assert (_smollm2_cache() / "model.safetensors").exists()


def test_eager_training_attention_agrees_with_sdpa_and_is_restored(tiny):
    """training_attention only picks a kernel: the packed rollouts' log-probabilities and
    the adapter's gradients agree with sdpa's to float rounding (float32), padding
    included, and the model's own kernel is back after the block."""
    import copy

    from evil_moe.adapter import ExpertAdapter
    from evil_moe.models import attention_kernel
    from evil_moe.sequences import completion_logprobs, pack_rollouts
    model = copy.deepcopy(tiny[0])
    adapter = ExpertAdapter.attach(model, rank=2, seed=1)
    with torch.no_grad():                    # a non-zero delta, so the gradients are generic
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (7, 11, 4)]
    comps = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (5, 2, 6)]
    ids, att, _, C = pack_rollouts(prompts, comps, pad_id=2)
    w = torch.tensor([0.2, 0.9, 0.5])

    def run():
        with adapter.soft_weight(w):
            logp = completion_logprobs(model, ids, att, C)
        logp.sum().backward()
        grads = [p.grad.clone() for p in adapter.parameters()]
        model.zero_grad(set_to_none=True)
        return logp.detach(), grads

    before = model.config._attn_implementation
    ref_logp, ref_grads = run()
    with attention_kernel(model, "eager"):
        assert model.config._attn_implementation == "eager"
        logp, grads = run()
    assert model.config._attn_implementation == before == "sdpa"
    assert torch.allclose(logp, ref_logp, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        assert (a - b).norm() <= 1e-4 * b.norm()


def test_eager_training_attention_refuses_a_float64_model(tiny):
    """Eager's float32 softmax turns float64's mask value into -inf (NaN on padded rows):
    a clear error before any forward, and the model's kernel is untouched."""
    import copy

    from evil_moe.models import attention_kernel
    model = copy.deepcopy(tiny[0]).double()
    with pytest.raises(ValueError, match="float64 model.*training_attention='sdpa'"):
        with attention_kernel(model, "eager"):
            pass
    assert model.config._attn_implementation == "sdpa"
    with attention_kernel(model, "sdpa"):
        pass
