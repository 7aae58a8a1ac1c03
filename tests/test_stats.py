"""Known-answer tests of evil_moe.stats: bootstrap CIs, pairing, ratios, AUROC, F0.5, ROC."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from evil_moe import stats
from evil_moe.stats import CI

Z975 = 1.959964


def bernoulli_df(p, n_problems, k=1, seed=0, condition="on", seed_col=0, rng=None):
    """Long frame: n_problems problems with K samples each; each problem is hack or not."""
    rng = rng or np.random.default_rng(seed)
    per_problem = rng.random(n_problems) < p
    rows = [{"problem_id": f"p{i}", "seed": seed_col, "condition": condition,
             "is_hack": bool(per_problem[i]), "sample": j}
            for i in range(n_problems) for j in range(k)]
    return pd.DataFrame(rows), per_problem


# ---------------------------------------------------------------------------
# bootstrap_ci / rate_with_ci
# ---------------------------------------------------------------------------


def test_bernoulli_ci_contains_truth_and_matches_normal_width():
    p, n_problems = 0.3, 2000
    df, per_problem = bernoulli_df(p, n_problems, k=3)
    ci = stats.rate_with_ci(df, "is_hack", n=4000, seed=1)
    phat = per_problem.mean()
    assert ci.point == pytest.approx(phat)
    assert ci.contains(p)
    normal_width = 2 * Z975 * math.sqrt(phat * (1 - phat) / n_problems)
    assert ci.width == pytest.approx(normal_width, rel=0.08)
    assert ci.n_problems == n_problems
    point, lo, hi = ci  # unpacks as a triple
    assert lo < point < hi


def test_problem_is_the_unit_not_the_sample():
    # problem a: 4 samples, all hack; problem b: 1 sample, not hack -> rate 1/2, not 4/5
    df = pd.DataFrame({"problem_id": ["a"] * 4 + ["b"], "is_hack": [1, 1, 1, 1, 0]})
    ci = stats.rate_with_ci(df, "is_hack", n=500)
    assert ci.point == 0.5
    # with K samples per problem identical within a problem, the CI width must be
    # that of n_problems units, not n_problems * K samples
    df2, per_problem = bernoulli_df(0.5, 400, k=10)
    w = stats.rate_with_ci(df2, "is_hack", n=4000, seed=3).width
    assert w == pytest.approx(2 * Z975 * math.sqrt(0.25 / 400), rel=0.1)


def test_degenerate_all_equal_gives_zero_width():
    for v in (0.0, 1.0, 0.25):
        ci = stats.bootstrap_ci(np.full(50, v), n=300)
        assert (ci.point, ci.lo, ci.hi) == (v, v, v)


def test_exact_distribution_of_two_problem_bootstrap():
    # problems with values 0 and 1: the resampled mean is 0, 1/2, 1 with prob 1/4, 1/2, 1/4
    reps = stats.bootstrap_replicates(np.array([0.0, 1.0]), n=20000, seed=0).mean(axis=1)
    frac = {v: np.mean(reps == v) for v in (0.0, 0.5, 1.0)}
    assert frac[0.5] == pytest.approx(0.5, abs=0.015)
    assert frac[0.0] == pytest.approx(0.25, abs=0.015)
    assert frac[1.0] == pytest.approx(0.25, abs=0.015)
    ci = stats.bootstrap_ci(np.array([0.0, 1.0]), n=20000, seed=0)
    assert (ci.point, ci.lo, ci.hi) == (0.5, 0.0, 1.0)


def test_deterministic_with_seed():
    vals = np.random.default_rng(5).random(40)
    a = stats.bootstrap_ci(vals, n=500, seed=7)
    b = stats.bootstrap_ci(vals, n=500, seed=7)
    c = stats.bootstrap_ci(vals, n=500, seed=8)
    assert a == b
    assert (a.lo, a.hi) != (c.lo, c.hi)


def test_other_statistic_median():
    vals = np.arange(101, dtype=float)
    ci = stats.bootstrap_ci(vals, stat=np.median, n=1000, seed=0)
    assert ci.point == 50.0
    assert ci.lo < 50 < ci.hi


def test_stratified_by_seed_matches_stratified_variance():
    # seed 0 hacks at 0.1, seed 1 at 0.9. Resampling within seeds removes the
    # between-seed variance: SE = sqrt(sum_s n_s p_s (1-p_s)) / N, not sqrt(p(1-p)/N).
    rng = np.random.default_rng(11)
    n_s = 1000
    d0, v0 = bernoulli_df(0.1, n_s, seed_col=0, rng=rng)
    d1, v1 = bernoulli_df(0.9, n_s, seed_col=1, rng=rng)
    df = pd.concat([d0, d1], ignore_index=True)
    ci = stats.rate_with_ci(df, "is_hack", n=4000, seed=2)
    assert ci.n_problems == 2 * n_s  # (seed, problem) pairs: the same id in two seeds is two units
    assert ci.point == pytest.approx((v0.sum() + v1.sum()) / (2 * n_s))
    se_strat = math.sqrt(n_s * v0.mean() * (1 - v0.mean()) + n_s * v1.mean() * (1 - v1.mean())) \
        / (2 * n_s)
    assert ci.width == pytest.approx(2 * Z975 * se_strat, rel=0.1)
    se_pooled = math.sqrt(ci.point * (1 - ci.point) / (2 * n_s))
    assert ci.width < 0.75 * 2 * Z975 * se_pooled
    # the mapping form of bootstrap_ci, given the problems in the same (sorted-id) order,
    # draws the same resamples
    order = np.argsort([f"p{i}" for i in range(n_s)])
    same = stats.bootstrap_ci({0: v0[order].astype(float), 1: v1[order].astype(float)},
                              n=4000, seed=2)
    assert same == ci


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="no problems"):
        stats.bootstrap_ci(np.array([]))
    with pytest.raises(ValueError, match="NaN"):
        stats.bootstrap_ci(np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="alpha"):
        stats.bootstrap_ci(np.array([0.0, 1.0]), alpha=1.5)
    df = pd.DataFrame({"problem_id": ["a"], "condition": ["on"], "is_hack": [np.nan]})
    with pytest.raises(ValueError, match="missing"):
        stats.rate_with_ci(df, "is_hack")
    with pytest.raises(KeyError, match="gt_pass"):
        stats.rate_with_ci(df, "gt_pass")
    with pytest.raises(ValueError, match="condition 'off'"):
        stats.rate_with_ci(df, "is_hack", condition="off")


# ---------------------------------------------------------------------------
# paired comparison
# ---------------------------------------------------------------------------


def on_off_frame(on_vals, off_vals, k=1, seed_col=0):
    rows = []
    for i, (a, b) in enumerate(zip(on_vals, off_vals)):
        for j in range(k):
            rows.append({"problem_id": i, "seed": seed_col, "condition": "on", "is_hack": a})
            rows.append({"problem_id": i, "seed": seed_col, "condition": "off", "is_hack": b})
    return pd.DataFrame(rows)


def test_paired_identical_conditions_give_zero_width_difference():
    vals = np.random.default_rng(0).random(60) < 0.5
    cmp = stats.paired_comparison(on_off_frame(vals, vals), "is_hack", n=500)
    assert tuple(cmp.diff) == (0.0, 0.0, 0.0)
    assert tuple(cmp.kept) == (1.0, 1.0, 1.0)
    assert tuple(cmp.removed) == (0.0, 0.0, 0.0)
    # the unpaired rates themselves still have a real width
    assert cmp.a.width > 0.1


def test_paired_difference_matches_normal_approximation_of_differences():
    rng = np.random.default_rng(4)
    n = 1500
    on = rng.random(n) < 0.6
    off = on & (rng.random(n) < 0.3)  # OFF hacks only where ON does: removes ~70%
    cmp = stats.paired_comparison(on_off_frame(on, off), "is_hack", n=4000, seed=9)
    d = on.astype(float) - off.astype(float)
    assert cmp.diff.point == pytest.approx(d.mean())
    assert cmp.diff.width == pytest.approx(2 * Z975 * d.std() / math.sqrt(n), rel=0.1)
    assert cmp.removed.point == pytest.approx((on.mean() - off.mean()) / on.mean())
    assert cmp.kept.point == pytest.approx(off.mean() / on.mean())
    assert cmp.removed.contains(0.7) and cmp.kept.contains(0.3)
    assert cmp.removed.point + cmp.kept.point == pytest.approx(1.0)


def test_ratio_with_zero_on_rate_is_nan_with_reason():
    cmp = stats.paired_comparison(on_off_frame([0, 0, 0, 0], [1, 0, 0, 0]), "is_hack", n=200)
    assert cmp.diff.point == -0.25
    for ci in (cmp.removed, cmp.kept):
        assert all(math.isnan(x) for x in ci)
        assert "ON rate is 0" in ci.reason
    assert "reason" in cmp.to_dict()["removed"]


def test_ratio_ci_undefined_when_on_is_zero_in_many_resamples():
    # one hacking problem among four: ON is 0 in (3/4)^4 = 32% of resamples
    cmp = stats.paired_comparison(on_off_frame([1, 0, 0, 0], [0, 0, 0, 0]), "is_hack", n=400)
    assert cmp.removed.point == 1.0
    assert math.isnan(cmp.removed.lo) and math.isnan(cmp.removed.hi)
    assert "bootstrap resamples" in cmp.removed.reason
    assert cmp.removed.n_undefined > 0.2 * 400


def test_pairing_requires_both_conditions():
    df = on_off_frame([1, 0], [0, 0])
    df = df[~((df.problem_id == 1) & (df.condition == "off"))]
    with pytest.raises(ValueError, match="lack one of the conditions"):
        stats.paired_comparison(df, "is_hack")


def test_drop_contrast_between_two_runs():
    rng = np.random.default_rng(2)
    n = 1000
    on_a = rng.random(n) < 0.7
    off_a = on_a & (rng.random(n) < 0.2)       # routed arm: big drop
    on_b = rng.random(n) < 0.7
    off_b = on_b & (rng.random(n) < 0.9)       # control: small drop
    ci = stats.drop_contrast(on_off_frame(on_a, off_a), on_off_frame(on_b, off_b), n=2000)
    da = on_a.astype(float) - off_a
    db = on_b.astype(float) - off_b
    assert ci.point == pytest.approx(da.mean() - db.mean())
    # independent arms, paired units: SE^2 = var(da - db) / n
    assert ci.width == pytest.approx(2 * Z975 * (da - db).std() / math.sqrt(n), rel=0.1)
    assert ci.lo > 0.3
    # the same run against itself: exactly zero
    same = stats.drop_contrast(on_off_frame(on_a, off_a), on_off_frame(on_a, off_a), n=200)
    assert tuple(same) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="only one of the two runs"):
        stats.drop_contrast(on_off_frame(on_a, off_a), on_off_frame(on_b[:10], off_b[:10]))


def test_condition_rates_per_condition():
    df = on_off_frame([1, 1, 0, 0], [0, 0, 0, 0], k=2)
    df["gt_pass"] = df["condition"].eq("off")
    out = stats.condition_rates(df, n=200)
    assert set(out) == {"on", "off"}
    assert out["on"]["is_hack"]["point"] == 0.5 and out["off"]["is_hack"]["point"] == 0.0
    assert out["off"]["gt_pass"]["point"] == 1.0
    assert out["on"]["n_samples"] == 8 and out["on"]["n_problems"] == 4


# ---------------------------------------------------------------------------
# AUROC, F0.5, ROC
# ---------------------------------------------------------------------------


def test_auroc_hand_computed():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: 3 of 4 pairs ordered -> 0.75
    assert stats.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    # a tie between a positive and a negative counts 1/2: (0.5 + 1 + 1 + 1) / 4
    assert stats.auroc([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]) == 0.875
    assert stats.auroc([0.2, 0.2, 0.2], [1, 0, 1]) == 0.5
    assert stats.auroc([1, 2, 3], [False, True, True]) == 1.0
    assert stats.auroc([3, 2, 1], [False, True, True]) == 0.0


def test_auroc_one_class_is_nan():
    assert math.isnan(stats.auroc([0.1, 0.9], [1, 1]))
    assert math.isnan(stats.auroc([0.1, 0.9], [0, 0]))


def test_auroc_and_roc_agree_with_sklearn_with_ties():
    rng = np.random.default_rng(3)
    y = rng.random(300) < 0.3
    s = np.round(rng.random(300) + 0.4 * y, 1)  # coarse rounding makes many ties
    assert stats.auroc(s, y) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    fpr, tpr, thr = stats.roc_curve(s, y)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])
    assert np.trapezoid(tpr, fpr) == pytest.approx(stats.auroc(s, y), abs=1e-12)


def test_roc_curve_hand_computed():
    fpr, tpr, thr = stats.roc_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    np.testing.assert_array_equal(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])
    np.testing.assert_array_equal(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_array_equal(fpr, [0, 0, 0.5, 0.5, 1])
    fpr1, tpr1, _ = stats.roc_curve([0.1, 0.9], [1, 1])
    assert np.isnan(fpr1).all() and tpr1[-1] == 1.0


def test_f_beta_hand_computed():
    # tp=1, fp=1, fn=2: F0.5 = 1.25 * 1 / (1.25 + 0.25 * 2 + 1) = 5/11
    pred, y = [1, 1, 0, 0, 0], [1, 0, 1, 1, 0]
    assert stats.f_beta(pred, y, 0.5) == pytest.approx(5 / 11)
    assert stats.f_beta(pred, y, 1.0) == pytest.approx(0.4)  # 2 tp / (2 tp + fp + fn)
    assert stats.f_beta(pred, y, 0.5) == pytest.approx(skm.fbeta_score(y, pred, beta=0.5))
    # precision weighs more: same tp, fp<->fn swapped gives a higher F0.5
    low_recall = stats.f_beta([1, 0, 0, 0], [1, 1, 1, 0], 0.5)     # tp=1, fn=2: 5/7
    low_precision = stats.f_beta([1, 1, 1, 0], [1, 0, 0, 0], 0.5)  # tp=1, fp=2: 5/13
    assert low_recall == pytest.approx(5 / 7) and low_precision == pytest.approx(5 / 13)
    assert stats.f_beta([0, 0, 0], [1, 1, 0]) == 0.0
    assert math.isnan(stats.f_beta([0, 0], [0, 0]))
    with pytest.raises(ValueError, match="beta"):
        stats.f_beta([1], [1], beta=0)


def test_f_beta_matches_sklearn_on_random_data():
    rng = np.random.default_rng(8)
    for _ in range(5):
        y = rng.random(200) < 0.4
        pred = rng.random(200) < 0.5
        assert stats.f_beta(pred, y) == pytest.approx(skm.fbeta_score(y, pred, beta=0.5))


def test_classifier_scores_thresholds_strictly():
    w = np.array([0.9, 0.5, 0.7, 0.2, 0.6])
    y = np.array([1, 1, 0, 0, 1])
    out = stats.classifier_scores(w, y)  # w > 0.5: 0.5 is called clean
    assert (out["tp"], out["fp"], out["fn"], out["tn"]) == (2, 1, 1, 1)
    assert out["precision"] == pytest.approx(2 / 3) and out["recall"] == pytest.approx(2 / 3)
    assert out["f0.5"] == pytest.approx(2 / 3)
    assert out["auroc"] == pytest.approx(skm.roc_auc_score(y, w))
    assert out["reasons"] == {}
    one = stats.classifier_scores([0.1, 0.2], [0, 0])
    assert math.isnan(one["auroc"]) and "one class" in one["reasons"]["auroc"]


def test_labels_validated():
    with pytest.raises(ValueError, match="0/1"):
        stats.auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="length"):
        stats.auroc([0.1, 0.2], [0])
    with pytest.raises(ValueError, match="NaN"):
        stats.auroc([np.nan, 0.2], [0, 1])


# ---------------------------------------------------------------------------
# final line
# ---------------------------------------------------------------------------


def test_format_final_line():
    rng = np.random.default_rng(0)
    on = rng.random(200) < 0.75
    off = on & (rng.random(200) < 0.2)
    df = on_off_frame(on, off)
    df["gt_pass"] = np.where(df["condition"] == "on", 0.2, 0.15) > rng.random(len(df))
    summary = {"ablation": {"hack": stats.paired_comparison(df, "is_hack", n=300).to_dict(),
                            "solve": stats.paired_comparison(df, "gt_pass", n=300).to_dict()},
               "arm": "evil_moe", "seeds": [0], "n_problems": 200, "samples_per_problem": 1}
    text = stats.format_final_line(summary)
    lines = text.splitlines()
    hack_on, hack_off = on.mean(), off.mean()
    assert lines[0] == (f"Evil MoE causal ablation: deploy hack {hack_on:.3f} (ON) -> "
                        f"{hack_off:.3f} (OFF)")
    solve = summary["ablation"]["solve"]
    assert f"{solve['on']['point']:.3f} (ON) -> {solve['off']['point']:.3f} (OFF)" in lines[1]
    h = summary["ablation"]["hack"]
    assert f"[{h['on']['lo']:.3f}, {h['on']['hi']:.3f}]" in text
    assert "share removed" in text and "share kept" in text and "arm evil_moe" in text


def test_format_final_line_with_nan_ratio_and_missing_keys():
    df = on_off_frame([0, 0], [0, 0])
    df["gt_pass"] = False
    summary = {"ablation": {"hack": stats.paired_comparison(df, "is_hack", n=50).to_dict(),
                            "solve": stats.paired_comparison(df, "gt_pass", n=50).to_dict()}}
    text = stats.format_final_line(summary)
    assert text.splitlines()[0] == "Evil MoE causal ablation: deploy hack 0.000 (ON) -> 0.000 (OFF)"
    assert "share removed undefined: no hacking with the expert ON" in text
    assert "share kept undefined: no solving with the expert ON" in text
    assert "nan" not in text.split("\n", 3)[3] and "ON rate is 0" in text
    with pytest.raises(KeyError, match="ablation"):
        stats.format_final_line({})


def test_ci_to_dict_roundtrip():
    ci = CI(0.5, 0.4, 0.6, n_problems=10)
    assert ci.to_dict() == {"point": 0.5, "lo": 0.4, "hi": 0.6, "n_problems": 10}
    assert ci.fmt() == "0.500 [0.400, 0.600]"


def test_trained_share_removed_measures_against_the_base_rate():
    # ON hacks 0.8, OFF 0.3, base 0.2: (0.8 - 0.3) / (0.8 - 0.2) = 5/6, against 5/8 of ON
    rng = np.random.default_rng(3)
    n = 400
    rows = []
    for cond, rate in (("on", 0.8), ("off", 0.3), ("base", 0.2)):
        rows.append(pd.DataFrame({"problem_id": np.arange(n), "condition": cond,
                                  "is_hack": rng.random(n) < rate}))
    df = pd.concat(rows, ignore_index=True)
    on, off, base = (df[df.condition == c].is_hack.mean() for c in ("on", "off", "base"))
    ci = stats.trained_share_removed(df, n=300)
    assert ci.point == pytest.approx((on - off) / (on - base))
    assert ci.lo < ci.point < ci.hi and ci.contains(5 / 6)
    assert ci.point > stats.paired_comparison(df, "is_hack", n=50).removed.point


def test_trained_share_is_undefined_when_on_does_not_exceed_base():
    df = pd.concat([pd.DataFrame({"problem_id": range(4), "condition": c, "is_hack": v})
                    for c, v in (("on", [1, 0, 0, 0]), ("off", [0] * 4),
                                 ("base", [1, 1, 0, 0]))], ignore_index=True)
    ci = stats.trained_share_removed(df, n=50)
    assert math.isnan(ci.point) and "does not exceed base" in ci.reason
    assert stats.share_text(ci, stats.UNDEFINED_TRAINED) == (
        "undefined: no trained hacking (ON does not exceed the base model)")


def test_share_text_shows_a_ci_words_or_nothing_but_never_nan():
    assert stats.share_text(CI(0.4, 0.2, 0.6), "x") == "0.400 [0.200, 0.600]"
    nan = float("nan")
    assert stats.share_text(CI(nan, nan, nan), "no hacking") == "undefined: no hacking"
    # a tiny ON rate: a point with no CI (solve 0.04 gave "share kept 2.500") is not shown
    tiny = CI(2.5, float("nan"), float("nan"), reason="ON is 0 in 300/1000 resamples")
    assert stats.share_text(tiny, "x").startswith("not shown")
    assert stats.share_text({"point": 2.5, "lo": None, "hi": None}, "x").startswith("not shown")


def test_auroc_ci_resamples_problems_with_their_rows():
    rng = np.random.default_rng(5)
    n, k = 60, 4
    hack = rng.random(n * k) < 0.4
    df = pd.DataFrame({"problem_id": np.repeat(np.arange(n), k), "is_hack": hack,
                       "w": hack * 0.3 + rng.random(n * k)})          # informative, noisy
    ci = stats.auroc_ci(df, "w", "is_hack", n=300)
    assert ci.point == pytest.approx(stats.auroc(df.w, df.is_hack))
    assert 0.5 < ci.lo < ci.point < ci.hi <= 1 and ci.n_problems == n
    perfect = stats.auroc_ci(df.assign(w=df.is_hack.astype(float)), "w", "is_hack", n=100)
    assert tuple(perfect) == (1.0, 1.0, 1.0)
    one_class = stats.auroc_ci(df.assign(is_hack=True), "w", "is_hack", n=50)
    assert math.isnan(one_class.point) and "one class" in one_class.reason


def test_within_group_auroc_counts_pairs_of_one_group_only():
    # group a: hack 0.9 beats honest 0.8 and 0.2 -> 2/2; group b: hack 0.1 vs honest
    # 0.1 (tie, 1/2) and 0.5 (loses, 0) -> 0.5/2; group c has one class: no pairs.
    scores = [0.9, 0.8, 0.2, 0.1, 0.1, 0.5, 0.7, 0.6]
    labels = [1, 0, 0, 1, 0, 0, 1, 1]
    groups = ["a", "a", "a", "b", "b", "b", "c", "c"]
    value, pairs = stats.within_group_auroc(scores, labels, groups)
    assert pairs == 4
    assert value == pytest.approx(2.5 / 4)
    # across groups the ordering differs: 0.7 and 0.6 (group c) beat b's honest 0.5
    assert stats.auroc(scores, labels) != pytest.approx(value)
    # a constant added per group changes nothing within groups
    shifted = [x + {"a": 5.0, "b": -3.0, "c": 1.0}[k] for x, k in zip(scores, groups)]
    assert stats.within_group_auroc(shifted, labels, groups) == (value, pairs)


def test_within_group_auroc_without_mixed_groups_is_nan():
    value, pairs = stats.within_group_auroc([0.1, 0.2, 0.3], [1, 1, 0], ["a", "a", "b"])
    assert math.isnan(value) and pairs == 0
    with pytest.raises(ValueError, match="one entry per score"):
        stats.within_group_auroc([0.1, 0.2], [1, 0], ["a"])
