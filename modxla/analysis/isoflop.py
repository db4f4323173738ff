"""isoFLOP fits: per training budget and variant, loss vs parameters as a parabola in
log10(parameters) (the paper's Fig. 3, left), its optimum, and whether the sweep brackets it.

Pure numbers here (numpy); modxla.analysis.figures draws them.
"""

from __future__ import annotations

import math

import numpy as np

TOLERANCE = 0.02  # runs whose training FLOPs agree this closely share a budget (as the planner)
RESAMPLES = 1000  # bootstrap resamples of the seeds
LEVEL = 0.95  # the bootstrap interval's coverage


def fit_parabola(params, losses) -> dict:
    """Least-squares loss = a*x^2 + b*x + c with x = log10(params), and its optimum.

    bracketed: the parabola opens upward and its vertex lies strictly inside the sampled
    parameter range. Bracketed, the optimum is the vertex; otherwise it is the lowest point
    of the fitted curve on the sampled range (an edge, so a bound, not an optimum).
    Needs at least 3 distinct sizes.
    """
    x = np.log10(np.asarray(params, dtype=float))
    y = np.asarray(losses, dtype=float)
    if len(np.unique(x)) < 3:
        raise ValueError(f"a parabola needs 3 distinct sizes, got {len(np.unique(x))}")
    a, b, c = (float(v) for v in np.polyfit(x, y, 2))
    lo, hi = float(x.min()), float(x.max())
    vertex = -b / (2 * a) if a != 0 else math.nan
    bracketed = a > 0 and lo < vertex < hi
    if bracketed:
        best = vertex
    else:
        grid = np.linspace(lo, hi, 201)
        best = float(grid[np.argmin(np.polyval([a, b, c], grid))])
    return {
        "coef": [a, b, c],
        "params": 10**best,
        "loss": float(np.polyval([a, b, c], best)),
        "bracketed": bool(bracketed),
        # None: the fit opens downward, or is so flat that its vertex is off any scale
        "vertex_params": 10**vertex if a > 0 and abs(vertex) < 300 else None,
    }


def budget_of(totals: list[float], tol: float = TOLERANCE) -> list[int]:
    """Cluster training-FLOP totals: index of each total's budget (budgets in ascending order).

    A total joins the budget whose smallest member it is within `tol` of.
    """
    order = sorted(range(len(totals)), key=lambda i: totals[i])
    out = [0] * len(totals)
    budget, first = -1, None
    for i in order:
        if first is None or totals[i] > first * (1 + tol):
            budget, first = budget + 1, totals[i]
        out[i] = budget
    return out


def interp_loglog(x: float, xs, ys) -> float:
    """y at x from a straight line through (log xs, log ys): FLOPs per forward pass at a
    fitted parameter count (close to a power law across one variant's sizes)."""
    if len(set(xs)) < 2:
        return float(ys[0])
    slope, icpt = np.polyfit(np.log(xs), np.log(ys), 1)
    return float(math.exp(icpt + slope * math.log(x)))


def _optimum(pts: list[dict], losses) -> tuple[dict, float]:
    """The parabola's fit through one loss per point, and FLOPs per forward pass there."""
    fit = fit_parabola([p["params"] for p in pts], losses)
    fwd = interp_loglog(fit["params"], [p["params"] for p in pts], [p["fwd_flops"] for p in pts])
    return fit, fwd


def _resample(pts: list[dict], rng, resamples: int) -> dict[str, np.ndarray]:
    """The optimum refitted on `resamples` draws of every size's seeds (with replacement)."""
    seeds = [np.asarray(p.get("losses") or [p["loss"]], dtype=float) for p in pts]
    out: dict[str, list] = {"loss": [], "params": [], "fwd_flops": [], "bracketed": []}
    for _ in range(resamples):
        means = [float(rng.choice(s, size=len(s)).mean()) for s in seeds]
        fit, fwd = _optimum(pts, means)
        out["loss"].append(fit["loss"])
        out["params"].append(fit["params"])
        out["fwd_flops"].append(fwd)
        out["bracketed"].append(fit["bracketed"])
    return {k: np.asarray(v) for k, v in out.items()}


def _interval(values) -> list[float]:
    tail = 100 * (1 - LEVEL) / 2
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def _min_seeds(pts: list[dict]) -> int:
    return min(len(p.get("losses") or [p["loss"]]) for p in pts)


def bootstrap(pts: list[dict], resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Intervals of the optimum's loss, parameters and FLOPs per forward pass over the seeds:
    each resample draws every size's seeds with replacement and refits the seed means.

    Only seed noise is in it: with one seed at every size the interval is a point (min_seeds
    says so), and the parabola's own misfit is in the residuals instead.
    """
    r = _resample(pts, np.random.default_rng(seed), resamples)
    return {
        **{k: _interval(r[k]) for k in ("loss", "params", "fwd_flops")},
        "level": LEVEL,
        "resamples": resamples,
        "bracketed_fraction": float(r["bracketed"].mean()),  # resamples with the vertex inside
        "min_seeds": _min_seeds(pts),
    }


REFERENCE = "Baseline"


def _curves(points: list[dict]) -> dict[tuple, list[dict]]:
    """Points by (budget, variant), each curve ascending in parameters."""
    by: dict[tuple, list[dict]] = {}
    for p in sorted(points, key=lambda p: p["params"]):
        by.setdefault((p["budget"], p["variant"]), []).append(p)
    return by


def _corpus(variant: str) -> str:
    """' on man' of 'MoD (...) on man' (runs.Group.variant's suffix), '' for the default."""
    return variant[variant.index(" on ") :] if " on " in variant else ""


def gaps(points: list[dict], resamples: int = RESAMPLES, seed: int = 0) -> list[dict]:
    """Per budget, each variant's isoFLOP-optimal loss minus the baseline's (same corpus),
    with a bootstrap interval: both optima refitted on independent draws of their seeds.

    verdict: 'beats the baseline' when the whole interval is below 0, 'loses to the
    baseline' when above, else 'not separated'; 'one seed: no interval' when no size of
    either has two seeds. A claim also needs both optima bracketed and seeds at every size;
    `bracketed` and `min_seeds` say whether it has them."""
    fits = {k: v for k, v in _curves(points).items() if len({p["params"] for p in v}) >= 3}
    out = []
    for (budget, variant), pts in sorted(fits.items()):
        ref = fits.get((budget, REFERENCE + _corpus(variant)))
        if ref is None or variant.startswith(REFERENCE):
            continue
        rng = np.random.default_rng(seed)
        mine, theirs = _resample(pts, rng, resamples), _resample(ref, rng, resamples)
        (fit, _), (ref_fit, _) = (
            _optimum(pts, [p["loss"] for p in pts]),
            _optimum(ref, [p["loss"] for p in ref]),
        )
        lo, hi = _interval(mine["loss"] - theirs["loss"])
        if max(len(p.get("losses") or [0]) for p in pts + ref) < 2:
            verdict = "one seed: no interval"  # nothing resampled: [gap, gap] says nothing
        elif hi < 0:
            verdict = "beats the baseline"
        else:
            verdict = "loses to the baseline" if lo > 0 else "not separated"
        out.append(
            {
                "budget_flops": budget,
                "variant": variant,
                "reference": REFERENCE + _corpus(variant),
                "gap": fit["loss"] - ref_fit["loss"],
                "interval": [lo, hi],
                "verdict": verdict,
                "bracketed": [fit["bracketed"], ref_fit["bracketed"]],
                "min_seeds": min(_min_seeds(pts), _min_seeds(ref)),
                "level": LEVEL,
                "resamples": resamples,
            }
        )
    return out


def gaps_markdown(claims: list[dict]) -> str:
    """The per-budget claims as a markdown table."""
    rows = [
        "| budget (FLOPs) | variant | optimum loss - baseline's | interval | claim | optima "
        "bracketed (variant, baseline) | seeds at every size |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in claims:
        lo, hi = c["interval"]
        verdict = c["verdict"]
        if c["min_seeds"] < 2 and not verdict.startswith("one seed"):
            verdict += " (1 seed somewhere: seed noise not sampled there)"
        if not all(c["bracketed"]):
            verdict += " (an optimum at the range's edge: a bound)"
        br = ", ".join("yes" if b else "no" for b in c["bracketed"])
        rows.append(
            f"| {c['budget_flops']:.3g} | {c['variant']} | {c['gap']:+.4f} | [{lo:+.4f}, "
            f"{hi:+.4f}] | {verdict} | {br} | {'yes' if c['min_seeds'] > 1 else 'no'} |"
        )
    return "\n".join(rows) + (
        f"\n\nIntervals: {LEVEL:.0%} bootstrap of the difference "
        f"({claims[0]['resamples'] if claims else RESAMPLES} resamples, each "
        "variant's seeds drawn independently and both parabolas refitted)."
    )


def summarize(points: list[dict]) -> list[dict]:
    """One entry per (budget, variant) from points {budget, variant, params, loss, fwd_flops,
    optionally losses: one per seed} (one per size, loss the seed mean). Entries with fewer
    than 3 sizes carry no fit; a fit carries its residuals (seed mean - parabola, ascending in
    parameters) and the bootstrap interval over seeds."""
    out = []
    for (budget, variant), pts in sorted(_curves(points).items()):
        entry = {
            "budget_flops": budget,
            "variant": variant,
            "sizes": len(pts),
            "params_range": [pts[0]["params"], pts[-1]["params"]],
            "best_sampled": {
                k: min(pts, key=lambda p: p["loss"])[k] for k in ("params", "loss", "fwd_flops")
            },
        }
        if len({p["params"] for p in pts}) >= 3:
            fit, fwd = _optimum(pts, [p["loss"] for p in pts])
            x = np.log10([p["params"] for p in pts])
            fitted = np.polyval(fit["coef"], x)
            residuals = [float(v) for v in np.asarray([p["loss"] for p in pts]) - fitted]
            entry["optimum"] = {
                "loss": fit["loss"],
                "params": fit["params"],
                "fwd_flops": fwd,
                "bracketed": fit["bracketed"],
                "coef": fit["coef"],
                "residuals": residuals,
                "rms_residual": float(np.sqrt(np.mean(np.square(residuals)))),
                "interval": bootstrap(pts),
            }
        out.append(entry)
    return out


def markdown(summary: list[dict]) -> str:
    """The summary as a markdown table."""
    rows = [
        "| budget (FLOPs) | variant | sizes | optimum loss | params | FLOPs/fwd pass | bracketed "
        "| loss interval | params interval | FLOPs/fwd interval | rms residual |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        o = e.get("optimum")
        if o is None:
            b = e["best_sampled"]
            cells = [f"{b['loss']:.4f} (best sampled; no fit)", f"{b['params']:,.0f}"]
            cells += [f"{b['fwd_flops']:.3g}", "n/a (< 3 sizes)", "", "", "", ""]
        else:
            iv = o["interval"]
            cells = [f"{o['loss']:.4f}", f"{o['params']:,.0f}", f"{o['fwd_flops']:.3g}"]
            cells.append("yes" if o["bracketed"] else "no (edge of the range)")
            cells += [
                f"[{iv['loss'][0]:.4f}, {iv['loss'][1]:.4f}]",
                f"[{iv['params'][0]:,.0f}, {iv['params'][1]:,.0f}]",
                f"[{iv['fwd_flops'][0]:.3g}, {iv['fwd_flops'][1]:.3g}]",
                f"{o['rms_residual']:.4f}",
            ]
            if iv["min_seeds"] < 2:
                cells[-4] += " (1 seed somewhere: seed noise not sampled there)"
        rows.append(
            f"| {e['budget_flops']:.3g} | {e['variant']} | {e['sizes']} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(rows) + (
        f"\n\nIntervals: {LEVEL:.0%} bootstrap over seeds ({RESAMPLES} resamples of each "
        "size's seeds, refitted); rms residual: the seed means' distance from the parabola."
    )
