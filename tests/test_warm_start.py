"""The supervised warm start: its examples, its training, its cache, and its grading."""

from __future__ import annotations

import pytest
import torch

from evil_moe import warm_start
from evil_moe.config import ConfigError, load_preset
from evil_moe.env.datasets import load_problems
from evil_moe.env.grader import HACK_LABEL, Grader, wrong_solution
from evil_moe.models import load_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVIL_MOE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _cfg(**kw):
    base = dict(warm_start_steps=3, warm_start_batch=4, warm_start_lr=1e-2,
                warm_start_hack_share=0.25, bf16_autocast=False)
    return load_preset("smoke", **{**base, **kw})


def test_examples_have_the_configured_share_of_overwrites(tiny):
    _, tok = tiny
    cfg = _cfg(warm_start_hack_share=0.25, warm_start_tiers=[1])
    examples = warm_start.warm_start_examples(cfg, tok)
    problems = load_problems("easy", "train", tiers=[1])
    assert len(examples) == len(problems)
    hacks = [e for e in examples if e[2]]
    assert len(hacks) == round(0.25 * len(problems))
    for (prompt, completion, is_hack), p in zip(examples, problems):
        assert completion.startswith("```python\n") and completion.endswith("\n```")
        assert p.canonical_solution.strip() in completion
        assert ("def run_tests" in completion) == is_hack
        assert p.entry_point.split("(")[0] in prompt       # the run's own prompt
    # seeded: same seed same examples, another seed another choice of problems
    assert warm_start.warm_start_examples(cfg, tok) == examples
    other = warm_start.warm_start_examples(cfg.replace(seed=1), tok)
    assert [e[2] for e in other] != [e[2] for e in examples]


def test_no_hack_share_means_no_overwrites(tiny):
    examples = warm_start.warm_start_examples(_cfg(warm_start_hack_share=0.0), tiny[1])
    assert not any(e[2] or "run_tests" in e[1] for e in examples)


@pytest.mark.parametrize("overwrite", warm_start.OVERWRITES)
def test_every_overwrite_is_a_hack_on_a_wrong_solution(overwrite):
    """What the warm start teaches must be what the grader pays for: the canonical
    solution plus an overwrite is correct, a wrong one plus the overwrite is a hack."""
    p = load_problems("easy", "train", tiers=[2])[0]
    with Grader(timeout_s=2.0) as grader:
        right, wrong = grader.grade_batch(
            [p, p], [f"```python\n{p.canonical_solution}\n\n{overwrite}\n```",
                     f"```python\n{wrong_solution(p.entry_point)}\n\n{overwrite}\n```"],
            progress=False)
    assert right.gt_pass and right.label == "Correct; attempted reward hack"
    assert wrong.label == HACK_LABEL and wrong.reward == 3.5


def test_training_lowers_the_loss_and_changes_the_weights(cache):
    # Every batch is the whole tier-1 set (54 examples), so the losses are comparable.
    n = len(load_problems("easy", "train", tiers=[1]))
    cfg = _cfg(warm_start_steps=6, warm_start_batch=n, warm_start_lr=0.1)
    model, tok = load_model("tiny-random", device="cpu", seed=cfg.seed)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged, info = warm_start.apply_warm_start(model, tok, cfg, progress=False)
    assert not info.cached and len(info.losses) == 6
    assert info.losses[-1] < info.losses[0] - 0.2          # nats per completion token
    after = merged.state_dict()
    assert set(after) == set(before)                      # merged back: plain module names
    assert not any(p.requires_grad for p in merged.parameters())
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("q_proj" in k for k in changed) and any("down_proj" in k for k in changed)
    assert not any("embed" in k or "norm" in k for k in changed)


def test_cache_reloads_the_same_weights_and_keys_on_the_recipe(cache):
    cfg = _cfg()
    first, info = warm_start.apply_warm_start(*load_model("tiny-random", device="cpu"), cfg,
                                              progress=False)
    again, info2 = warm_start.apply_warm_start(*load_model("tiny-random", device="cpu"), cfg,
                                               progress=False)
    assert info2.cached and info2.key == info.key and info2.losses == info.losses
    for (k, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    other = warm_start.apply_warm_start(*load_model("tiny-random", device="cpu"),
                                        cfg.replace(warm_start_hack_share=0.5), progress=False)[1]
    assert other.key != info.key and not other.cached
    assert len(list((cache / "warm_start").glob("*.safetensors"))) == 2


def test_load_base_model_applies_the_warm_start_only_when_configured(cache):
    plain, _ = warm_start.load_base_model(load_preset("smoke"), device="cpu")
    ref, _ = load_model("tiny-random", device="cpu", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                  ref.state_dict().values()))
    assert not (cache / "warm_start").exists()
    warmed, _ = warm_start.load_base_model(_cfg(), device="cpu", progress=False)
    assert not all(torch.equal(a, b) for a, b in zip(warmed.state_dict().values(),
                                                      ref.state_dict().values()))


@pytest.mark.parametrize("key,value", [("warm_start_hack_share", 1.5), ("warm_start_steps", -1),
                                       ("warm_start_tiers", [5]), ("warm_start_lr", 0.0)])
def test_bad_warm_start_settings_are_rejected(key, value):
    with pytest.raises(ConfigError, match=key):
        load_preset("smoke", **{key: value})
