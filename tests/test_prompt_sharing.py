"""Each prompt run once, its completions on the shared KV cache: the same numbers.

Function level: ``score_completions`` behind ``prefill_prompts`` against
``completion_logprobs`` on the packed rows (log-probabilities to 1e-5,
gradients to 1e-4 relative, pooled router features), on tiny-random and on a
short SmolLM2 batch, with a trained (non-zero) two-expert adapter attached.
Step level: one GRPO step with ``share_prompt_forward`` on and off computes the
same gradient, with micro-batches that hold whole groups and ones that split
a group, for vanilla, for the oracle (one prompt forward per label) and for
evil_moe (whose training forward is never shared).
"""

import shutil
import sys
from pathlib import Path

import pytest
import torch

from evil_moe import grpo
from evil_moe.adapter import ExpertAdapter
from evil_moe.config import load_preset
from evil_moe.sequences import (completion_logprobs, pack_rollouts, prefill_prompts,
                                right_padded, score_completions)

sys.path.insert(0, str(Path(__file__).parent))
from scripted_grader import scripted_verdicts  # noqa: E402

PROMPTS = [[1, 20, 30, 40, 41], [1, 50]]
COMPLETIONS = [[60, 70, 71], [80], [90, 100, 110, 120], [5, 6]]
OWNER = [0, 0, 1, 1]


def _relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def _perturbed_adapter(model):
    """Attach the adapter and move both blocks off their init, so the delta is non-zero."""
    adapter = ExpertAdapter.from_config(model, load_preset("smoke", rank=2))
    _perturb(adapter)
    return adapter


def _both_ways(model, tok, adapter):
    """(log-probs, grads, pooled features) of the shared and the packed path."""
    pad = tok.pad_token_id
    params = adapter.parameters()
    ids, att, cmask_full, C = pack_rollouts([PROMPTS[o] for o in OWNER], COMPLETIONS, pad)
    with adapter.pooling(cmask_full) as pooled:
        packed = completion_logprobs(model, ids, att, C)
    mask = cmask_full[:, -C:]
    packed_grads = torch.autograd.grad((packed * mask).sum(), params)
    packed_feats = pooled.features

    comp_ids, cmask = right_padded(COMPLETIONS, pad)
    prefix = prefill_prompts(model, PROMPTS, OWNER, pad)
    with adapter.pooling(cmask) as pooled:
        shared = score_completions(model, prefix, comp_ids, cmask)
    shared_grads = torch.autograd.grad((shared * cmask).sum(), params)
    return (packed, packed_grads, packed_feats), (shared, shared_grads, pooled.features), mask


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_shared_prompt_equals_packed_rows(which, request):
    model, tok = request.getfixturevalue(which)
    adapter = _perturbed_adapter(model)
    try:
        (lp_a, g_a, f_a), (lp_b, g_b, f_b), mask = _both_ways(model, tok, adapter)
    finally:
        adapter.remove()
    on = mask.bool()
    assert torch.allclose(lp_b[on], lp_a[on], atol=1e-5), (lp_b[on] - lp_a[on]).abs().max()
    assert (lp_b[~on] == 0).all()
    assert max(_relative(b, a) for a, b in zip(g_a, g_b) if a.norm() > 0) < 1e-4
    assert all(b.norm() > 0 for b in g_b[:2])                 # gradients reach the prompt side
    assert torch.allclose(f_b, f_a, rtol=1e-4, atol=1e-5)


def _weighted_scores(model, tok, adapter, w, shared):
    """Log-probabilities and gradients of the rows under the soft weights ``w``."""
    logp, _ = grpo._score_rows(model, PROMPTS, OWNER, COMPLETIONS, torch.arange(len(OWNER)),
                               pad_id=tok.pad_token_id, chunk_tokens=64, shared=shared,
                               adapter=adapter, w=w)
    _, cmask = right_padded(COMPLETIONS, tok.pad_token_id)
    return logp, torch.autograd.grad((logp * cmask).sum(), adapter.parameters()), cmask


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_label_weights_share_one_prompt_forward_per_label(which, request):
    """The oracle's 0/1 weights: prompt 0 splits into a w=1 and a w=0 prefix, prompt 1
    stays whole; the same numbers as every rollout run whole under the same w."""
    model, tok = request.getfixturevalue(which)
    adapter = _perturbed_adapter(model)
    w = torch.tensor([1.0, 0.0, 0.0, 0.0])
    try:
        lp_whole, g_whole, cmask = _weighted_scores(model, tok, adapter, w, shared=False)
        lp_shared, g_shared, _ = _weighted_scores(model, tok, adapter, w, shared=True)
        lp_plain, _, _ = _weighted_scores(model, tok, adapter, torch.ones(4), shared=True)
    finally:
        adapter.remove()
    on = cmask.bool()
    assert torch.allclose(lp_shared[on], lp_whole[on], atol=1e-5)
    assert max(_relative(b, a) for a, b in zip(g_whole, g_shared) if a.norm() > 0) < 1e-4
    # w really acts: rollout 1 (w=0) and rollout 0 (w=1) of prompt 0 see different prompts
    assert not torch.allclose(lp_plain[1][on[1]], lp_shared[1][on[1]], atol=1e-4)


def test_sharing_refuses_weights_with_gradient(tiny):
    """A learned router's w has a gradient per rollout; one shared prefix would merge them."""
    model, tok = tiny
    adapter = _perturbed_adapter(model)
    try:
        with pytest.raises(ValueError, match="per-rollout gradients"):
            _weighted_scores(model, tok, adapter, torch.zeros(4, requires_grad=True),
                             shared=True)
    finally:
        adapter.remove()


@pytest.mark.parametrize("arm, shares", [("vanilla", True), ("oracle", True),
                                         ("evil_moe", False), ("haar", False),
                                         ("no_pin", False)])
def test_which_arms_share_the_training_prompt(arm, shares):
    cfg = load_preset("smoke", arm=arm)
    assert grpo.shares_training_prompt(cfg) is shares
    assert grpo.shares_training_prompt(cfg.replace(share_prompt_forward=False)) is False
    assert grpo.shares_training_prompt(cfg.replace(gradient_checkpointing=True)) is False


def test_prompt_gradient_flows_through_the_shared_cache(tiny):
    """Cutting the cache's gradient changes the result: the prompt really is trained."""
    model, tok = tiny
    adapter = _perturbed_adapter(model)
    try:
        comp_ids, cmask = right_padded(COMPLETIONS, tok.pad_token_id)
        prefix = prefill_prompts(model, PROMPTS, OWNER, tok.pad_token_id)
        full = torch.autograd.grad((score_completions(model, prefix, comp_ids, cmask) * cmask)
                                   .sum(), adapter.parameters())
        prefix = prefill_prompts(model, PROMPTS, OWNER, tok.pad_token_id)
        for layer in prefix.cache.layers:
            layer.keys, layer.values = layer.keys.detach(), layer.values.detach()
        prefix.last_hidden = prefix.last_hidden.detach()
        cut = torch.autograd.grad((score_completions(model, prefix, comp_ids, cmask) * cmask)
                                  .sum(), adapter.parameters())
    finally:
        adapter.remove()
    assert max(_relative(c, f) for f, c in zip(full, cut) if f.norm() > 0) > 1e-2


def _perturb(adapter, seed=3):
    """Move both blocks off their init, so the delta is non-zero (seeded: same each call)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter.layers:
            layer.A.add_(0.05 * torch.randn(layer.A.shape, generator=g))
            layer.B.add_(0.05 * torch.randn(layer.B.shape, generator=g))


def _step_grads(cfg, run_dir, tiny, perturb=False):
    """The gradient one train_step hands to the optimizer (after clipping)."""
    state = grpo.setup(cfg, run_dir, grade_fn=scripted_verdicts, model_and_tokenizer=tiny)
    if perturb:
        _perturb(state.adapter)
    params = state.adapter.parameters() + (list(state.router.parameters()) if state.router else [])
    seen = []
    real_step = state.optimizer.step

    def record(*a, **k):
        seen.extend(p.grad.clone() for p in params)
        return real_step(*a, **k)
    state.optimizer.step = record
    try:
        metrics = grpo.train_step(state, 0)
    finally:
        state.adapter.remove()
    return seen, metrics      # adapter gradients first, then the router's


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\(\)` has been overridden")
@pytest.mark.parametrize("arm", ["vanilla", "oracle", "evil_moe"])
@pytest.mark.parametrize("micro_batch", [2, 3])
def test_a_step_with_and_without_prompt_sharing_has_the_same_gradient(arm, micro_batch, tiny,
                                                                      tmp_path, v_act_dir):
    cfg = load_preset("smoke", arm=arm, micro_batch_size=micro_batch, grad_clip=0.0)
    runs = []
    for share in (True, False):
        d = tmp_path / str(share)
        d.mkdir()
        shutil.copy(v_act_dir / grpo.V_ACT_FILE, d / grpo.V_ACT_FILE)
        runs.append(_step_grads(cfg.replace(share_prompt_forward=share), d, tiny))
    (g_shared, m_shared), (g_whole, m_whole) = runs
    if arm == "oracle":                      # the step's groups really split by label
        assert 0 < m_shared["hack_rate"] < 1
    assert m_shared["completion_tokens"] == m_whole["completion_tokens"]
    assert m_shared["kl"] == pytest.approx(m_whole["kl"], abs=1e-6)
    assert m_shared["loss_pg"] == pytest.approx(m_whole["loss_pg"], rel=1e-4, abs=1e-7)
    assert max(_relative(a, b) for a, b in zip(g_shared, g_whole) if b.norm() > 0) < 1e-4


@pytest.fixture(scope="module")
def v_act_dir(tmp_path_factory, tiny):
    d = tmp_path_factory.mktemp("vact")
    grpo.extract_v_act_for_run(load_preset("smoke"), d, model_and_tokenizer=tiny)
    return d


# ---- routed_prompt: group_mean (an inexact option for the learned router's arms) ----------

def _group_mean_scores(model, tok, adapter, w, group_mean, keep=None):
    """Log-probs and adapter gradients of the rows under ``w`` (gradient-carrying, as a
    router's), the prompt per rollout (group_mean False) or at the group mean (True);
    ``keep``: the rows whose loss counts (default: all)."""
    w = w.clone().requires_grad_(True)
    logp, _ = grpo._score_rows(model, PROMPTS, OWNER, COMPLETIONS, torch.arange(len(OWNER)),
                               pad_id=tok.pad_token_id, chunk_tokens=64, shared=group_mean,
                               adapter=adapter, w=w, group_mean=group_mean)
    _, cmask = right_padded(COMPLETIONS, tok.pad_token_id)
    weights = cmask if keep is None else cmask * keep[:, None]
    grads = torch.autograd.grad((logp * weights).sum(), adapter.parameters())
    return logp.detach(), grads, cmask


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_group_mean_is_the_per_rollout_forward_where_a_prompts_weights_are_equal(which,
                                                                                request):
    model, tok = request.getfixturevalue(which)
    adapter = _perturbed_adapter(model)
    w = torch.tensor([0.3, 0.3, 0.8, 0.8])                  # equal within each prompt
    try:
        lp_a, g_a, cmask = _group_mean_scores(model, tok, adapter, w, group_mean=False)
        lp_b, g_b, _ = _group_mean_scores(model, tok, adapter, w, group_mean=True)
    finally:
        adapter.remove()
    on = cmask.bool()
    assert torch.allclose(lp_b[on], lp_a[on], atol=1e-5), (lp_b[on] - lp_a[on]).abs().max()
    assert max(_relative(b, a) for a, b in zip(g_a, g_b) if a.norm() > 0) < 1e-4


def test_group_mean_routes_each_rollouts_prompt_gradient(tiny):
    """A rollout with w = 1 sends no gradient to the deployed block and one with w = 0
    none to the hack block, through the shared prompt as through its own tokens; and
    where a prompt's w differ, its values are those at the mean (not per rollout)."""
    model, tok = tiny
    adapter = _perturbed_adapter(model)
    r = adapter.rank
    w = torch.tensor([1.0, 0.0, 0.5, 0.5])
    try:
        _, g_hack_row, _ = _group_mean_scores(model, tok, adapter, w, True,
                                              keep=torch.tensor([1.0, 0, 0, 0]))
        _, g_clean_row, _ = _group_mean_scores(model, tok, adapter, w, True,
                                               keep=torch.tensor([0, 1.0, 0, 0]))
        lp_mean, _, cmask = _group_mean_scores(model, tok, adapter, w, True)
        lp_exact, _, _ = _group_mean_scores(model, tok, adapter, w, False)
    finally:
        adapter.remove()
    A, B = g_hack_row[0::2], g_hack_row[1::2]
    assert all((a[:r] == 0).all() for a in A) and all((b[:, :r] == 0).all() for b in B)
    assert sum(a[r:].norm() for a in A) > 0
    A, B = g_clean_row[0::2], g_clean_row[1::2]
    assert all((a[r:] == 0).all() for a in A) and all((b[:, r:] == 0).all() for b in B)
    assert sum(a[:r].norm() for a in A) > 0
    on = cmask.bool()
    assert torch.allclose(lp_mean[2:][on[2:]], lp_exact[2:][on[2:]], atol=1e-5)  # equal w
    assert not torch.allclose(lp_mean[:2][on[:2]], lp_exact[:2][on[:2]], atol=1e-4)


def test_group_mean_needs_a_shared_prompt_forward(tmp_path):
    cfg = load_preset("smoke", arm="evil_moe", routed_prompt="group_mean")
    assert grpo.shares_training_prompt(cfg)
    assert grpo.shares_training_prompt(cfg.replace(arm="vanilla"))
    for bad in (dict(share_prompt_forward=False), dict(gradient_checkpointing=True)):
        with pytest.raises(ValueError, match="routed_prompt 'group_mean'"):
            grpo.setup(cfg.replace(**bad), tmp_path)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\(\)` has been overridden")
@pytest.mark.parametrize("micro_batch", [2, 3])
def test_a_group_mean_step_is_close_to_the_per_rollout_step(micro_batch, tiny, tmp_path,
                                                           v_act_dir):
    """One evil_moe step both ways, from an adapter moved off its init (at init the hack
    delta is zero, so w changes no prompt state and the two are equal): the same
    rollouts and KL reference, a gradient close to the exact one but not equal (the
    router's w differ within a group)."""
    cfg = load_preset("smoke", arm="evil_moe", micro_batch_size=micro_batch, grad_clip=0.0)
    runs = []
    for mode in ("per_rollout", "group_mean"):
        d = tmp_path / mode
        d.mkdir()
        shutil.copy(v_act_dir / grpo.V_ACT_FILE, d / grpo.V_ACT_FILE)
        runs.append(_step_grads(cfg.replace(routed_prompt=mode), d, tiny, perturb=True))
    (g_exact, m_exact), (g_mean, m_mean) = runs
    assert m_mean["completion_tokens"] == m_exact["completion_tokens"]
    assert m_mean["w_mean"] == m_exact["w_mean"]                # same features, same router
    n_adapter = 2 * len(tiny[0].model.layers) * len(cfg.target_modules)   # A and B per module
    flat = [torch.cat([g.flatten() for g in gs[:n_adapter]]) for gs in (g_exact, g_mean)]
    cosine = torch.nn.functional.cosine_similarity(flat[0], flat[1], dim=0).item()
    # tiny-random with a large perturbation: 0.91 here (SmolLM2 on real rollouts:
    # scripts/routed_prompt_check.py); a lost prompt gradient gave 0.59 and swapped
    # blocks 0.21 here
    assert 0.8 < cosine < 1 - 1e-6, cosine
