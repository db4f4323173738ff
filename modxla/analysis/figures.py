"""The paper's figures from run directories (config.yaml + metrics.jsonl [+ predictor/]).

Run directories and the output folder are paths or URLs (gs://...), read and written through
modxla.io.rundir. Runs whose configs differ only in train.seed form one group (analysis.runs):
every figure shows the group's mean over seeds, with error bars (or a band) from the lowest to
the highest seed.
"""

from __future__ import annotations

import io
import json
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from modxla.analysis.runs import (  # noqa: E402
    EMA,
    SPREAD,
    Group,
    MissingData,
    Run,
    Stat,
    fit_summary,
    gap_summary,
    group_runs,
    load_runs,
    runs_table,
    sci,
)
from modxla.io import rundir  # noqa: E402

SCI = FuncFormatter(sci)
MARKERS = "osD^v<>p"
STYLES = ["-", "--", "-.", ":"]


def _save(fig, out: str, name: str) -> str:
    path = rundir.join(out, f"{name}.png")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")  # keeps outside legends
    plt.close(fig)
    rundir.write_bytes(path, buf.getvalue())
    return path


def legend_outside(ax, **kw) -> None:
    """Legend right of the axes: it never covers a curve."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, **kw)


def _has_seeds(groups: list[Group]) -> bool:
    return any(len(g.runs) > 1 for g in groups)


def loss_vs_params(groups: list[Group]):
    fig, ax = plt.subplots(figsize=(7.5, 4))
    many = len({g.budget for g in groups}) > 1
    series: dict[str, list[Group]] = {}
    for g in groups:
        key = g.variant + (f", {sci(g.total_flops)} FLOPs" if many else "")
        series.setdefault(key, []).append(g)
    for key in sorted(series):
        gs = sorted(series[key], key=lambda g: g.params)
        stats = [g.final_loss for g in gs]
        ax.errorbar(
            [g.params for g in gs],
            [s.mean for s in stats],
            yerr=[[s.mean - s.lo for s in stats], [s.hi - s.mean for s in stats]],
            fmt="o--",
            capsize=3,
            label=key,
        )
    ax.set_xscale("log")
    ax.set_xlabel("Parameters")
    ax.set_ylabel("Final loss (validation, else last train losses)")
    legend_outside(ax, title=SPREAD if _has_seeds(groups) else None, title_fontsize=7)
    return fig


def _size(g: Group) -> str:
    return f"{g.cfg.model.num_layers}x{g.cfg.model.d_model}"


def loss_vs_flops_and_clock(groups: list[Group]):
    """Smoothed training loss vs FLOPs (top) and wall-clock (bottom): one column per budget,
    a color per size, a line style per variant."""
    budgets = sorted({g.budget for g in groups})
    sizes = sorted({(g.params, _size(g)) for g in groups})
    sizes = list(dict.fromkeys(name for _, name in sizes))  # by parameters, each once
    variants = sorted({(not g.is_baseline, g.variant) for g in groups})
    variants = [v for _, v in variants]
    styles = ["-", "--", ":", "-."]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {s: colors[i % len(colors)] for i, s in enumerate(sizes)}
    style = {v: styles[i % len(styles)] for i, v in enumerate(variants)}
    by_variant = len(sizes) == 1  # one size (a variant comparison): a color per variant too
    vcolor = {v: colors[i % len(colors)] for i, v in enumerate(variants)}
    fig, axes = plt.subplots(
        2, len(budgets), figsize=(4.5 * len(budgets), 7), squeeze=False, sharey=True
    )
    top, bottom = [], []
    for col, budget in enumerate(budgets):
        a, b = axes[0][col], axes[1][col]
        for g in (g for g in groups if g.budget == budget):
            flops, clock, loss = g.curve()
            mean = [s.mean for s in loss]
            if mean:
                top.append(mean[len(mean) // 10])
                bottom.append(min(mean))
            c = vcolor[g.variant] if by_variant else color[_size(g)]
            kw = {"color": c, "ls": style[g.variant]}
            a.plot(flops, mean, **kw)
            b.plot(clock, mean, **kw)
            if len(g.runs) > 1:
                lo, hi = [s.lo for s in loss], [s.hi for s in loss]
                a.fill_between(flops, lo, hi, color=kw["color"], alpha=0.2, lw=0)
                b.fill_between(clock, lo, hi, color=kw["color"], alpha=0.2, lw=0)
        a.set_xlabel("Training FLOPs")
        a.xaxis.set_major_formatter(SCI)
        b.set_xlabel("Wall-clock (s, mean over seeds)")
        if len(budgets) > 1:
            a.set_title(f"{sci(max(g.total_flops for g in groups if g.budget == budget))} FLOPs")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"Training loss (EMA {EMA} over logged steps)", fontsize=8)
    if top:  # from a tenth of the way in: the first steps' fall would flatten the rest
        lo, hi = min(bottom), max(top)
        axes[0][0].set_ylim(lo - 0.05 * (hi - lo), hi)
    params = {_size(g): g.params for g in groups}
    handles = [
        Line2D(
            [], [], color="gray" if by_variant else color[s], label=f"{s} ({params[s] / 1e6:.2f}M)"
        )
        for s in sizes
    ]
    handles += [
        Line2D([], [], color=vcolor[v] if by_variant else "gray", ls=style[v], label=v)
        for v in variants
    ]
    band = "band: min-max over seeds" if _has_seeds(groups) else None
    legend_outside(axes[0][-1], handles=handles, title=band, title_fontsize=7)
    return fig


def throughput_bars(groups: list[Group]):
    """FLOPs/step and steps/s per (variant, size), pooled over seeds and budgets."""
    pooled: dict[tuple, list[Group]] = {}
    for g in groups:
        pooled.setdefault((not g.is_baseline, g.variant, g.params, _size(g)), []).append(g)
    keys = sorted(pooled)
    fig, (a, b) = plt.subplots(2, 1, figsize=(max(5.5, 1.1 * len(keys)), 6))
    short = [pooled[k][0].short_variant for k in keys]
    names = [f"{v}\n{size}\n{p / 1e6:.2f}M" for v, (_, _, p, size) in zip(short, keys, strict=True)]
    x = range(len(keys))
    a.bar(x, [pooled[k][0].flops_per_step for k in keys])
    a.yaxis.set_major_formatter(SCI)
    a.set_ylabel("FLOPs per step")
    sps = [Stat.of([r.steps_per_s for g in pooled[k] for r in g.runs]) for k in keys]
    seeds = any(s.n > 1 for s in sps)
    err = [[s.mean - s.lo for s in sps], [s.hi - s.mean for s in sps]]
    b.bar(x, [s.mean for s in sps], yerr=err if seeds else None, capsize=3)
    b.set_ylabel("Steps/s\n(mean; error bars: min-max)" if seeds else "Steps/s")
    for ax in (a, b):
        ax.set_xticks(list(x), names, fontsize=6)
    return fig


def isoflop_ll(groups: list[Group]):
    """Normalized LL vs normalized FLOPs per forward pass, to the best (lowest-loss) baseline,
    at the largest budget that has a baseline."""
    base = [g for g in groups if g.is_baseline]
    if not base:
        raise MissingData("needs at least one baseline run")
    budget = max(g.budget for g in base)
    corpus = min(g.corpus for g in base if g.budget == budget)  # one corpus: losses compare
    groups = [g for g in groups if g.budget == budget and g.corpus == corpus]
    ref = min((g for g in groups if g.is_baseline), key=lambda g: g.final_loss.mean)
    ref_loss = ref.final_loss.mean
    fig, ax = plt.subplots(figsize=(7.5, 4))
    series: dict[str, list] = {"Baseline": []}
    for g in groups:
        x = g.fwd_flops / ref.fwd_flops
        s = g.final_loss
        pt = (x, s.mean / ref_loss, (s.mean - s.lo) / ref_loss, (s.hi - s.mean) / ref_loss)
        if g.is_baseline:
            series["Baseline"].append(pt)
            continue
        if g.cfg.model.moe_layers:  # MoE and MoDE: top-k only (no predictor tool yet)
            series.setdefault(g.short_variant, []).append(pt)
            continue
        if g.cfg.model.mod.router != "learned":
            continue  # random routing has no top-k vs predictor story to tell
        cap = f"{g.cfg.model.mod.capacity:.1%}".replace(".0%", "%")
        series.setdefault(f"MoD ({cap}) using top-k", []).append(pt)
        evs = [r.routing_eval for r in g.runs if r.routing_eval]
        if evs:
            ratio = statistics.fmean(e["predictor"]["nll"] / e["topk"]["nll"] for e in evs)
            scaled = (x, pt[1] * ratio, pt[2] * ratio, pt[3] * ratio)
            series.setdefault(f"MoD ({cap}) using predictor", []).append(scaled)
    for name, pts in series.items():
        if pts:
            x, y, lo, hi = zip(*sorted(pts), strict=True)
            ax.errorbar(x, y, yerr=[lo, hi], fmt="o--", capsize=3, label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axvline(1.0, color="k", lw=0.8)
    on = f", {corpus}" if corpus else ""
    ax.set_title(f"{sci(ref.total_flops)} training FLOPs{on}", fontsize=9)
    ax.set_xlabel("Normalized FLOPs per FFW pass (to the isoFLOP-optimal baseline)")
    ax.set_ylabel("Normalized log-likelihood")
    legend_outside(ax, title=SPREAD if _has_seeds(groups) else None, title_fontsize=7)
    return fig


def variants_at_size(groups: list[Group]):
    """Final loss per variant, one panel per (size, budget) with 3 or more variants (the
    4-variant comparison; a sweep's baseline/MoD pairs are in loss_vs_params)."""
    by: dict[tuple, list[Group]] = {}
    for g in groups:
        by.setdefault((g.corpus, g.budget, _size(g)), []).append(g)
    by = {k: v for k, v in by.items() if len(v) >= 3}
    if not by:
        raise MissingData("needs 3 or more variants at one size and budget")
    rows = max(map(len, by.values()))
    height = (0.9 + 0.35 * rows) * len(by)
    fig, axes = plt.subplots(len(by), 1, figsize=(7.5, height), squeeze=False, layout="constrained")
    for ax, ((corpus, _, size), gs) in zip(axes[:, 0], sorted(by.items()), strict=True):
        gs = sorted(gs, key=lambda g: g.final_loss.mean)
        stats = [g.final_loss for g in gs]
        y = range(len(gs))
        err = [[s.mean - s.lo for s in stats], [s.hi - s.mean for s in stats]]
        ax.errorbar([s.mean for s in stats], y, xerr=err, fmt="o", capsize=3)
        ax.set_yticks(list(y), [f"{g.variant} (n={len(g.runs)})" for g in gs], fontsize=7)
        ax.set_ylim(len(gs) - 0.5, -0.5)  # best on top
        on = f", {corpus}" if corpus else ""
        ax.set_title(f"{size}, {sci(gs[0].total_flops)} training FLOPs{on}", fontsize=8)
        ax.set_xlabel("Final loss (validation); " + SPREAD if _has_seeds(gs) else "Final loss")
        ax.grid(axis="x", alpha=0.3)
    return fig


def _mean_curve(curves: list[list[tuple[float, float]]]):
    """Mean and min/max of y over the x values every curve has."""
    maps = [dict(c) for c in curves]
    xs = sorted(set.intersection(*(set(m) for m in maps)))
    stats = [Stat.of([m[x] for m in maps]) for x in xs]
    return xs, stats


def _post_hoc(r: Run) -> list[tuple[int, float]]:
    """The post-hoc predictor's accuracy curve: validation when it was evaluated, else the
    training batches'."""
    for key in ("val/predictor_acc", "predictor_acc/mean"):
        curve = [(x["step"], x[key]) for x in r.predictor if key in x]
        if curve:
            return curve
    return []


def predictor_accuracy(groups: list[Group]):
    """Post-hoc predictor accuracy vs step; the jointly trained predictors' only when no run
    has a post-hoc one (a sweep's every MoD run has joint ones: too many curves)."""
    fig, ax = plt.subplots(figsize=(7.5, 4))
    drawn = False
    any_post = any(_post_hoc(r) for g in groups for r in g.runs)
    for g in groups:
        post = [_post_hoc(r) for r in g.runs]
        last = g.runs[0].train[-1] if g.runs[0].train else {}
        keys = [k for k in last if k.startswith("predictor_acc/")]
        joint = [
            [(x["step"], sum(x[k] for k in keys) / len(keys)) for x in r.train]
            for r in g.runs
            if keys and not any_post
        ]
        for curves, how in ((post, "post hoc"), (joint, "joint")):
            curves = [c for c in curves if c]
            if not curves:
                continue
            xs, stats = _mean_curve(curves)
            n = f", {len(curves)} seeds" if len(curves) > 1 else ""
            (ln,) = ax.plot(xs, [s.mean for s in stats], label=f"{g.name} ({how}{n})")
            drawn = True
            if len(curves) > 1:
                lo, hi = [s.lo for s in stats], [s.hi for s in stats]
                ax.fill_between(xs, lo, hi, color=ln.get_color(), alpha=0.2, lw=0)
            ax.axhline(1 - g.cfg.model.mod.capacity, ls=":", color=ln.get_color())
    if not drawn:
        plt.close(fig)
        raise MissingData("no run logged predictor accuracy")
    ax.set_xlabel("Training step")
    ax.set_ylabel("Top-k prediction accuracy")
    legend_outside(ax, title="dotted: always skip (1 - capacity)", title_fontsize=7)
    return fig


def isoflop_figure(groups: list[Group]):
    summary = fit_summary(groups)
    fitted = [e for e in summary if "optimum" in e]
    if not fitted:
        raise MissingData("needs 3 sizes of one variant at one budget")
    budgets = sorted({e["budget_flops"] for e in fitted})
    variants = sorted({e["variant"] for e in fitted})
    color = {b: plt.cm.viridis(i / max(1, len(budgets) - 1) * 0.85) for i, b in enumerate(budgets)}
    # one budget (a variant comparison, as the paper's MoDE figure): a color per variant
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    vcolor = {v: cycle[i % len(cycle)] for i, v in enumerate(variants)}
    by_variant = len(budgets) == 1
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for e in fitted:
        v = variants.index(e["variant"])
        c = vcolor[e["variant"]] if by_variant else color[e["budget_flops"]]
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
    if by_variant:
        handles = []
        ax.set_title(f"{sci(budgets[0])} training FLOPs", fontsize=9)
    handles += [
        Line2D(
            [],
            [],
            color=vcolor[v] if by_variant else "gray",
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


def isoflop_gap(groups: list[Group]):
    """Each variant's isoFLOP-optimal loss minus the baseline's against the budget, with the
    bootstrap interval: the trend of the claim "MoD beats the isoFLOP-optimal baseline"."""
    claims = gap_summary(groups)
    if not claims:
        raise MissingData("needs the baseline and another variant fitted at one budget")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.axhline(0, color="k", lw=0.8)
    variants = sorted({c["variant"] for c in claims})
    for i, v in enumerate(variants):
        cs = sorted((c for c in claims if c["variant"] == v), key=lambda c: c["budget_flops"])
        x = [c["budget_flops"] for c in cs]
        y = [c["gap"] for c in cs]
        # a percentile interval need not hold the point estimate (an edge optimum): clip
        err = [
            [max(0.0, c["gap"] - c["interval"][0]) for c in cs],
            [max(0.0, c["interval"][1] - c["gap"]) for c in cs],
        ]
        bars = ax.errorbar(x, y, yerr=err, fmt=STYLES[i % len(STYLES)], capsize=4, label=v)
        color = bars.lines[0].get_color()
        for c in cs:  # filled: both optima bracketed; hollow: one of them is a bound
            full = all(c["bracketed"])
            ax.plot(
                c["budget_flops"],
                c["gap"],
                MARKERS[i % len(MARKERS)],
                color=color,
                mfc=color if full else "none",
                ms=8,
            )
    ax.set_xscale("log")
    ax.set_xticks(sorted({c["budget_flops"] for c in claims}))  # the budgets, as 2e12
    ax.xaxis.set_major_formatter(SCI)
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, pos: ""))
    ax.set_xlabel("Training FLOPs")
    ax.set_ylabel("Optimum loss - baseline's optimum")
    ax.set_title("below 0: better than the isoFLOP-optimal baseline", fontsize=9)
    level = f"{claims[0]['level']:.0%}"
    legend_outside(
        ax,
        title=f"{level} bootstrap over seeds\nhollow: an optimum not bracketed",
        title_fontsize=7,
    )
    return fig


FIGURES = {
    "loss_vs_params": loss_vs_params,
    "loss_vs_flops_wallclock": loss_vs_flops_and_clock,
    "flops_and_steps_per_s": throughput_bars,
    "isoflop_loglikelihood": isoflop_ll,
    "isoflop_fit": isoflop_figure,
    "isoflop_gap": isoflop_gap,
    "variants_at_size": variants_at_size,
    "predictor_accuracy": predictor_accuracy,
}


def render_all(run_dirs, out: str, warn=print) -> dict[str, str]:
    """Every figure the runs have data for, as PNG files in `out`, isoflop_fit.json,
    isoflop_gaps.json (the per-budget claims) and runs.md (a table of the run groups)."""
    runs = load_runs(run_dirs)
    runs = [r for r in runs if r.train] or runs
    groups = group_runs(runs)
    out = str(out)
    rundir.makedirs(out)
    written = {}
    for name, fn in FIGURES.items():
        try:
            written[name] = _save(fn(groups), out, name)
        except MissingData as e:  # anything else is a bug and keeps its traceback
            warn(f"skipped {name}: {e}")
            plt.close("all")
    summary = fit_summary(groups)
    path = rundir.join(out, "isoflop_fit.json")
    rundir.write_text(path, json.dumps(summary, indent=1) + "\n")
    written["isoflop_fit.json"] = path
    path = rundir.join(out, "isoflop_gaps.json")
    rundir.write_text(path, json.dumps(gap_summary(groups), indent=1) + "\n")
    written["isoflop_gaps.json"] = path
    path = rundir.join(out, "runs.md")
    rundir.write_text(path, runs_table(groups))
    written["runs.md"] = path
    return written
