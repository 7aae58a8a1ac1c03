"""The two-expert adapter: exact zero at init, soft-weight gradients, modes, save/load."""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch
from torch import nn

from evil_moe.adapter import ExpertAdapter, TwoExpertLinear, pool_completions
from evil_moe.config import RunConfig
from evil_moe.models import format_chat

R = 4  # expert rank in these tests; the adapter has rank 2R


@pytest.fixture
def base(tiny):
    """A private copy of the tiny 2-layer Llama (the session fixture stays untouched)."""
    return copy.deepcopy(tiny[0])


@pytest.fixture
def model(base):
    return copy.deepcopy(base)


@pytest.fixture
def adapter(model):
    return ExpertAdapter.attach(model, rank=R, seed=0)


def ids(batch=2, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 2000, (batch, length), generator=g)


def perturb(adapter, deployed=True, hack=True, seed=1, std=0.05):
    """Stand-in for training: move the chosen blocks away from their init."""
    g = torch.Generator().manual_seed(seed)
    r = adapter.rank
    with torch.no_grad():
        for layer in adapter.layers:
            for block, on in ((slice(None, r), deployed), (slice(r, None), hack)):
                if on:
                    layer.A[block] += std * torch.randn(layer.A[block].shape, generator=g)
                    layer.B[:, block] += std * torch.randn(layer.B[:, block].shape, generator=g)


def logits(model, x, ctx=None):
    with torch.no_grad(), (ctx or contextlib.nullcontext()):
        return model(x).logits


def loss_target(x, vocab, seed=0):
    """Fixed random weights for a linear loss on the logits: [B, L, V]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*x.shape, vocab, generator=g)


def grads(model, adapter, x, w=None, target=None):
    """Per-module (dA, dB) of the loss sum(logits * target); returns {name: (dA, dB)}."""
    target = loss_target(x, model.config.vocab_size) if target is None else target
    for p in adapter.parameters():
        p.grad = None
    with adapter.soft_weight(w) if w is not None else contextlib.nullcontext():
        out = model(x).logits
    (out * target).sum().backward()
    return {n: (layer.A.grad.clone(), layer.B.grad.clone())
            for n, layer in zip(adapter.module_names, adapter.layers)}


def assert_rel_close(a, b, tol=1e-5):
    """``|a - b| <= tol * |b|`` in L2 norm: float rounding passes, a wrong factor does not."""
    assert (a - b).norm() <= tol * b.norm(), f"relative error {((a - b).norm() / b.norm()):.2e}"


def blocks(g, r=R):
    """Split {name: (dA, dB)} into deployed and hack gradient lists."""
    dep = [t for dA, dB in g.values() for t in (dA[:r], dB[:, :r])]
    hack = [t for dA, dB in g.values() for t in (dA[r:], dB[:, r:])]
    return dep, hack


# ---- attach ----------------------------------------------------------------------------

def test_attach_wraps_every_target_linear(model, adapter):
    kinds = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert adapter.module_names == [f"model.layers.{i}.{k}" for i in range(2) for k in kinds]
    assert adapter.rank == R and adapter.scale == 16.0 / R
    for name, layer in zip(adapter.module_names, adapter.layers):
        assert model.get_submodule(name) is layer and isinstance(layer, TwoExpertLinear)
        assert layer.A.shape == (2 * R, layer.base.in_features)
        assert layer.B.shape == (layer.base.out_features, 2 * R)
        assert torch.equal(layer.A, layer.A0) and torch.equal(layer.B, layer.B0)
        assert layer.A.abs().min() > 0 and layer.B.abs().min() > 0  # Gaussian, not zeros
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter.parameters()} and len(trainable) == 28


def test_attach_is_seeded_and_leaves_global_rng_alone(base):
    state = torch.random.get_rng_state()
    a = ExpertAdapter.attach(copy.deepcopy(base), rank=R, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = ExpertAdapter.attach(copy.deepcopy(base), rank=R, seed=3)
    c = ExpertAdapter.attach(copy.deepcopy(base), rank=R, seed=4)
    assert torch.equal(a.layers[5].B, b.layers[5].B)
    assert not torch.equal(a.layers[5].B, c.layers[5].B)
    assert a.layers[0].A.std().item() == pytest.approx(0.02, rel=0.1)


def test_from_config_uses_run_config_fields(model):
    cfg = RunConfig(rank=3, lora_alpha=6.0, target_modules=["q_proj", "down_proj"], seed=5,
                    init_std=0.01)
    a = ExpertAdapter.from_config(model, cfg)
    assert a.module_names == [f"model.layers.{i}.{k}" for i in range(2)
                              for k in ("self_attn.q_proj", "mlp.down_proj")]
    assert (a.rank, a.scale, a.seed, a.init_std) == (3, 2.0, 5, 0.01)


def test_attach_errors_are_loud(base, model, adapter):
    with pytest.raises(RuntimeError, match="already has an ExpertAdapter"):
        ExpertAdapter.attach(model, rank=R)
    with pytest.raises(ValueError, match="no module .* matches target_modules"):
        ExpertAdapter.attach(copy.deepcopy(base), rank=R, target_modules=("nope_proj",))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        ExpertAdapter.attach(copy.deepcopy(base), rank=0)
    with pytest.raises(ValueError, match=r"soft weight w must be \[B\] = \[2\]"):
        with adapter.soft_weight(torch.zeros(3)):
            model(ids())


def test_remove_puts_the_linears_back(base, model, adapter):
    adapter.remove()
    assert not any(isinstance(m, TwoExpertLinear) for m in model.modules())
    assert torch.equal(logits(model, ids()), logits(base, ids()))
    ExpertAdapter.attach(model, rank=R)  # attachable again


# ---- zero delta at init ------------------------------------------------------------------

def test_zero_delta_at_init_is_exact_and_gradients_are_alive(base, model, adapter):
    x = ids()
    assert torch.equal(logits(model, x), logits(base, x))
    dep, hack = blocks(grads(model, adapter, x))
    assert all(t.abs().sum() > 0 for t in dep + hack)


# ---- soft weight ------------------------------------------------------------------------

def test_w0_forward_equals_ablated_forward(model, adapter):
    perturb(adapter)
    x = ids()
    soft0 = logits(model, x, adapter.soft_weight(torch.zeros(2)))
    ablated = logits(model, x, adapter.ablate_hack_expert())
    torch.testing.assert_close(soft0, ablated, rtol=1e-5, atol=1e-5)
    assert (soft0 - logits(model, x)).abs().max() > 1e-3  # the hack block does matter


def test_w1_forward_equals_default_forward(model, adapter):
    perturb(adapter)
    x = ids()
    torch.testing.assert_close(logits(model, x, adapter.soft_weight(torch.ones(2))),
                               logits(model, x), rtol=1e-5, atol=1e-5)


def test_w0_gives_exactly_zero_gradient_to_the_hack_block(model, adapter):
    perturb(adapter)
    dep, hack = blocks(grads(model, adapter, ids(), w=torch.zeros(2)))
    assert all(torch.count_nonzero(t) == 0 for t in hack)
    assert all(t.abs().sum() > 0 for t in dep)


def test_w1_gives_exactly_zero_gradient_to_the_deployed_block(model, adapter):
    perturb(adapter)
    dep, hack = blocks(grads(model, adapter, ids(), w=torch.ones(2)))
    assert all(torch.count_nonzero(t) == 0 for t in dep)
    assert all(t.abs().sum() > 0 for t in hack)


def test_w03_scales_the_deployed_gradient_by_exactly_07(model, adapter):
    # Hack block at init: its output is exactly zero, so the forward is the same for
    # every w and the only effect of w is the gradient scaling under test.
    perturb(adapter, deployed=True, hack=False)
    x = ids()
    dep0, _ = blocks(grads(model, adapter, x, w=torch.zeros(2)))
    dep3, hack3 = blocks(grads(model, adapter, x, w=torch.full((2,), 0.3)))
    _, hack1 = blocks(grads(model, adapter, x, w=torch.ones(2)))
    for a, b in zip(dep3, dep0):
        assert_rel_close(a, 0.7 * b)
    for a, b in zip(hack3, hack1):
        assert_rel_close(a, 0.3 * b)


def test_per_row_w_acts_on_each_row_alone(model, adapter):
    perturb(adapter)
    x = ids(batch=2)
    mixed = logits(model, x, adapter.soft_weight(torch.tensor([0.0, 1.0])))
    torch.testing.assert_close(mixed[0], logits(model, x[:1], adapter.ablate_hack_expert())[0],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], logits(model, x[1:])[0], rtol=1e-5, atol=1e-5)
    # Gradients: row 0 (w=0) feeds only the deployed block, row 1 (w=1) only the hack block.
    # The loss is a sum over rows, so each block's gradient is that of its row alone.
    target = loss_target(x, model.config.vocab_size)
    dep_mixed, hack_mixed = blocks(grads(model, adapter, x, torch.tensor([0.0, 1.0]), target))
    dep_row0, _ = blocks(grads(model, adapter, x[:1], torch.zeros(1), target[:1]))
    _, hack_row1 = blocks(grads(model, adapter, x[1:], torch.ones(1), target[1:]))
    for a, b in zip(dep_mixed, dep_row0):
        assert_rel_close(a, b)
    for a, b in zip(hack_mixed, hack_row1):
        assert_rel_close(a, b)


def test_gradient_flows_into_w_and_matches_finite_differences(model, adapter):
    perturb(adapter)
    x = ids(batch=2)
    target = loss_target(x, model.config.vocab_size, seed=7)

    def loss(w):
        with adapter.soft_weight(w):
            return (model(x).logits * target).sum()

    w = torch.tensor([0.3, 0.6], requires_grad=True)
    loss(w).backward()
    eps = 1e-2
    with torch.no_grad():
        for i in range(2):
            e = torch.zeros(2)
            e[i] = eps
            fd = (loss(w.detach() + e) - loss(w.detach() - e)) / (2 * eps)
            assert w.grad[i].item() == pytest.approx(fd.item(), rel=2e-2)
    assert w.grad.abs().min() > 0


# ---- ablation, disable, merge --------------------------------------------------------------

def test_ablate_resets_the_hack_block_to_init_and_restores_exactly(model, adapter):
    perturb(adapter)
    x = ids()
    before_params = {k: v.clone() for k, v in adapter.state_dict().items()}
    before = logits(model, x)
    with adapter.ablate_hack_expert():
        for layer in adapter.layers:
            assert torch.equal(layer.A[R:], layer.A0[R:]) and torch.equal(layer.B[:, R:],
                                                                          layer.B0[:, R:])
            assert not torch.equal(layer.A[:R], layer.A0[:R])  # deployed block untouched
        assert not torch.equal(logits(model, x), before)
    assert all(torch.equal(v, before_params[k]) for k, v in adapter.state_dict().items())
    assert torch.equal(logits(model, x), before)
    with pytest.raises(KeyError), adapter.ablate_hack_expert():
        raise KeyError("boom")  # an error inside the context still restores
    assert torch.equal(logits(model, x), before)


def test_ablated_hack_block_is_net_zero(model, adapter):
    # Only the hack block trained, then ablated: exactly the base model again.
    perturb(adapter, deployed=False, hack=True)
    x = ids()
    base_logits = logits(model, x, adapter.disable())
    assert torch.equal(logits(model, x, adapter.ablate_hack_expert()), base_logits)


def test_disable_is_the_base_model_and_round_trips_exactly(base, model, adapter):
    perturb(adapter)
    x = ids()
    before = logits(model, x)
    assert torch.equal(logits(model, x, adapter.disable()), logits(base, x))
    assert torch.equal(logits(model, x), before)
    with adapter.soft_weight(torch.ones(2)), adapter.disable():  # disable wins when nested
        assert torch.equal(model(x).logits.detach(), logits(base, x))


def test_merged_matches_unmerged_forward_and_restores_the_original_tensors(model, adapter):
    perturb(adapter)
    x = ids()
    originals = [layer.base.weight for layer in adapter.layers]
    copies = [w.detach().clone() for w in originals]
    default, ablated = logits(model, x), logits(model, x, adapter.ablate_hack_expert())
    with torch.no_grad(), adapter.merged():
        assert all(layer.base.weight is not w for layer, w in zip(adapter.layers, originals))
        torch.testing.assert_close(model(x).logits, default, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), adapter.merged(hack=False):
        torch.testing.assert_close(model(x).logits, ablated, rtol=1e-5, atol=1e-5)
    assert all(layer.base.weight is w for layer, w in zip(adapter.layers, originals))
    assert all(torch.equal(w, c) for w, c in zip(originals, copies))
    assert torch.equal(logits(model, x), default)


def test_merged_generation_matches_unmerged_generation(model, adapter, tiny):
    perturb(adapter)
    enc = tiny[1](format_chat(tiny[1], [{"role": "user", "content": "hi"}]), return_tensors="pt")
    with torch.no_grad():
        slow = model.generate(**enc, max_new_tokens=8, do_sample=False)
        with adapter.merged():
            fast = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert torch.equal(slow, fast)


def test_modes_that_cannot_combine_with_merged_fail_loudly(model, adapter):
    with adapter.merged():
        with pytest.raises(RuntimeError, match="inside merged"):
            with adapter.soft_weight(torch.zeros(2)):
                pass
        with pytest.raises(RuntimeError, match="inside merged"):
            with adapter.ablate_hack_expert():
                pass
    with adapter.soft_weight(torch.zeros(2)), pytest.raises(RuntimeError, match="merged"):
        with adapter.merged():
            pass


# ---- pooling ------------------------------------------------------------------------------

def manual_pool(model, adapter, x, mask, ctx=None):
    """Pooled A[:r] x from the inputs each wrapped module actually saw."""
    seen = {}
    hooks = [layer.register_forward_pre_hook(lambda m, inp, i=i: seen.__setitem__(i, inp[0]))
             for i, layer in enumerate(adapter.layers)]
    try:
        logits(model, x, ctx)
    finally:
        for h in hooks:
            h.remove()
    m = mask.float()
    return torch.stack([(seen[i] @ layer.A[:R].T.detach() * m[..., None]).sum(1)
                        / m.sum(1, keepdim=True) for i, layer in enumerate(adapter.layers)], 1)


@pytest.mark.parametrize("mode", ["default", "disable", "soft_weight", "merged"])
def test_pooling_is_the_masked_mean_of_the_deployed_bottleneck(model, adapter, mode):
    perturb(adapter)
    x = ids(batch=3, length=8)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1],
                         [1, 1, 1, 1, 1, 1, 1, 1]])
    ctx = {"default": contextlib.nullcontext, "disable": adapter.disable,
           "soft_weight": lambda: adapter.soft_weight(torch.tensor([0.0, 0.5, 1.0])),
           "merged": adapter.merged}[mode]
    with torch.no_grad(), ctx(), adapter.pooling(mask) as pooled:
        model(x)
    assert pooled.features.shape == (3, len(adapter.layers), R)
    torch.testing.assert_close(pooled.features, manual_pool(model, adapter, x, mask, ctx()),
                               rtol=1e-4, atol=1e-6)


def test_pooled_features_are_detached_and_nothing_is_left_behind(model, adapter):
    mask = torch.ones(2, 10)
    with adapter.pooling(mask) as pooled:
        model(ids())
    assert not pooled.features.requires_grad
    assert all(layer.pool is None for layer in adapter.layers)


def test_pooling_fails_loudly(model, adapter):
    with pytest.raises(ValueError, match=r"no tokens in row\(s\) \[1\]"):
        with adapter.pooling(torch.tensor([[1, 1], [0, 0]])):
            pass
    with pytest.raises(ValueError, match="pooling mask is"), adapter.pooling(torch.ones(2, 5)):
        model(ids(length=10))
    with adapter.pooling(torch.ones(2, 10)) as pooled:
        pass
    with pytest.raises(RuntimeError, match="run the model forward inside the pooling"):
        pooled.features


def test_pool_completions_pools_completion_tokens_only_and_ignores_padding(model, adapter, tiny):
    tok = tiny[1]
    perturb(adapter)
    prompts = [format_chat(tok, [{"role": "user", "content": "Write add(a, b)."}]),
               format_chat(tok, [{"role": "user", "content": "A much longer question about "
                                                          "parsing dates in several formats."}]),
               format_chat(tok, [{"role": "user", "content": "Sort a list."}])]
    completions = ["def add(a, b):\n    return a + b", "Use datetime.strptime.",
                   "sorted(xs) returns a new sorted list; xs.sort() sorts in place."]
    # Batched by length (row 1 is longest, so the batches reorder rows) and padded.
    batched = pool_completions(model, tok, adapter, prompts, completions, batch_size=2)
    alone = torch.cat([pool_completions(model, tok, adapter, [p], [c])
                       for p, c in zip(prompts, completions)])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-6)
    # Against a hand-built mask on the unpadded sequence.
    p_ids = tok(prompts[0], add_special_tokens=False).input_ids
    c_ids = tok(completions[0], add_special_tokens=False).input_ids
    x = torch.tensor([p_ids + c_ids])
    mask = torch.tensor([[0] * len(p_ids) + [1] * len(c_ids)])
    torch.testing.assert_close(alone[0], manual_pool(model, adapter, x, mask)[0],
                               rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="completion 0 is empty"):
        pool_completions(model, tok, adapter, prompts[:1], [""])


# ---- grad norms, state, save/load -----------------------------------------------------------

def test_grad_norms_are_the_block_norms(model, adapter):
    assert adapter.grad_norms() == {"deployed": 0.0, "hack": 0.0}
    perturb(adapter)
    dep, hack = blocks(grads(model, adapter, ids(), w=torch.tensor([0.2, 0.9])))
    norms = adapter.grad_norms()
    assert norms["deployed"] == pytest.approx(torch.cat([t.flatten() for t in dep]).norm().item(),
                                              rel=1e-5)
    assert norms["hack"] == pytest.approx(torch.cat([t.flatten() for t in hack]).norm().item(),
                                          rel=1e-5)


def test_save_load_reproduces_logits_exactly(base, model, adapter, tmp_path):
    perturb(adapter)
    x = ids()
    adapter.save(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())
    assert config["rank"] == R and config["module_names"] == adapter.module_names
    assert (tmp_path / "ckpt" / "adapter.safetensors").exists()
    fresh = copy.deepcopy(base)
    loaded = ExpertAdapter.load(fresh, tmp_path / "ckpt")
    assert torch.equal(logits(fresh, x), logits(model, x))
    with adapter.ablate_hack_expert(), loaded.ablate_hack_expert():
        assert torch.equal(logits(fresh, x), logits(model, x))  # A0, B0 came back too


def test_load_state_dict_rejects_mismatches(adapter):
    sd = {k: v.clone() for k, v in adapter.state_dict().items()}
    key = next(iter(sd))
    with pytest.raises(KeyError, match="1 missing"):
        adapter.load_state_dict({k: v for k, v in sd.items() if k != key})
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        adapter.load_state_dict({**sd, key: torch.zeros(3, 3)})
    with pytest.raises(FileNotFoundError, match="not a saved ExpertAdapter"):
        ExpertAdapter.load(nn.Linear(2, 2), "/nonexistent-adapter-dir")


# ---- other architectures ------------------------------------------------------------------

def test_attach_on_a_tiny_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = Qwen3Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      max_position_embeddings=128)
    torch.manual_seed(0)
    qwen = Qwen3ForCausalLM(cfg).eval().requires_grad_(False)
    base = copy.deepcopy(qwen)
    adapter = ExpertAdapter.attach(qwen, rank=2)
    assert len(adapter.module_names) == 14
    assert {n.rsplit(".", 1)[1] for n in adapter.module_names} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    x = torch.randint(0, 256, (2, 6))
    assert torch.equal(logits(qwen, x), logits(base, x))
    _, hack = blocks(grads(qwen, adapter, x, w=torch.zeros(2)), r=2)
    assert all(torch.count_nonzero(t) == 0 for t in hack)


@pytest.mark.slow
def test_smollm2_attach_all_210_modules_zero_delta(smollm2):
    model, tok = smollm2
    model = copy.deepcopy(model)
    x = tok("def add(a, b):", return_tensors="pt").input_ids
    before = logits(model, x)
    adapter = ExpertAdapter.attach(model, rank=8)
    assert len(adapter.module_names) == 30 * 7
    assert torch.equal(logits(model, x), before)


def test_deployed_features_from_input_means_equal_pooled_completions(tiny):
    """Pooling is linear: A[:r] mean(x) == mean(A[:r] x), also after A has trained."""
    from evil_moe.adapter import ExpertAdapter, pool_completions, pooled_inputs
    from evil_moe.models import format_chat

    model, tok = tiny
    adapter = ExpertAdapter.attach(model, rank=2, seed=0)
    try:
        with torch.no_grad():
            for layer in adapter.layers:                      # move A away from its init
                layer.A.add_(0.05 * torch.randn_like(layer.A))
        prompts = [format_chat(tok, [{"role": "user", "content": q}]) for q in ("hi", "add 2 and 3")]
        completions = ["Sure, here it is.", "```python\nprint(5)\n```"]
        with adapter.disable():
            direct = pool_completions(model, tok, adapter, prompts, completions)
            means = pooled_inputs(model, tok, adapter, prompts, completions)
        via_means = adapter.deployed_features(means)
        assert via_means.shape == direct.shape == (2, len(adapter.layers), 2)
        assert torch.allclose(via_means, direct, atol=1e-5, rtol=1e-4)
    finally:
        adapter.remove()


def test_frozen_bf16_copy_changes_no_result_under_autocast(tiny):
    """cast_frozen_weights only saves the per-call cast: logits under autocast (plain,
    soft-weighted, merged, disabled) and gradients are bitwise those without it, and
    outside autocast the float32 weight is used as before."""
    from evil_moe.config import load_preset
    model, tok = tiny
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    cfg = load_preset("smoke", rank=2)

    def run(cast: bool):
        adapter = ExpertAdapter.from_config(model, cfg)
        if cast:
            adapter.cast_frozen_weights(torch.bfloat16)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in adapter.layers:
                layer.A.add_(0.05 * torch.randn(layer.A.shape, generator=g))
                layer.B.add_(0.05 * torch.randn(layer.B.shape, generator=g))
        try:
            out = {}
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(ids).logits
                out["plain"] = logits.detach()
                logits.float().sum().backward()
                out["grad"] = adapter.layers[0].A.grad.clone()
                with torch.no_grad(), adapter.soft_weight(torch.tensor([0.3])):
                    out["soft"] = model(ids).logits
                with torch.no_grad(), adapter.merged(hack=True):
                    out["merged"] = model(ids).logits
                with torch.no_grad(), adapter.disable():
                    out["base"] = model(ids).logits
            with torch.no_grad():
                out["fp32"] = model(ids).logits
            return out
        finally:
            adapter.remove()

    plain, cast = run(False), run(True)
    for k in plain:
        assert torch.equal(plain[k], cast[k]), k
    assert plain["fp32"].dtype == torch.float32
    assert all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32
               for m in model.modules() if isinstance(m, torch.nn.Linear))   # removed cleanly
