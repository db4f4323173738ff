"""The isoFLOP figure (the paper's Fig. 3, left) and its fit summary (isoflop_fit.json).

Per training budget (runs whose total FLOPs agree within 2%) and variant: final validation
loss vs parameters (seed means, min-max error bars), a parabola in log10(parameters) fitted to
the means, and its optimum: a filled star when the sweep brackets it, an open one at the edge
of the sampled range when it does not.
"""

from __future__ import annotations

import statistics

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

from modxla.isoflop_fit import summarize
from modxla.plot_runs import SPREAD, Group, MissingData, sci
from modxla.plots import legend_outside

MARKERS = "osD^v<>p"
POINT_KEYS = ("run", "params", "loss", "loss_min", "loss_max", "loss_std", "seeds")
STYLES = ["-", "--", "-.", ":"]


def _budget_values(groups: list[Group]) -> dict[int, float]:
    """Budget index -> the median training FLOPs of its groups (the budget's name)."""
    totals: dict[int, list[float]] = {}
    for g in groups:
        totals.setdefault(g.budget, []).append(g.total_flops)
    return {b: statistics.median(v) for b, v in totals.items()}


def fit_summary(groups: list[Group]) -> list[dict]:
    """isoflop_fit.json: per (budget, variant) the fitted optimum, plus the points it used."""
    values = _budget_values(groups)
    points = []
    for g in groups:
        s = g.final_loss
        points.append(
            {
                "budget": values[g.budget],
                "variant": g.variant,
                "params": g.params,
                "loss": s.mean,
                "fwd_flops": g.fwd_flops,
                "loss_min": s.lo,
                "loss_max": s.hi,
                "loss_std": s.std,
                "seeds": s.n,
                "run": g.name,
            }
        )
    summary = summarize(points)
    for e in summary:
        e["points"] = [
            {
                k: p[k]
                for k in ("run", "params", "loss", "loss_min", "loss_max", "loss_std", "seeds")
            }
            for p in sorted(points, key=lambda p: p["params"])
            if p["budget"] == e["budget_flops"] and p["variant"] == e["variant"]
        ]
    return summary


def isoflop_figure(groups: list[Group]):
    summary = fit_summary(groups)
    fitted = [e for e in summary if "optimum" in e]
    if not fitted:
        raise MissingData("needs 3 sizes of one variant at one budget")
    budgets = sorted({e["budget_flops"] for e in fitted})
    variants = sorted({e["variant"] for e in fitted})
    color = {b: plt.cm.viridis(i / max(1, len(budgets) - 1) * 0.85) for i, b in enumerate(budgets)}
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for e in fitted:
        c, v = color[e["budget_flops"]], variants.index(e["variant"])
        pts = e["points"]
        ax.errorbar(
            [p["params"] for p in pts],
            [p["loss"] for p in pts],
            yerr=[
                [p["loss"] - p["loss_min"] for p in pts],
                [p["loss_max"] - p["loss"] for p in pts],
            ],
            fmt=MARKERS[v % len(MARKERS)],
            color=c,
            capsize=3,
        )
        lo, hi = np.log10(e["params_range"])
        x = np.linspace(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo), 100)
        ax.plot(10**x, np.polyval(e["optimum"]["coef"], x), STYLES[v % len(STYLES)], color=c)
        o = e["optimum"]
        ax.plot(
            o["params"],
            o["loss"],
            "*",
            ms=14,
            color=c,
            mfc=c if o["bracketed"] else "none",
            mec="k" if o["bracketed"] else c,
        )
    ax.set_xscale("log")
    ax.set_xlabel("Parameters")
    ax.set_ylabel("Final validation loss")
    handles = [Line2D([], [], color=color[b], lw=2, label=f"{sci(b)} FLOPs") for b in budgets]
    handles += [
        Line2D(
            [],
            [],
            color="gray",
            ls=STYLES[i % len(STYLES)],
            marker=MARKERS[i % len(MARKERS)],
            label=v,
        )
        for i, v in enumerate(variants)
    ]
    handles += [
        Line2D(
            [], [], ls="", marker="*", ms=10, color="gray", mec="k", label="optimum (bracketed)"
        ),
        Line2D([], [], ls="", marker="*", ms=10, mfc="none", color="gray", label="not bracketed"),
    ]
    fit = "parabola in log(params) on seed means"
    legend_outside(ax, handles=handles, title=f"{fit}\n{SPREAD}", title_fontsize=7)
    return fig
