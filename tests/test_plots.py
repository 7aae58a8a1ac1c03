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
        "w_not_hack": [0.4] * 4 if routed else nan, "kl": [0.0, 0.01, 0.02, 0.03]})


def test_every_panel_plots_its_metric_for_every_run():
    fig = training_curves({"evil_moe-s0": _metrics(True), "vanilla-s0": _metrics(False)})
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert list(panels) == ["reward", "hack rate", "solve rate", "share defining run_tests",
                            "router weight w", "KL to base (k3)"]
    for title, key in [("hack rate", "hack_rate"), ("share defining run_tests", "run_tests_rate"),
                       ("KL to base (k3)", "kl")]:
        lines = panels[title].get_lines()
        assert len(lines) == 2                                   # one per run
        np.testing.assert_allclose(lines[0].get_ydata(), _metrics(True)[key])
    # the router panel: hack and not-hack lines of the routed run only
    w_lines = panels["router weight w"].get_lines()
    assert [ln.get_label() for ln in w_lines] == ["evil_moe-s0 hack", "evil_moe-s0 not hack"]
    np.testing.assert_allclose(w_lines[0].get_ydata(), 0.8)
