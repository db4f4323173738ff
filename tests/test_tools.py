"""isoFLOP planning and the paper's figures, on small synthetic run directories."""

import json
import math
from pathlib import Path

import pytest

from modxla import plots
from modxla.config import ConfigError, load_config, save_config
from modxla.metrics import flops_per_step
from tools import isoflop

SIZES = ["2x64", "4x128", "6x192"]


def test_isoflop_runs_land_within_two_percent(tmp_path):
    budget = 3e14
    runs = isoflop.plan("configs/tiny.yaml", budget, SIZES, list(isoflop.VARIANTS))
    assert len(runs) == 12
    for r in runs:
        spent = r["steps"] * flops_per_step(r["config"])
        assert abs(spent - budget) <= 0.02 * budget, r["name"]
    by = {r["name"]: r for r in runs}
    assert by["mod_c12_4x128"]["steps"] > by["baseline_4x128"]["steps"]  # cheaper steps
    assert isoflop.main(["--budget", "3e14", "--sizes", *SIZES, "--out", str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.glob("*.yaml"))
    assert len(written) == 6
    cfg = load_config(tmp_path / "mod_c12_6x192.yaml")
    assert cfg.model.num_layers == 6 and cfg.model.d_model == 192
    assert cfg.train.steps == by["mod_c12_6x192"]["steps"]
    assert (tmp_path / "run_all.sh").read_text().count("modxla.train") == 6


def test_isoflop_refuses_a_budget_it_cannot_hit():
    with pytest.raises(ConfigError, match="cannot spend .* within 2%"):
        isoflop.plan("configs/tiny.yaml", 1e9, ["6x192"], ["baseline"])
    with pytest.raises(ConfigError, match="expected LAYERSxD_MODEL"):
        isoflop.plan("configs/tiny.yaml", 1e15, ["big"], ["baseline"])


def _fake_run(root, name, capacity, d_model, loss0, with_predictor=False):
    run = root / name
    run.mkdir()
    cfg = load_config(
        "configs/tiny.yaml", [f"model.mod.capacity={capacity}", f"model.d_model={d_model}"]
    )
    save_config(cfg, run / "config.yaml")
    fps = flops_per_step(cfg)
    recs = []
    for step in range(10, 101, 10):
        loss = loss0 + 2 * math.exp(-step / 30)
        recs.append(
            {
                "step": step,
                "loss": loss,
                "lm_loss": loss,
                "lr": 1e-3,
                "step_time_s": 0.1 * capacity + 0.05,
                "flops_per_step": fps,
                "predictor_acc/block1": 0.8 + step / 1000,
            }
        )
    recs.append({"step": 100, "val_loss": loss0 + 0.1})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    if with_predictor:
        (run / "predictor").mkdir()
        pre = [{"step": s, "predictor_acc/mean": 0.9 + s / 10000} for s in range(10, 201, 10)]
        (run / "predictor" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pre))
        ev = {"topk": {"nll": 3.0}, "predictor": {"nll": 3.003}}
        (run / "predictor" / "eval.json").write_text(json.dumps(ev))
    return run


def test_plot_renders_every_figure_with_the_papers_axes(tmp_path):
    runs = [
        _fake_run(tmp_path, "base_s", 1.0, 64, 3.3),
        _fake_run(tmp_path, "base_l", 1.0, 128, 3.2),
        _fake_run(tmp_path, "mod_s", 0.125, 64, 3.25, with_predictor=True),
        _fake_run(tmp_path, "mod_l", 0.125, 128, 3.1, with_predictor=True),
    ]
    out = tmp_path / "plots"
    written = plots.render_all(runs, out, warn=pytest.fail)
    assert set(written) == set(plots.FIGURES)
    for path in written.values():
        assert Path(path).stat().st_size > 5000  # a real picture, not an empty file
    loaded = plots.load_runs(runs)
    labels = {
        "loss_vs_params": [("Parameters", "Loss")],
        "loss_vs_flops_wallclock": [("FLOPs (*1e18)", "Loss"), ("Wall-clock (s)", "Loss")],
        "flops_and_steps_per_s": [("", "FLOPs/step (*10^14)"), ("", "Steps/s")],
        "isoflop_loglikelihood": [
            (
                "Normalized FLOPs per FFW pass (to the isoFLOP-optimal baseline)",
                "Normalized log-likelihood",
            )
        ],
        "predictor_accuracy": [("Training step", "Top-k prediction accuracy")],
    }
    for name, fn in plots.FIGURES.items():
        fig = fn(loaded)
        assert [(a.get_xlabel(), a.get_ylabel()) for a in fig.axes] == labels[name]
    iso = plots.isoflop_ll(loaded).axes[0]
    lines = {ln.get_label(): ln.get_xydata() for ln in iso.get_lines() if ln.get_label()[0] != "_"}
    assert set(lines) == {"Baseline", "MoD (12.5%) using top-k", "MoD (12.5%) using predictor"}
    assert min(y for _, y in lines["Baseline"]) == pytest.approx(1.0)  # normalized to the best
    assert loaded[2].variant == "MoD (12.5% capacity, every 2)"
    assert loaded[0].variant == "Baseline"


def test_plot_cli_skips_what_the_runs_lack(tmp_path, capsys):
    from tools import plot

    run = _fake_run(tmp_path, "mod_only", 0.125, 64, 3.2)
    assert plot.main(["--out", str(tmp_path / "p"), str(run)]) == 0
    err = capsys.readouterr().err
    assert "skipped isoflop_loglikelihood: needs at least one baseline run" in err
    assert (tmp_path / "p" / "loss_vs_params.png").exists()
    assert plot.main(["--out", str(tmp_path / "p"), str(tmp_path / "missing")]) == 2
