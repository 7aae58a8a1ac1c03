"""HackRouter and the pin loss."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from evil_moe.adapter import ExpertAdapter
from evil_moe.pairs import load_pairs
from evil_moe.router import HackRouter, pin_loss
from evil_moe.vact import haar_direction, pair_features, projections

M, R = 5, 3


def feats(n, seed):
    return torch.randn(n, M, R, generator=torch.Generator().manual_seed(seed))


def test_router_from_a_direction_reproduces_its_dot_products_up_to_scale_and_bias():
    direction = haar_direction(M, R, seed=0)
    x = feats(6, 1)
    router = HackRouter(direction)
    assert torch.equal(router.gate.detach(), direction)
    dots = torch.stack([sum(direction[m] @ x[n, m] for m in range(M)) for n in range(6)])
    torch.testing.assert_close(router.logits(x), dots)  # scale 1, bias 0 at construction
    with torch.no_grad():
        router.scale.fill_(2.5)
        router.bias.fill_(-0.7)
    torch.testing.assert_close(router.logits(x), 2.5 * dots - 0.7)
    w = router(x)
    torch.testing.assert_close(w, torch.sigmoid(2.5 * dots - 0.7))
    assert w.shape == (6,) and bool(((w > 0) & (w < 1)).all())


def test_router_learns_gate_scale_and_bias_from_detached_features():
    router = HackRouter(haar_direction(M, R, seed=0))
    router(feats(4, 2)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router.parameters())
    assert {n for n, _ in router.named_parameters()} == {"gate", "scale", "bias"}


def test_calibrate_sets_z_scored_logits_centred_between_the_sides():
    direction = haar_direction(M, R, seed=0)
    clean = feats(20, 3)
    hack = clean + 0.8 * direction  # hack side shifted along the direction
    router = HackRouter(direction)
    router.calibrate(hack, clean)
    lh, lc = router.logits(hack).detach(), router.logits(clean).detach()
    assert lh.mean() > 0 > lc.mean()
    torch.testing.assert_close((lh.mean() + lc.mean()) / 2, torch.tensor(0.0), atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(torch.cat([lh, lc]).std(unbiased=False), torch.tensor(1.0))
    # Anti-aligned direction: the scale turns negative, the hack side stays positive.
    flipped = HackRouter(-direction)
    flipped.calibrate(hack, clean)
    assert flipped.scale.item() < 0
    torch.testing.assert_close(flipped.logits(hack), router.logits(hack))


def test_calibrate_rejects_degenerate_features():
    router = HackRouter(haar_direction(M, R, seed=0))
    with pytest.raises(ValueError, match="cannot calibrate"):
        router.calibrate(torch.zeros(4, M, R), torch.zeros(4, M, R))


def test_pin_loss_is_bce_towards_one_on_hack_and_zero_on_clean():
    router = HackRouter(haar_direction(M, R, seed=0))
    hack, clean = feats(4, 4), feats(4, 5)
    wh, wc = router(hack), router(clean)
    expected = -(torch.log(wh).sum() + torch.log(1 - wc).sum()) / 8
    torch.testing.assert_close(pin_loss(router, hack, clean), expected)


def test_router_rejects_wrong_feature_shapes():
    router = HackRouter(haar_direction(M, R, seed=0))
    with pytest.raises(ValueError, match=r"router expects features \[B, 5, 3\], got \(2, 4, 3\)"):
        router(torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match=r"direction must be \[M, r\]"):
        HackRouter(torch.zeros(5))


def test_a_few_pin_loss_steps_separate_the_authored_pairs(tiny):
    """From a Haar-random gate, the pin loss alone learns to tell hack from clean sides."""
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    adapter = ExpertAdapter.attach(model, rank=8)
    hack, clean = pair_features(model, tok, adapter, load_pairs())
    start_gate = haar_direction(len(adapter.module_names), 8, seed=0)
    router = HackRouter(start_gate)
    opt = torch.optim.Adam(router.parameters(), lr=0.1)
    start = pin_loss(router, hack, clean).item()
    for _ in range(150):
        opt.zero_grad()
        loss = pin_loss(router, hack, clean)
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * start
    with torch.no_grad():
        wh, wc = router(hack), router(clean)
    assert wh.min() > 0.5 > wc.max(), (wh, wc)
    # The gate itself is learned, not only scale and bias.
    assert not torch.allclose(router.gate.detach(), start_gate)


def test_projections_and_router_agree_on_real_pair_features(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    adapter = ExpertAdapter.attach(model, rank=2)
    hack, _ = pair_features(model, tok, adapter, load_pairs()[:3])
    d = haar_direction(len(adapter.module_names), 2, seed=1)
    torch.testing.assert_close(HackRouter(d).logits(hack), projections(d, hack))


# ---- router options: group centring, batch calibration -------------------------------------

from evil_moe.router import center_groups, center_pairs  # noqa: E402


def test_group_centring_is_invariant_to_a_constant_per_group_and_centres_each_group():
    x = feats(6, 7)                                         # 3 groups of 2
    shift = torch.randn(3, 1, M, R).expand(3, 2, M, R).reshape(6, M, R)
    torch.testing.assert_close(center_groups(x + shift, 2), center_groups(x, 2))
    c = center_groups(x, 3)                                 # 2 groups of 3
    torch.testing.assert_close(c.view(2, 3, M, R).mean(1), torch.zeros(2, M, R), atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(c[:3], x[:3] - x[:3].mean(0))
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        center_groups(x, 4)


def test_pair_centring_makes_each_pair_a_group_of_two():
    h, c = feats(4, 8), feats(4, 9)
    hc, cc = center_pairs(h, c)
    torch.testing.assert_close(hc, (h - c) / 2)
    torch.testing.assert_close(cc, -(h - c) / 2)
    hc2, _ = center_pairs(h + 5.0, c + 5.0)                  # a shared prompt offset cancels
    torch.testing.assert_close(hc2, hc)


def test_batch_calibration_standardises_the_batch_with_its_own_statistics_and_no_labels():
    router = HackRouter(haar_direction(M, R, seed=0), calibration="batch")
    x = 3.0 * feats(32, 10) + 1.5
    router.observe(x)                                       # features only: no labels to give
    z = router.logits(x).detach()                           # scale 1, bias 0
    torch.testing.assert_close(z.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(unbiased=False), torch.tensor(1.0), atol=1e-4, rtol=0)
    # invariant to an affine change of the batch's projections (what 'pairs' calibration is not)
    router2 = HackRouter(haar_direction(M, R, seed=0), calibration="batch")
    router2.observe(2 * x)
    torch.testing.assert_close(router2.logits(2 * x), router.logits(x), atol=1e-4, rtol=0)
    # gradient still reaches the gate through the projections
    router.logits(x).pow(2).sum().backward()
    assert router.gate.grad.abs().sum() > 0


def test_running_statistics_update_as_documented_and_serve_eval_mode():
    d = haar_direction(M, R, seed=0)
    router = HackRouter(d, calibration="batch", momentum=0.25)
    b1, b2 = feats(16, 11), 2.0 * feats(16, 12) + 1.0
    p1, p2 = projections(d, b1), projections(d, b2)
    router.observe(b1)                                       # the first batch sets them
    torch.testing.assert_close(router.running_mean, p1.mean())
    torch.testing.assert_close(router.running_std, p1.std(unbiased=False), rtol=1e-4, atol=1e-6)
    router.observe(b2)
    mean = 0.75 * p1.mean() + 0.25 * p2.mean()
    std = 0.75 * p1.std(unbiased=False) + 0.25 * p2.std(unbiased=False)
    torch.testing.assert_close(router.running_mean, mean)
    torch.testing.assert_close(router.running_std, std, rtol=1e-4, atol=1e-6)
    assert int(router.num_batches) == 2
    torch.testing.assert_close(router.logits(b2), (p2 - p2.mean()) / p2.std(unbiased=False),
                               rtol=1e-4, atol=1e-4)     # training: this step's statistics
    router.eval()
    torch.testing.assert_close(router.logits(b2), (p2 - mean) / std, rtol=1e-4, atol=1e-4)
    # the running statistics are saved and loaded with the router
    loaded = HackRouter(haar_direction(M, R, seed=5), calibration="batch")
    loaded.load_state_dict(router.state_dict())
    torch.testing.assert_close(loaded.eval().logits(b2), router.logits(b2))


def test_pairs_calibration_keeps_its_old_state_and_refuses_observe():
    router = HackRouter(haar_direction(M, R, seed=0))
    assert set(router.state_dict()) == {"gate", "scale", "bias"}
    with pytest.raises(RuntimeError, match="router_calibration='batch' only"):
        router.observe(feats(4, 1))


def test_batch_calibration_lets_the_pairs_orient_the_sign_only():
    direction = haar_direction(M, R, seed=0)
    clean = feats(20, 3)
    hack = clean + 0.8 * direction
    router = HackRouter(-direction, calibration="batch")
    router.calibrate(hack, clean)
    assert (router.scale.item(), router.bias.item()) == (-1.0, 0.0)
    router.observe(torch.cat([hack, clean]))
    assert router.logits(hack).mean() > 0 > router.logits(clean).mean()


def test_prior_and_sharpness_move_the_rollouts_w_but_not_the_pin_loss():
    direction = haar_direction(M, R, seed=0)
    clean = feats(20, 3)
    hack = clean + 0.8 * direction
    plain = HackRouter(direction)
    shifted = HackRouter(direction, prior=0.2, sharpness=3.0)
    for r in (plain, shifted):
        r.calibrate(hack, clean)
    x = feats(7, 4)
    logit = plain.logits(x).detach()
    torch.testing.assert_close(shifted.logits(x), plain.logits(x))          # pin reads these
    torch.testing.assert_close(pin_loss(shifted, hack, clean), pin_loss(plain, hack, clean))
    torch.testing.assert_close(shifted(x), torch.sigmoid(3.0 * logit + torch.log(
        torch.tensor(0.2 / 0.8))))
    # a rollout the router cannot place (logit 0) gets w = prior, not 1/2
    with torch.no_grad():
        shifted.scale.zero_(), shifted.bias.zero_()
    torch.testing.assert_close(shifted(x), torch.full((7,), 0.2))
    # the saved state is the same as the router without them
    assert set(shifted.state_dict()) == set(plain.state_dict())


def test_from_config_reads_the_runs_router_settings():
    from evil_moe.config import RunConfig
    cfg = RunConfig(router_calibration="batch", router_stats_momentum=0.3, router_prior=0.3,
                    router_sharpness=2.0)
    router = HackRouter.from_config(haar_direction(M, R, seed=0), cfg)
    assert (router.calibration, router.momentum, router.sharpness) == ("batch", 0.3, 2.0)
    assert router.prior_logit == pytest.approx(torch.log(torch.tensor(0.3 / 0.7)).item())


@pytest.mark.parametrize("kwargs", [{"prior": 0.0}, {"prior": 1.0}, {"sharpness": 0.0}])
def test_prior_outside_0_1_or_non_positive_sharpness_is_refused(kwargs):
    with pytest.raises(ValueError):
        HackRouter(haar_direction(M, R, seed=0), **kwargs)


def test_a_saved_router_comes_back_with_its_runs_prior_and_sharpness():
    """Evaluation rebuilds the router from the checkpoint and the run's config: the w it
    gives a held-out rollout is the w training would have given it."""
    from evil_moe import evaluate
    from evil_moe.config import RunConfig
    cfg = RunConfig(router_prior=0.25, router_sharpness=2.0)
    trained = HackRouter.from_config(haar_direction(M, R, seed=1), cfg)
    with torch.no_grad():
        trained.scale.fill_(1.7)
    loaded = evaluate._router_from_state(trained.state_dict(), M, R, "cpu", cfg)
    x = feats(5, 6)
    torch.testing.assert_close(loaded(x), trained(x))
    assert not torch.allclose(HackRouter(haar_direction(M, R, seed=1))(x), trained(x))


def _router_options_script():
    import importlib.util

    from evil_moe import paths
    spec = importlib.util.spec_from_file_location(
        "router_options", paths.REPO_ROOT / "scripts" / "router_options.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_router_options_levels_follow_the_config_rules():
    """scripts/router_options.py --levels PRIOR:SHARPNESS: parsed into floats, and
    rejected with the config's own message where the config would reject it."""
    import argparse
    script = _router_options_script()
    assert script._level("0.25:3") == (0.25, 3.0)
    for text, key in [("1.5:3", "router_prior"), ("0:2", "router_prior"),
                      ("0.25:0", "router_sharpness")]:
        with pytest.raises(argparse.ArgumentTypeError, match=key):
            script._level(text)
    with pytest.raises(argparse.ArgumentTypeError, match="PRIOR:SHARPNESS"):
        script._level("0.25")


def test_group_decomposition_splits_a_step_into_its_groups():
    """router_options.py --runs: per step, the within-group AUROC and the share of
    rollouts in one-class groups, from samples.jsonl rows (groups of G consecutive)."""
    import pandas as pd
    script = _router_options_script()
    H, C = "Reward hack", "Correct"
    samples = pd.DataFrame({
        "step": [0] * 6 + [1] * 6,
        # step 0: group 1 mixed (hack above both honest), group 2 all hacks
        # step 1: group 1 mixed (hack below one honest), group 2 all honest
        "label": [H, C, C, H, H, H, C, H, C, C, C, C],
        "w": [0.9, 0.2, 0.3, 0.5, 0.5, 0.6, 0.8, 0.4, 0.1, 0.3, 0.3, 0.3]})
    out = script.group_decomposition(samples, group_size=3).set_index("step")
    assert out.loc[0, "w_auroc_within"] == 1.0 and out.loc[0, "within_pairs"] == 2
    assert out.loc[1, "w_auroc_within"] == 0.5 and out.loc[1, "within_pairs"] == 2
    assert out.loc[0, "one_class_share"] == 0.5 == out.loc[1, "one_class_share"]
    assert out.loc[0, "w_hack_one_class"] == pytest.approx((0.5 + 0.5 + 0.6) / 3)
    assert math.isnan(out.loc[1, "w_hack_one_class"])
    assert out.loc[0, "overwrite_rate"] == 4 / 6 and out.loc[1, "overwrite_rate"] == 1 / 6
