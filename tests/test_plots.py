"""isoFLOP fits, seed groups and figure readability, on synthetic run directories."""

import json
import math

import numpy as np
import pytest

from modxla.analysis import figures, isoflop, runs
from modxla.analysis.flops import flops_per_step, param_count
from modxla.analysis.runs import fit_summary
from modxla.config import load_config, save_config

BUDGET = 3e12


def test_parabola_fit_recovers_a_known_optimum():
    x = np.linspace(5.2, 6.4, 7)  # log10(params)
    wiggle = 0.002 * np.array([1, -1, 1, -1, 1, -1, 1])  # noise the fit must see through
    loss = 2.0 + 0.5 * (x - 5.8) ** 2 + wiggle
    fit = isoflop.fit_parabola(10**x, loss)
    assert fit["bracketed"]
    assert math.log10(fit["params"]) == pytest.approx(5.8, abs=0.01)
    assert fit["loss"] == pytest.approx(2.0, abs=0.003)
    # the optimum beyond the largest size: not bracketed, reported at the range's edge
    edge = isoflop.fit_parabola(10**x, 2.0 + 0.5 * (x - 7.0) ** 2)
    assert not edge["bracketed"] and edge["params"] == pytest.approx(10**6.4)
    assert math.log10(edge["vertex_params"]) == pytest.approx(7.0)
    down = isoflop.fit_parabola(10**x, 2.0 - 0.5 * (x - 5.8) ** 2)  # a maximum, not an optimum
    assert not down["bracketed"] and down["vertex_params"] is None
    with pytest.raises(ValueError, match="3 distinct sizes"):
        isoflop.fit_parabola([1e5, 1e5, 2e5], [1, 2, 3])


def test_fit_reports_its_residuals_and_a_bootstrap_interval_that_covers_the_truth():
    # six sizes equally spaced in log10(params); truth 2 + 0.8 (x - 5.5)^2, optimum 2.0 at
    # 10^5.5. The seed means sit off it by e, a cubic orthogonal to 1, x, x^2 on these points
    # (the n=6 orthogonal polynomial -5 7 4 -4 -7 5): least squares returns the truth and
    # leaves exactly e as residuals. Three seeds per size at mean -0.03, 0, +0.03.
    x = 5.0 + 0.2 * np.arange(6)
    e = 0.002 * np.array([-5, 7, 4, -4, -7, 5])
    mean = 2 + 0.8 * (x - 5.5) ** 2 + e
    points = [
        {
            "budget": 1e13,
            "variant": "v",
            "params": 10**xi,
            "fwd_flops": 100 * 10**xi,  # a power law: FLOPs/fwd at the optimum is 100 x params
            "loss": float(m),
            "losses": [m - 0.03, m, m + 0.03],
        }
        for xi, m in zip(x, mean, strict=True)
    ]
    (entry,) = isoflop.summarize(points)
    opt = entry["optimum"]
    assert opt["residuals"] == pytest.approx(list(e), abs=1e-9)
    assert opt["rms_residual"] == pytest.approx(0.002 * math.sqrt(180 / 6))
    assert opt["loss"] == pytest.approx(2.0) and opt["params"] == pytest.approx(10**5.5)
    iv = opt["interval"]
    lo, hi = iv["loss"]
    assert lo < 2.0 < hi and hi - lo < 0.06  # seed means move by at most 0.03
    assert iv["params"][0] < 10**5.5 < iv["params"][1]
    assert iv["fwd_flops"][0] < 100 * 10**5.5 < iv["fwd_flops"][1]
    assert (iv["min_seeds"], iv["resamples"], iv["level"]) == (3, 1000, 0.95)
    assert iv["bracketed_fraction"] == 1.0  # the vertex is never pushed out of 5.0..6.0
    table = isoflop.markdown([entry])
    assert "| 1e+13 | v | 6 | 2.0000 | 316,228 | 3.16e+07 | yes | [" in table
    assert table.splitlines()[2].endswith(f"| {0.002 * math.sqrt(180 / 6):.4f} |")
    # one seed per size: no seed noise to resample, the interval is the fit itself
    for p in points:
        p.pop("losses")
    iv = isoflop.summarize(points)[0]["optimum"]["interval"]
    assert iv["min_seeds"] == 1 and iv["loss"] == pytest.approx([2.0, 2.0])
    assert "(1 seed somewhere" in isoflop.markdown(isoflop.summarize(points))


def test_budgets_cluster_within_two_percent():
    assert isoflop.budget_of([1e12, 1.01e12, 2e12, 0.995e12, 2.03e12, 4e12]) == [
        0,
        0,
        1,
        0,
        1,
        2,
    ]


def _size(capacity, layers, d):
    return [
        f"model.mod.capacity={capacity}",
        f"model.num_layers={layers}",
        f"model.d_model={d}",
        f"model.num_heads={d // 32}",
    ]


def _run(root, name, capacity, layers, d, seed, val_loss, train_loss, budget=BUDGET, extra=()):
    """A run dir whose config spends `budget` FLOPs; constant logged train loss; seeds also
    differ in checkpoint.keep (bookkeeping that must not split a group)."""
    over = [*_size(capacity, layers, d), f"train.seed={seed}", f"checkpoint.keep={seed + 1}"]
    over += extra
    per_step = flops_per_step(load_config("configs/tiny.yaml", over))
    steps = round(budget / per_step)
    cfg = load_config("configs/tiny.yaml", [*over, f"train.steps={steps}"])
    run = root / name
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    recs = [
        {
            "step": s,
            "loss": train_loss,
            "lm_loss": train_loss,
            "lr": 1e-3,
            "step_time_s": 0.01 * (seed + 1),
            "flops_per_step": per_step,
        }
        for s in range(steps // 10, steps + 1, steps // 10)
    ]
    recs.append({"step": steps, "val_loss": val_loss})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return run, cfg


def test_seed_groups_average_and_the_isoflop_fit_finds_the_synthetic_optimum(tmp_path):
    # loss = 2 + 0.8 (log10 params - 5.75)^2 per variant (MoD 0.05 lower); seeds at -d, 0, +d
    paths, true = [], {}
    for cap, var in ((1.0, "base"), (0.125, "mod")):
        for layers, d in ((2, 64), (3, 96), (4, 128), (6, 128)):
            for seed, delta in ((0, -0.03), (1, 0.0), (2, 0.03)):
                name = f"{var}_{layers}x{d}_s{seed}"
                x = math.log10(
                    param_count(load_config("configs/tiny.yaml", _size(cap, layers, d)).model)
                )
                loss = 2 + 0.8 * (x - 5.75) ** 2 - (0.05 if cap < 1 else 0)
                true[name] = loss
                run, cfg = _run(tmp_path, name, cap, layers, d, seed, loss + delta, 3.0 + seed)
                paths.append(run)
    groups = runs.group_runs(runs.load_runs(paths))
    assert len(groups) == 8 and all(len(g.runs) == 3 for g in groups)
    g = next(g for g in groups if g.name == "base_4x128")
    assert g.final_loss.mean == pytest.approx(true["base_4x128_s0"])
    assert (g.final_loss.lo, g.final_loss.hi) == pytest.approx(
        (true["base_4x128_s0"] - 0.03, true["base_4x128_s0"] + 0.03)
    )
    assert g.final_loss.std == pytest.approx(0.03)
    _, clock, loss = g.curve()  # EMA of a constant is the constant: mean of 3, 4, 5
    assert [s.mean for s in loss] == pytest.approx([4.0] * len(loss))
    assert [(s.lo, s.hi) for s in loss][-1] == pytest.approx((3.0, 5.0))
    last = g.runs[0].train[-1]["step"]
    assert clock[-1] == pytest.approx(0.02 * last)  # mean step time of the 3 seeds x steps

    summary = fit_summary(groups)  # what render_all writes to isoflop_fit.json
    assert [e["variant"] for e in summary] == ["Baseline", "MoD (12.5% capacity, every 2)"]
    for e in summary:
        assert e["budget_flops"] == pytest.approx(BUDGET, rel=0.02) and e["sizes"] == 4
        opt = e["optimum"]
        assert opt["bracketed"]
        # the sizes' losses lie exactly on the parabola: the vertex is recovered
        assert math.log10(opt["params"]) == pytest.approx(5.75, abs=1e-6)
        assert opt["loss"] == pytest.approx(2.0 - (0.05 if "MoD" in e["variant"] else 0))
        assert [p["seeds"] for p in e["points"]] == [3, 3, 3, 3]
        # seed means on the parabola: no residual; seeds 0.03 either side: the interval
        # holds the vertex
        assert [p["residual"] for p in e["points"]] == pytest.approx([0] * 4, abs=1e-9)
        assert [len(p["losses"]) for p in e["points"]] == [3, 3, 3, 3]
        lo, hi = opt["interval"]["params"]
        assert lo < 10**5.75 < hi
    base_fwd = summary[0]["optimum"]["fwd_flops"]
    assert 2e7 < base_fwd < 3e8  # between the sampled sizes' FLOPs per forward pass
    table = isoflop.markdown(summary)
    assert "| 3e+12 | Baseline | 4 | 2.0000 | 562," in table and "| yes | [" in table
    rows = runs.runs_table(groups).splitlines()[2:]  # what render_all writes to runs.md
    assert len(rows) == 8 and rows[0].startswith("| base_2x64 |")
    m = true["base_4x128_s0"]
    row = next(r for r in rows if r.startswith("| base_4x128 |"))
    assert f"| 3 | {m:.4f} [{m - 0.03:.4f}, {m + 0.03:.4f}] | 0.0300 |" in row

    # error bars on seed means, in the loss-vs-params figure
    fig = figures.loss_vs_params(groups)
    ax = fig.axes[0]
    ys = sorted(y for c in ax.containers for y in c.lines[0].get_ydata())
    assert min(ys) == pytest.approx(min(true.values()))
    bars = [seg for c in ax.containers for seg in c.lines[2][0].get_segments()]
    assert all(s[1][1] - s[0][1] == pytest.approx(0.06) for s in bars)  # min-max of 3 seeds


def test_figures_are_readable(tmp_path):
    paths = [
        _run(tmp_path, f"r{i}", cap, 2, d, 0, 3.0, 3.5)[0]
        for i, (cap, d) in enumerate(((1.0, 64), (1.0, 128), (0.125, 64)))
    ]
    groups = runs.group_runs(runs.load_runs(paths))
    fig = figures.loss_vs_flops_and_clock(groups)
    fig.canvas.draw()
    top = fig.axes[0]
    assert top.xaxis.get_offset_text().get_text() == ""  # no '1e-6' beside the axis
    labels = [t.get_text() for t in top.get_xticklabels() if t.get_text()]
    assert "1e12" in labels and all("e-" not in t for t in labels)
    for f in (fig, figures.loss_vs_params(groups), figures.isoflop_ll(groups)):
        f.canvas.draw()
        ax = next(a for a in f.axes if a.get_legend())
        # the legend sits right of every axes: it covers no curve
        left = ax.get_legend().get_window_extent().x0
        assert all(left >= a.get_window_extent().x1 for a in f.axes)
    assert [runs.sci(v) for v in (0, 2e9, 1.5e12, 5e11, 3)] == ["0", "2e9", "1.5e12", "5e11", "3"]


def test_runs_on_two_corpora_are_never_one_group_or_one_fit(tmp_path):
    paths = [
        _run(tmp_path, f"{src[-3:]}_{d}", 1.0, 2, d, 0, 3.0, 3.5, extra=[f"data.source={src}"])[0]
        for src in ("stdlib", "corpus/man")
        for d in (64, 96, 128)
    ]
    groups = runs.group_runs(runs.load_runs(paths))
    assert sorted({g.variant for g in groups}) == ["Baseline on man", "Baseline on stdlib"]
    summary = fit_summary(groups)
    assert [(e["variant"], e["sizes"]) for e in summary] == [
        ("Baseline on man", 3),
        ("Baseline on stdlib", 3),
    ]
    title = figures.isoflop_ll(groups).axes[0].get_title()
    assert title.endswith("FLOPs, man")  # normalized within one corpus


def test_variant_comparison_orders_variants_by_seed_mean(tmp_path):
    variants = {
        "baseline": ["model.mod.capacity=1.0"],
        "c12": ["model.mod.capacity=0.125"],
        "c50": ["model.mod.capacity=0.5"],
        "rand": ["model.mod.capacity=0.5", "model.mod.router=random"],
    }
    means = {"baseline": 2.42, "c12": 2.40, "c50": 2.47, "rand": 2.45}
    paths = [
        _run(tmp_path, f"{v}_s{s}", 1.0, 4, 128, s, means[v] + d, 3.0, extra=x)[0]
        for v, x in variants.items()
        for s, d in ((0, -0.01), (1, 0.01))
    ]
    ax = figures.variants_at_size(runs.group_runs(runs.load_runs(paths))).axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [
        "MoD (12.5% capacity, every 2) (n=2)",
        "Baseline (n=2)",
        "MoD (50% capacity, random routing, every 2) (n=2)",
        "MoD (50% capacity, every 2) (n=2)",
    ]
    (bars,) = ax.containers
    assert list(bars.lines[0].get_xdata()) == pytest.approx([2.40, 2.42, 2.45, 2.47])
    segs = bars.lines[2][0].get_segments()
    assert [s[1][0] - s[0][0] for s in segs] == pytest.approx([0.02] * 4)  # min-max of 2 seeds


def test_post_hoc_predictor_curve_prefers_validation_records():
    cfg = load_config("configs/tiny.yaml", [])
    recs = [
        {"step": 10, "predictor_loss": 0.3, "predictor_acc/mean": 0.90},
        {"step": 10, "val/predictor_acc": 0.93, "val/always_skip_acc": 0.875},
        {"step": 20, "predictor_loss": 0.2, "predictor_acc/mean": 0.94},
        {"step": 20, "val/predictor_acc": 0.95, "val/always_skip_acc": 0.875},
    ]
    assert figures._post_hoc(runs.Run("r", cfg, predictor=recs)) == [(10, 0.93), (20, 0.95)]
    train_only = [r for r in recs if "predictor_acc/mean" in r]
    assert figures._post_hoc(runs.Run("r", cfg, predictor=train_only)) == [(10, 0.9), (20, 0.94)]
    fig = figures.predictor_accuracy([runs.Group([runs.Run("r", cfg, predictor=recs)])])
    assert list(fig.axes[0].lines[0].get_ydata()) == [0.93, 0.95]


def test_moe_and_mode_runs_are_named_and_fitted_with_a_color_per_variant(tmp_path):
    moe = ["model.moe.experts=4", "model.moe.every=2", "model.moe.capacity_factor=1.25"]
    kinds = {
        "base": (1.0, []),
        "moe": (1.0, moe),
        "staged": (0.125, moe),
        "int": (1.0, [*moe, "model.moe.noop_experts=4"]),
        "ec": (1.0, [*moe, "model.moe.routing=expert"]),  # another routing: another curve
    }
    paths = []
    for var, (cap, extra) in kinds.items():
        for (layers, d), loss in zip(((2, 64), (3, 96), (4, 128)), (2.2, 2.0, 2.1), strict=True):
            name = f"{var}_{layers}x{d}"
            paths.append(_run(tmp_path, name, cap, layers, d, 0, loss, loss, extra=extra)[0])
    groups = runs.group_runs(runs.load_runs(paths))
    tail = "top-1, capacity factor 1.25, every 2)"
    assert {g.name.split("_")[0]: g.variant for g in groups} == {
        "base": "Baseline",
        "moe": f"MoE (4 experts, {tail}",
        "staged": f"Staged MoDE (12.5% capacity, 4 experts, {tail}",
        "int": f"Integrated MoDE (4 experts + 4 no-op, {tail}",
        "ec": "MoE (4 experts, expert choice, capacity factor 1.25, every 2)",
    }
    assert {g.short_variant for g in groups if g.cfg.model.moe_layers} == {
        "MoE 4x1.25/2",
        "Staged MoDE 12.5% 4x1.25/2",
        "Integrated MoDE 4x1.25/2+4",
        "MoE 4x1.25/2 EC",
    }
    assert [g.name for g in groups if g.is_baseline] == ["base_2x64", "base_3x96", "base_4x128"]
    # one budget: each variant's points and parabola in its own color
    ax = figures.isoflop_figure(groups).axes[0]
    fitted = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == 100]  # the parabolas
    assert len(fitted) == 5 and len({ln.get_color() for ln in fitted}) == 5
    labels = figures.isoflop_ll(groups).axes[0].get_legend_handles_labels()[1]
    assert {"Baseline", "MoE 4x1.25/2", "Integrated MoDE 4x1.25/2+4"} <= set(labels)
    assert not any("100%" in label for label in labels)  # MoE is not labelled as MoD


def _points(budget, variant, optimum, spread, x=(5.0, 5.2, 5.4, 5.6, 5.8, 6.0)):
    """Six sizes on 2 + 0.8 (x - 5.5)^2 shifted to `optimum`, three seeds at +-spread."""
    pts = []
    for xi in x:
        m = optimum + 0.8 * (xi - 5.5) ** 2
        pts.append(
            {
                "budget": budget,
                "variant": variant,
                "params": 10**xi,
                "fwd_flops": 10 ** (xi + 2),
                "loss": m,
                "losses": [m - spread, m, m + spread],
            }
        )
    return pts


def test_gaps_state_per_budget_which_claim_the_seeds_allow():
    """MoD 0.05 below the baseline with seeds +-0.01 beats it; 0.005 below with seeds +-0.03
    is not separated; 0.05 above loses; the gap's interval holds the true difference."""
    mod = "MoD (12.5% capacity, every 2)"
    points = _points(1e12, "Baseline", 2.0, 0.01) + _points(1e12, mod, 1.95, 0.01)
    points += _points(1e13, "Baseline", 1.8, 0.03) + _points(1e13, mod, 1.795, 0.03)
    points += _points(3e13, "Baseline", 1.7, 0.01) + _points(3e13, mod, 1.75, 0.01)
    points += _points(3e13, "MoE (4 experts)", 1.6, 0.01)[:2]  # two sizes: no fit, no claim
    claims = isoflop.gaps(points)
    assert [(c["budget_flops"], c["variant"]) for c in claims] == [
        (1e12, mod),
        (1e13, mod),
        (3e13, mod),
    ]
    want = {
        1e12: (-0.05, "beats the baseline"),
        1e13: (-0.005, "not separated"),
        3e13: (0.05, "loses to the baseline"),
    }
    for c in claims:
        gap, verdict = want[c["budget_flops"]]
        assert c["gap"] == pytest.approx(gap, abs=1e-9) and c["verdict"] == verdict
        lo, hi = c["interval"]
        assert lo < gap < hi and hi - lo < 0.1
        assert c["bracketed"] == [True, True] and c["min_seeds"] == 3
        assert c["reference"] == "Baseline"
    table = isoflop.gaps_markdown(claims)
    assert "| 1e+12 | MoD (12.5% capacity, every 2) | -0.0500 | [" in table
    assert table.count("| yes, yes | yes |") == 3
    # one seed at every size: the interval is the point itself and the table says so
    for p in points:
        p.pop("losses")
    one = isoflop.gaps(points)[1]
    assert one["interval"] == pytest.approx([-0.005, -0.005]) and one["min_seeds"] == 1
    assert one["verdict"] == "one seed: no interval"  # not 'beats': nothing was resampled
    # seeds at one size only: a verdict, flagged in the table
    for p in points[:1] + points[6:7]:
        p["losses"] = [p["loss"] - 0.01, p["loss"] + 0.01]
    part = isoflop.gaps(points)[0]
    assert part["verdict"] == "beats the baseline" and part["min_seeds"] == 1
    assert "beats the baseline (1 seed somewhere" in isoflop.gaps_markdown([part])
    # another corpus's variant is compared with that corpus's baseline only
    other = _points(1e12, "Baseline on man", 2.5, 0.01) + _points(1e12, f"{mod} on man", 2.4, 0.01)
    (c,) = isoflop.gaps(other + _points(1e12, "Baseline", 2.0, 0.01))
    assert c["reference"] == "Baseline on man" and c["gap"] == pytest.approx(-0.1)
