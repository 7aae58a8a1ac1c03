"""Figures for the notebooks and the book (matplotlib, one function per figure).

Each function takes plain data (DataFrames, dicts, arrays) read from a run's
files and returns the matplotlib Figure, so notebooks stay a line per plot and
tests can check the figures are drawn from the data.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg") if matplotlib.get_backend().lower() == "agg" else None
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from . import arms as _arms  # noqa: E402

ARM_COLORS = {a.name: a.color for a in _arms.ARM_LIST}
CONDITION_LABELS = {"base": "base model", "on": "hack expert on", "off": "hack expert off",
                    "deployed_off": "deployed block off"}


def arm_label(arm: str) -> str:
    """An arm's tick label; an arm that routes with training labels says so."""
    return f"{arm}\n(uses labels)" if arm in _arms.LABEL_ARMS else arm


def training_curves(metrics: pd.DataFrame | dict[str, pd.DataFrame], title: str = "") -> plt.Figure:
    """Reward, hack rate, solve rate, share defining run_tests, mean w (hack vs not)
    and KL per step.

    The hack and solve rates jump with each step's draw of problems; the share
    of rollouts that define ``run_tests`` is the smoother sign of a policy
    turning to the loophole.

    metrics: one run's ``metrics.jsonl`` as a DataFrame, or ``{label: DataFrame}``
    to overlay several runs (arms, seeds).
    """
    runs = metrics if isinstance(metrics, dict) else {"": metrics}
    panels = [("reward", "reward"), ("hack_rate", "hack rate"), ("solve_rate", "solve rate"),
              ("run_tests_rate", "share defining run_tests"), ("w", "router weight w"),
              ("w_auroc", "on-policy AUROC of w"), ("kl", "KL to base (k3)")]
    fig, grid = plt.subplots(2, 4, figsize=(13.5, 5.6), squeeze=False)
    axes = [list(grid.flatten()[:len(panels)])]
    for ax in grid.flatten()[len(panels):]:
        ax.axis("off")
    for (key, label), ax in zip(panels, axes[0]):
        for name, df in runs.items():
            color = ARM_COLORS.get(name.split("-")[0], None)
            if key == "w":
                if df["w_mean"].notna().any():
                    ax.plot(df["step"], df["w_hack"], "-o", ms=3, color=color,
                            label=f"{name} hack".strip())
                    ax.plot(df["step"], df["w_not_hack"], "--o", ms=3, color=color, alpha=0.6,
                            label=f"{name} not hack".strip())
            elif key in df and df[key].notna().any():   # w_auroc: absent in older runs
                ax.plot(df["step"], df[key], "-o", ms=3, color=color, label=name or None)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        if key in ("hack_rate", "solve_rate", "run_tests_rate", "w", "w_auroc"):
            ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    handles = [ax.get_legend_handles_labels() for ax in axes[0]]
    if any(h for h, _ in handles):
        for ax in axes[0]:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def projections_plot(hack_proj: np.ndarray, clean_proj: np.ndarray, pair_ids: list[str],
                     title: str = "") -> plt.Figure:
    """Per-pair projection onto a direction, hack side vs clean side, joined per pair."""
    hack_proj, clean_proj = np.asarray(hack_proj), np.asarray(clean_proj)
    order = np.argsort(hack_proj - clean_proj)
    fig, ax = plt.subplots(figsize=(7, 0.22 * len(pair_ids) + 1.2))
    y = np.arange(len(pair_ids))
    for yi, i in zip(y, order):
        ax.plot([clean_proj[i], hack_proj[i]], [yi, yi], color="0.75", lw=1, zorder=1)
    ax.scatter(clean_proj[order], y, color="#2e86c1", label="clean", zorder=2, s=18)
    ax.scatter(hack_proj[order], y, color="#c0392b", label="hack", zorder=2, s=18)
    ax.set_yticks(y, [pair_ids[i] for i in order], fontsize=7)
    ax.set_xlabel("projection onto direction")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def on_off_bars(rows: pd.DataFrame, title: str = "") -> plt.Figure:
    """Hack and solve rate per arm and condition with 95% CIs, every arm in one figure.

    rows: columns ``arm, condition, metric``, ``rate, lo, hi``; metrics are
    ``hack_rate``, ``solve_rate`` and (a solvable split) ``solvable_solve_rate``,
    one panel each. Conditions appear in the order base, on, off, deployed_off
    (hatched); arms in ``arms.DISPLAY_ORDER``, the label-using oracle ceiling first.
    """
    titles = {"hack_rate": "hack rate", "solve_rate": "solve rate",
              "solvable_solve_rate": "solve rate, solvable split"}
    metrics = [m for m in titles if m in set(rows["metric"])]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.8), squeeze=False)
    conditions = [c for c in CONDITION_LABELS if c in set(rows["condition"])]
    shades = {"base": 0.35, "on": 1.0, "off": 0.6, "deployed_off": 0.6}
    hatches = {"deployed_off": "//"}
    arms = _arms.ordered(rows["arm"])
    width = 0.8 / max(1, len(conditions))
    for metric, ax in zip(metrics, axes[0]):
        for j, cond in enumerate(conditions):
            sub = rows[(rows.metric == metric) & (rows.condition == cond)].set_index("arm")
            xs, ys, err_lo, err_hi, colors = [], [], [], [], []
            for i, arm in enumerate(arms):
                if arm not in sub.index:
                    continue
                r = sub.loc[arm]
                xs.append(i + (j - (len(conditions) - 1) / 2) * width)
                ys.append(r["rate"])
                err_lo.append(max(0.0, r["rate"] - r["lo"]))
                err_hi.append(max(0.0, r["hi"] - r["rate"]))
                colors.append(ARM_COLORS.get(arm, "0.5"))
            if not xs:  # a condition this panel lacks (no base model on the solvable split)
                continue
            ax.bar(xs, ys, width * 0.95, yerr=[err_lo, err_hi], color=colors,
                   alpha=shades[cond], capsize=3, label=CONDITION_LABELS[cond],
                   hatch=hatches.get(cond), edgecolor="black", linewidth=0.5)
        ax.set_xticks(range(len(arms)), [arm_label(a) for a in arms], fontsize=8)
        ax.set_title(titles[metric], fontsize=10)
        ax.set_ylim(0, 1.02)
        ax.grid(axis="y", alpha=0.3)
    # one legend for every panel, in grey: colour is the arm, shade and hatch the condition
    keys = [Patch(facecolor="0.35", alpha=shades[c], hatch=hatches.get(c), edgecolor="black",
                  linewidth=0.5, label=CONDITION_LABELS[c]) for c in conditions]
    fig.legend(handles=keys, loc="lower center", ncol=len(keys), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def w_histograms(w_by_label: dict[str, dict[str, np.ndarray]], title: str = "") -> plt.Figure:
    """Router weight w on graded rollouts, hack vs not, one panel per arm.

    w_by_label: ``{arm: {"hack": w values, "not hack": w values}}``.
    """
    fig, axes = plt.subplots(1, max(1, len(w_by_label)), figsize=(4 * max(1, len(w_by_label)), 2.8),
                             squeeze=False)
    bins = np.linspace(0, 1, 21)
    for (arm, groups), ax in zip(w_by_label.items(), axes[0]):
        for label, color in (("not hack", "#2e86c1"), ("hack", "#c0392b")):
            vals = np.asarray(groups.get(label, []), dtype=float)
            vals = vals[~np.isnan(vals)]
            if vals.size:
                ax.hist(vals, bins=bins, alpha=0.6, color=color, label=f"{label} (n={vals.size})")
        ax.set_title(arm)
        ax.set_xlabel("w")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def roc_plot(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], title: str = "") -> plt.Figure:
    """ROC curves: ``{name: (fpr, tpr, auroc)}``, e.g. ``"evil_moe router"`` vs
    ``"evil_moe haar"``; a name starting with an arm takes its colour, Haar ones dashed."""
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    for name, (fpr, tpr, auc) in curves.items():
        arm = name.split()[0].split("-")[0]
        ax.plot(fpr, tpr, "--" if name.endswith("haar") else "-", color=ARM_COLORS.get(arm),
                label=f"{name} (AUROC {auc:.2f})")
    ax.plot([0, 1], [0, 1], ":", color="0.5")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7, loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def rate_rows(summaries: dict[str, dict]) -> pd.DataFrame:
    """Long table of hack/solve rates with CIs from evaluation summaries.

    summaries: ``{arm: summary}`` as written to ``summary.json`` by
    ``evaluate``. Returns columns ``arm, condition, metric, rate, lo, hi`` for
    ``on_off_bars``; a summary with a solvable split adds ``solvable_solve_rate``.
    """
    rows = []
    for arm, s in summaries.items():
        for cond, entry in s["conditions"].items():
            for metric in ("hack_rate", "solve_rate"):
                ci = entry[metric]
                rows.append({"arm": arm, "condition": cond, "metric": metric,
                             "rate": _num(ci["point"]), "lo": _num(ci["lo"]), "hi": _num(ci["hi"])})
        for cond, entry in ((s.get("solve_split") or {}).get("conditions") or {}).items():
            ci = entry["gt_pass"]
            rows.append({"arm": arm, "condition": cond, "metric": "solvable_solve_rate",
                         "rate": _num(ci["point"]), "lo": _num(ci["lo"]), "hi": _num(ci["hi"])})
    return pd.DataFrame(rows)


def contrast_plot(contrasts: dict[str, dict], by_seed: dict[str, dict] | None = None,
                  control: str = _arms.CONTROL, title: str = "") -> plt.Figure:
    """Each arm's ON-OFF hack drop minus the control's, with its 95% CI (pooled over seeds,
    paired by seed and problem), and each seed's own contrast as a small marker.

    contrasts: ``{arm: CI dict}``; by_seed: ``{arm: {seed: CI dict}}`` (both from
    ``evaluate.aggregate_arms``). A CI that excludes 0 says the arm removes more (or
    less) hacking than removing the control's matched block does.
    """
    names = _arms.ordered(contrasts)
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2.4, 3.2))
    for i, arm in enumerate(names):
        c = contrasts[arm]
        point, lo, hi = _num(c["point"]), _num(c["lo"]), _num(c["hi"])
        ax.errorbar([i], [point], yerr=[[max(0.0, point - lo)], [max(0.0, hi - point)]], fmt="o",
                    color=ARM_COLORS.get(arm, "0.3"), capsize=4, ms=7,
                    label="pooled, 95% CI" if i == 0 else None)
        seeds = (by_seed or {}).get(arm, {})
        for j, (seed, cs) in enumerate(sorted(seeds.items())):
            ax.plot([i + 0.18 + 0.06 * j], [_num(cs["point"])], "x", color="0.35", ms=5,
                    label="one seed" if i == 0 and j == 0 else None)
    ax.axhline(0, color="0.4", lw=1, ls=":")
    ax.set_xticks(range(len(names)), [arm_label(a) for a in names], fontsize=8)
    ax.set_xlim(-0.6, len(names) - 0.2)
    ax.set_ylabel(f"hack drop minus {control}'s")
    ax.grid(axis="y", alpha=0.3)
    if names:
        ax.legend(fontsize=7)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def message_figure(text: str) -> plt.Figure:
    """A small figure that states why a plot is absent (so the page never shows a hole)."""
    fig, ax = plt.subplots(figsize=(5, 1.2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=10)
    return fig
