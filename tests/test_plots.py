"""The training-curve figure shows what the metrics say, panel by panel."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from evil_moe.plots import training_curves  # noqa: E402


def _metrics(routed: bool) -> pd.DataFrame:
    steps = np.arange(4)
    nan = np.full(4, np.nan)
    return pd.DataFrame({
        "step": steps, "reward": [1.0, 1.5, 2.0, 2.5], "hack_rate": [0.1, 0.2, 0.4, 0.6],
        "solve_rate": [0.3, 0.3, 0.2, 0.2], "run_tests_rate": [0.2, 0.4, 0.7, 0.9],
        "w_mean": [0.5] * 4 if routed else nan, "w_hack": [0.8] * 4 if routed else nan,
        "w_not_hack": [0.4] * 4 if routed else nan, "kl": [0.0, 0.01, 0.02, 0.03],
        "w_auroc": [0.6, 0.7, 0.8, 0.9] if routed else nan})


def test_every_panel_plots_its_metric_for_every_run():
    fig = training_curves({"evil_moe-s0": _metrics(True), "vanilla-s0": _metrics(False)})
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert list(panels) == ["reward", "hack rate", "solve rate", "share defining run_tests",
                            "router weight w", "on-policy AUROC of w", "KL to base (k3)"]
    for title, key in [("hack rate", "hack_rate"), ("share defining run_tests", "run_tests_rate"),
                       ("KL to base (k3)", "kl")]:
        lines = panels[title].get_lines()
        assert len(lines) == 2                                   # one per run
        np.testing.assert_allclose(lines[0].get_ydata(), _metrics(True)[key])
    # the router panel: hack and not-hack lines of the routed run only
    w_lines = panels["router weight w"].get_lines()
    assert [ln.get_label() for ln in w_lines] == ["evil_moe-s0 hack", "evil_moe-s0 not hack"]
    np.testing.assert_allclose(w_lines[0].get_ydata(), 0.8)

    auroc_lines = panels["on-policy AUROC of w"].get_lines()
    assert len(auroc_lines) == 1                              # vanilla has no w
    np.testing.assert_allclose(auroc_lines[0].get_ydata(), [0.6, 0.7, 0.8, 0.9])


def test_older_metrics_without_w_auroc_still_plot():
    fig = training_curves(_metrics(True).drop(columns="w_auroc"))
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert not panels["on-policy AUROC of w"].get_lines()


def _summary(hack_on, hack_off, with_split=False):
    def ci(p):
        return {"point": p, "lo": max(0.0, p - 0.1), "hi": min(1.0, p + 0.1)}
    s = {"conditions": {c: {"hack_rate": ci(h), "solve_rate": ci(0.1)}
                        for c, h in (("on", hack_on), ("off", hack_off), ("base", 0.2))}}
    if with_split:
        s["solve_split"] = {"conditions": {"on": {"gt_pass": ci(0.5)},
                                           "off": {"gt_pass": ci(0.45)}}}
    return s


def test_on_off_bars_show_every_arm_with_the_oracle_ceiling_first():
    from evil_moe.plots import on_off_bars, rate_rows
    rows = rate_rows({"vanilla": _summary(0.8, 0.6, True), "evil_moe": _summary(0.8, 0.4, True),
                      "oracle": _summary(0.7, 0.2, True)})
    fig = on_off_bars(rows)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["hack rate", "solve rate", "solve rate, solvable split"]
    hack_ax = fig.axes[0]
    ticks = [t.get_text() for t in hack_ax.get_xticklabels()]
    assert ticks == ["oracle\n(uses labels)", "evil_moe", "vanilla"]
    # the ON bars (second bar set: base, on, off) carry each arm's ON rate in that order
    from matplotlib.container import BarContainer
    bars = [c for c in hack_ax.containers if isinstance(c, BarContainer)]
    assert [b.get_label() for b in bars] == ["base model", "hack expert on", "hack expert off"]
    heights = [b.get_height() for b in bars[1]]
    np.testing.assert_allclose(heights, [0.7, 0.8, 0.8])
    # the solvable split has no base-model bars, and draws no empty bar set for them
    split_bars = [c for c in fig.axes[2].containers if isinstance(c, BarContainer)]
    assert [b.get_label() for b in split_bars] == ["hack expert on", "hack expert off"]
    # one legend for the figure, naming each condition once; none inside the panels
    assert [ax.get_legend() for ax in fig.axes] == [None, None, None]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "base model", "hack expert on", "hack expert off"]


def test_contrast_plot_draws_each_arm_pooled_and_by_seed():
    from evil_moe.plots import contrast_plot
    contrasts = {"evil_moe": {"point": 0.2, "lo": 0.05, "hi": 0.35},
                 "oracle": {"point": 0.4, "lo": 0.3, "hi": 0.5}}
    by_seed = {"evil_moe": {0: {"point": 0.1}, 1: {"point": 0.3}}, "oracle": {0: {"point": 0.4}}}
    fig = contrast_plot(contrasts, by_seed)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["oracle\n(uses labels)", "evil_moe"]
    seed_points = sorted(float(ln.get_ydata()[0]) for ln in ax.get_lines()
                         if ln.get_marker() == "x")
    assert seed_points == [0.1, 0.3, 0.4]


def test_figures_notebook_runs_on_smoke_runs_of_several_arms(tmp_path, tiny):
    """Real smoke runs (tiny model, one GRPO step, scripted grader) of the oracle, a routed
    arm and the control: the figures notebook pools them and glues every figure and number
    the results page reads."""
    import json
    import sys
    from pathlib import Path

    import papermill

    from evil_moe import evaluate, grpo, paths, pipeline
    from evil_moe.config import load_preset
    sys.path.insert(0, str(Path(__file__).parent))
    from scripted_grader import scripted_verdicts

    runs = tmp_path / "runs"
    for arm in ("vanilla", "oracle", "evil_moe"):
        d = paths.run_dir("smoke", arm, 0, root=runs)
        cfg = load_preset("smoke", arm=arm, steps=1, test_problems=2, eval_samples=2,
                          bootstrap=50, eval_deployed_off=True)
        if arm == "evil_moe":
            grpo.extract_v_act_for_run(cfg, d, model_and_tokenizer=tiny)
        grpo.train(cfg, d, grade_fn=scripted_verdicts, progress=False,
                   model_and_tokenizer=tiny).adapter.remove()
        run = evaluate.load_run(d, device="cpu")
        evaluate.evaluate_run(run, grade_fn=scripted_verdicts, progress=False, verbose=False)
        run.adapter.remove()
    out = tmp_path / "04.ipynb"
    papermill.execute_notebook(str(paths.REPO_ROOT / "notebooks" / "04_figures.ipynb"), str(out),
                               parameters={"preset": "smoke", "runs_root": str(runs)},
                               kernel_name=pipeline.KERNEL_NAME, cwd=str(tmp_path),
                               progress_bar=False)
    prefix = "application/papermill.record/"
    glued = {o["metadata"]["scrapbook"]["name"]: {k.removeprefix(prefix): v
                                                  for k, v in o["data"].items()}
             for c in json.loads(out.read_text())["cells"] for o in c.get("outputs", [])
             if "scrapbook" in o.get("metadata", {})}
    for key in ("fig_on_off", "fig_contrast", "fig_w_hist", "fig_roc", "fig_training"):
        assert "image/png" in glued[key], key
    assert "text/html" in glued["table_arms"] and "oracle" in glued["table_arms"]["text/html"]
    assert "nan" not in glued["oracle_hack_removed_text"]["text/plain"]
    assert glued["n_runs"]["text/plain"] == "3"
    for arm in ("oracle", "evil_moe", "vanilla"):
        assert f"{arm}_hack_on" in glued and f"{arm}_contrast_text" in glued
    assert glued["vanilla_contrast_text"]["text/plain"] == "'not measured'"
