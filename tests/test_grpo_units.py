"""GRPO's pure pieces on hand-computed examples."""

import math

import pytest
import torch

from evil_moe.grpo import (group_advantages, k3_kl, policy_terms, step_problem_indices,
                           warmup_cosine)
from evil_moe.sequences import completion_logprobs, pack_rollouts


def test_group_advantages_hand_computed():
    r = torch.tensor([[3.5, 0.5, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0]])
    # group 1: mean 1.25, population std sqrt(0.75*... ) = 1.299038
    std = math.sqrt(((3.5 - 1.25) ** 2 + 3 * (0.5 - 1.25) ** 2) / 4)
    a = group_advantages(r, scale=True, eps=0.0)
    assert torch.allclose(a[0], torch.tensor([2.25, -0.75, -0.75, -0.75]) / std)
    assert torch.equal(group_advantages(r, scale=True)[1], torch.zeros(4))   # no signal
    assert torch.allclose(group_advantages(r, scale=False)[0], torch.tensor([2.25, -.75, -.75, -.75]))


def test_k3_is_zero_at_equality_and_positive_elsewhere():
    lp = torch.tensor([-1.0, -2.0])
    assert torch.equal(k3_kl(lp, lp), torch.zeros(2))
    d = torch.tensor(0.3)
    assert torch.isclose(k3_kl(torch.tensor(-1.0), torch.tensor(-0.7)), d.exp() - d - 1)


def test_policy_terms_on_a_tiny_example():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0, -3.0], [-0.5, -0.5, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])       # last column is padding
    pg, kl = policy_terms(logp, ref, adv, mask, n_tokens=4)
    assert pg.item() == pytest.approx(-(2 + 2 - 1 - 1) / 4)        # ratio == 1 on-policy
    assert kl.item() == pytest.approx((math.e - 1 - 1) / 4)        # only token (0,1) differs
    pg.backward()
    # d pg / d logp = -adv / n_tokens on unmasked tokens, 0 on padding
    assert torch.allclose(logp.grad, torch.tensor([[-.5, -.5, 0], [.25, .25, 0]]))


def test_pack_rollouts_aligns_completions():
    ids, att, comp, C = pack_rollouts([[5, 6], [7]], [[8], [9, 10, 11]], pad_id=0)
    assert C == 3
    assert ids.tolist() == [[5, 6, 8, 0, 0], [0, 7, 9, 10, 11]]
    assert att.tolist() == [[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]]
    assert comp.tolist() == [[0, 0, 1, 0, 0], [0, 0, 1, 1, 1]]


def test_completion_logprobs_match_unpadded_rows(tiny):
    model, tok = tiny
    prompts = [[1, 20, 30, 40], [1, 50]]
    completions = [[60, 70], [80, 90, 100]]
    ids, att, comp, C = pack_rollouts(prompts, completions, tok.pad_token_id)
    lp = completion_logprobs(model, ids, att, C)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        full = torch.tensor([p + c])
        logits = model(full).logits[0, len(p) - 1:-1].float().log_softmax(-1)
        expected = logits.gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        got = lp[i][comp[i, -C:].bool()]
        assert torch.allclose(got, expected, atol=1e-5), (got, expected)


def test_step_problems_are_seeded_and_distinct():
    a = step_problem_indices(50, seed=1, step=3, k=8)
    assert a == step_problem_indices(50, seed=1, step=3, k=8)
    assert len(set(a)) == 8 and a != step_problem_indices(50, seed=1, step=4, k=8)
    assert len(step_problem_indices(3, 0, 0, 8)) == 3


def test_warmup_cosine_schedule():
    f = warmup_cosine(warmup=2, total=10)
    assert f(0) == pytest.approx(1 / 3) and f(1) == pytest.approx(2 / 3)
    assert f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.1)
    assert f(6) < f(3)
