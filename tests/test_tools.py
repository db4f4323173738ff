"""isoFLOP planning and the paper's figures, on small synthetic run directories."""

import json
import math
import os
import re
import signal
from pathlib import Path

import pytest
import torch

from modxla.analysis import figures, runs
from modxla.analysis.flops import flops_per_step, forward_flops
from modxla.cli import isoflop
from modxla.config import ConfigError, load_config, save_config
from modxla.errors import EXIT_STOPPED
from modxla.model.moe import expert_capacity
from tests.conftest import cpu_trainer, read_metrics

SIZES = ["2x64", "4x128", "6x192"]


def test_isoflop_runs_land_within_two_percent(tmp_path):
    budget = 3e14
    runs = isoflop.plan("configs/tiny.yaml", budget, SIZES, list(isoflop.VARIANTS))
    assert len(runs) == 3 * len(isoflop.VARIANTS)
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
    script = (tmp_path / "run_all.sh").read_text()
    assert script.count("modxla.train") == 6
    # another budget's runs never resume these: each budget has its own folder
    assert isoflop.main(["--budget", "6e14", "--sizes", *SIZES, "--out", str(tmp_path / "b")]) == 0
    other = (tmp_path / "b" / "run_all.sh").read_text()
    dirs = [set(re.findall(r"--run-dir (\S+)", s)) for s in (script, other)]
    assert len(dirs[0]) == len(dirs[1]) == 6 and not dirs[0] & dirs[1]
    assert all(d.startswith("runs/isoflop/3e14/") for d in dirs[0])


def test_isoflop_mode_variants_cost_what_docs_study_sh_phase_13_intends():
    """MoE, staged and integrated MoDE and the capacity-cut MoE at the study's 2x64, T 64, B 16:
    hand-computed expert slots and the FLOPs/step ratios they give (no training)."""
    names = ["baseline", "moe", "mod_c12", "mode_staged", "mode_integrated", "moe_capacity"]
    over = ["train.batch_size=16", *isoflop.size_overrides("2x64")]
    cfg = {v: load_config("configs/tiny.yaml", [*over, *isoflop.VARIANTS[v]]) for v in names}
    m = {v: c.model for v, c in cfg.items()}
    # one MoE block of two, the block MoD routes; integrated and the MoE route no tokens
    assert m["moe"].moe_layers == m["mode_staged"].routed_layers == [1]
    assert m["mode_staged"].moe_layers == [1] and m["mode_staged"].mod.capacity == 0.125
    assert not m["moe"].routed_layers and not m["mode_integrated"].routed_layers
    assert (m["mode_integrated"].moe.experts, m["mode_integrated"].moe.noop_experts) == (4, 4)
    # slots per expert and sequence: 1.25 * 64 / 4 = 20; with 4 no-op experts 1.25 * 64 / 8 =
    # 10, as the MoE at capacity factor 0.625; staged: round(1.25 * 8 / 4) = 2 of k = 8
    slots = {v: expert_capacity(m[v].moe, 64) for v in ("moe", "mode_integrated", "moe_capacity")}
    assert slots == {"moe": 20, "mode_integrated": 10, "moe_capacity": 10}
    assert expert_capacity(m["mode_staged"].moe, 8) == 2
    # MLP FLOPs: the dense block's 64 tokens plus the MoE block's 4 x C slots
    mlp = {v: forward_flops(m[v], 64)["mlp"] for v in names}
    assert mlp["moe"] == mlp["baseline"] * (64 + 80) / 128
    assert mlp["mode_integrated"] == mlp["moe_capacity"] == mlp["baseline"] * (64 + 40) / 128
    assert mlp["mode_staged"] == mlp["mod_c12"]  # 8 slots for the k = 8 routed tokens
    f = {v: flops_per_step(c) for v, c in cfg.items()}
    r = {v: f[v] / f["baseline"] for v in names}
    assert 1.05 < r["moe"] < 1.07  # capacity factor 1.25 in one MLP of two
    assert r["mode_staged"] == pytest.approx(r["mod_c12"], rel=1e-3) and r["mod_c12"] < 0.7
    assert 0.9 < r["mode_integrated"] < 0.92
    # the token-dropping control matches integrated MoDE but for its smaller router (4 vs 8)
    assert r["moe_capacity"] < r["mode_integrated"]
    assert r["moe_capacity"] == pytest.approx(r["mode_integrated"], rel=2e-3)
    # each run spends the 2e12 budget of the study, so the cheaper steps are more steps
    runs = {
        r["name"]: r
        for r in isoflop.plan("configs/tiny.yaml", 2e12, ["2x64"], names, extra=over[:1])
    }
    assert all(abs(r["flops"] - 2e12) <= 0.02 * 2e12 for r in runs.values())
    steps = [runs[f"{v}_2x64"]["steps"] for v in ("moe", "baseline", "mode_integrated", "mod_c12")]
    assert steps == sorted(steps) and steps[0] < steps[1]


def test_isoflop_seeds_and_extra_overrides(tmp_path, capsys):
    argv = ["--budget", "3e14", "--sizes", "2x64", "--variants", "baseline", "--out"]
    extra = ["--set", "train.device=cpu", "data.seq_len=32", "--set", "train.log_every=5"]
    assert isoflop.main([*argv, str(tmp_path / "a"), "--seeds", "0", "1", "2", *extra]) == 0
    names = sorted(p.stem for p in (tmp_path / "a").glob("*.yaml"))
    assert names == ["baseline_2x64_s0", "baseline_2x64_s1", "baseline_2x64_s2"]
    cfgs = [load_config(tmp_path / "a" / f"{n}.yaml") for n in names]
    assert [c.train.seed for c in cfgs] == [0, 1, 2]
    assert {c.data.seed for c in cfgs} == {0}  # same validation documents for every seed
    c = cfgs[1]
    assert (c.train.device, c.data.seq_len, c.train.log_every) == ("cpu", 32, 5)
    # the half-length sequences are budgeted for: about twice the steps of the T64 plan
    t64 = isoflop.plan("configs/tiny.yaml", 3e14, ["2x64"], ["baseline"])[0]
    assert abs(c.train.steps * flops_per_step(c) - 3e14) <= 0.02 * 3e14
    assert c.train.steps > 1.9 * t64["steps"]
    assert isoflop.main([*argv, str(tmp_path / "b")]) == 0  # one seed: names unchanged
    assert [p.stem for p in (tmp_path / "b").glob("*.yaml")] == ["baseline_2x64"]
    capsys.readouterr()
    assert isoflop.main([*argv, str(tmp_path / "c"), "--set", "train.steps=9"]) == 2
    assert "the sweep sets train.steps and train.seed itself" in capsys.readouterr().err
    assert isoflop.main([*argv, str(tmp_path / "c"), "--seeds", "1", "1"]) == 2
    both = isoflop.plan("configs/tiny.yaml", 3e14, ["2x64"], ["baseline"], [3, 4], seed_data=True)
    assert [(r["config"].train.seed, r["config"].data.seed) for r in both] == [(3, 3), (4, 4)]
    assert isoflop.main([*argv, str(tmp_path / "c"), "--set", "train.nope=1"]) == 2


def test_isoflop_refuses_a_budget_it_cannot_hit():
    with pytest.raises(ConfigError, match="cannot spend .* within 2%"):
        isoflop.plan("configs/tiny.yaml", 1e9, ["6x192"], ["baseline"])
    with pytest.raises(ConfigError, match="expected LAYERSxD_MODEL"):
        isoflop.plan("configs/tiny.yaml", 1e15, ["big"], ["baseline"])


def _fake_run(root, name, capacity, d_model, loss0, with_predictor=False, budget=3e12):
    run = root / name
    run.mkdir()
    over = [f"model.mod.capacity={capacity}", f"model.d_model={d_model}"]
    steps = round(budget / flops_per_step(load_config("configs/tiny.yaml", over)))
    cfg = load_config("configs/tiny.yaml", [*over, f"train.steps={steps}"])  # one budget
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
    dirs = [
        _fake_run(tmp_path, "base_s", 1.0, 64, 3.3),
        _fake_run(tmp_path, "base_m", 1.0, 96, 3.15),
        _fake_run(tmp_path, "base_l", 1.0, 128, 3.2),
        _fake_run(tmp_path, "mod_s", 0.125, 64, 3.25, with_predictor=True),
        _fake_run(tmp_path, "mod_m", 0.125, 96, 3.05, with_predictor=True),
        _fake_run(tmp_path, "mod_l", 0.125, 128, 3.1, with_predictor=True),
    ]
    out = tmp_path / "plots"
    skipped = []
    written = figures.render_all(dirs, out, warn=skipped.append)
    # two variants only: the variant comparison (tests/test_plots.py) has nothing to show
    assert skipped == ["skipped variants_at_size: needs 3 or more variants at one size and budget"]
    drawn = set(figures.FIGURES) - {"variants_at_size"}
    assert set(written) == {*drawn, "isoflop_fit.json", "isoflop_gaps.json", "runs.md"}
    for name in drawn:
        assert Path(written[name]).stat().st_size > 5000  # a real picture, not an empty file
    loaded = runs.group_runs(runs.load_runs(dirs))
    smooth = "Training loss (EMA 0.9 over logged steps)"
    labels = {
        "loss_vs_params": [("Parameters", "Final loss (validation, else last train losses)")],
        "loss_vs_flops_wallclock": [
            ("Training FLOPs", smooth),
            ("Wall-clock (s, mean over seeds)", smooth),
        ],
        "flops_and_steps_per_s": [("", "FLOPs per step"), ("", "Steps/s")],
        "isoflop_loglikelihood": [
            (
                "Normalized FLOPs per FFW pass (to the isoFLOP-optimal baseline)",
                "Normalized log-likelihood",
            )
        ],
        "predictor_accuracy": [("Training step", "Top-k prediction accuracy")],
        "isoflop_fit": [("Parameters", "Final validation loss")],
        "isoflop_gap": [("Training FLOPs", "Optimum loss - baseline's optimum")],
    }
    for name in drawn:
        fig = figures.FIGURES[name](loaded)
        assert [(a.get_xlabel(), a.get_ylabel()) for a in fig.axes] == labels[name]
    iso = figures.isoflop_ll(loaded).axes[0]
    lines = {c.get_label(): c.lines[0].get_xydata() for c in iso.containers}
    assert set(lines) == {"Baseline", "MoD (12.5%) using top-k", "MoD (12.5%) using predictor"}
    assert min(y for _, y in lines["Baseline"]) == pytest.approx(1.0)  # normalized to the best
    assert loaded[3].variant == "MoD (12.5% capacity, every 2)"
    (claim,) = json.loads(Path(written["isoflop_gaps.json"]).read_text())
    assert claim["variant"] == loaded[3].variant and claim["gap"] < 0
    assert claim["verdict"] == "one seed: no interval"
    gap = figures.isoflop_gap(loaded).axes[0]
    assert gap.containers[0].lines[0].get_ydata()[0] == pytest.approx(claim["gap"])
    assert loaded[0].variant == "Baseline"


def test_plot_cli_skips_what_the_runs_lack(tmp_path, capsys):
    from tools import plot

    run = _fake_run(tmp_path, "mod_only", 0.125, 64, 3.2)
    assert plot.main(["--out", str(tmp_path / "p"), str(run)]) == 0
    err = capsys.readouterr().err
    assert "skipped isoflop_loglikelihood: needs at least one baseline run" in err
    assert (tmp_path / "p" / "loss_vs_params.png").exists()
    assert plot.main(["--out", str(tmp_path / "p"), str(tmp_path / "missing")]) == 2


def test_a_bug_in_a_figure_is_not_reported_as_skipped(tmp_path, monkeypatch):
    run = _fake_run(tmp_path, "mod_only", 0.125, 64, 3.2)

    def broken(runs):
        return {}["missing"]  # a programming error, not missing data

    monkeypatch.setitem(figures.FIGURES, "loss_vs_params", broken)
    with pytest.raises(KeyError):
        figures.render_all([run], tmp_path / "p", warn=lambda m: None)


def test_isoflop_default_base_config_is_found_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert isoflop.main(["--budget", "3e14", "--sizes", "2x64", "--out", "o"]) == 0
    assert (tmp_path / "o" / "run_all.sh").exists()


FAKE_PAGE = rb""".TH FAKE 1 "2026" "modxla" "User Commands"
.SH NAME
fake \- print everything twice
.SH DESCRIPTION
The \fBfake\fR command prints \fIeverything\fP twice, with internationalization
considerations for extraordinarily long words in a justified paragraph that wraps.
.TP
.B \-v
be verbose
"""


def test_prepare_corpus_renders_man_pages_to_plain_text(tmp_path, capsys):
    import gzip
    import shutil

    from modxla.cli import prepare_corpus

    if shutil.which("groff") is None or shutil.which("col") is None:
        pytest.skip("groff/col not installed")
    pages = tmp_path / "man1"
    pages.mkdir()
    (pages / "fake.1.gz").write_bytes(gzip.compress(FAKE_PAGE))
    (pages / "alias.1.gz").write_bytes(gzip.compress(b".so man1/fake.1\n"))  # a redirect
    real = Path("/usr/share/man/man1/ls.1.gz")  # a real page too, where this machine has one
    if real.exists():
        shutil.copy(real, pages / "ls.1.gz")
    argv = ["--pages", str(pages / "*.gz"), "--max-chars", "100000"]
    assert prepare_corpus.main([*argv, "--out", str(tmp_path / "a")]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["pages"] == (2 if real.exists() else 1) and stats["skipped"] == 1
    files = sorted((tmp_path / "a").iterdir())  # data.source=<folder>: one document per file
    assert all(f.suffix == ".txt" for f in files)
    texts = {Path(f).name.split("_", 1)[1]: Path(f).read_text() for f in files}
    fake = texts["fake.1.txt"]
    assert "The fake command prints everything twice, with internationalization" in fake
    assert "\\f" not in fake and "\b" not in fake and "\n." not in fake  # no roff, no overstrikes
    assert "  " not in fake.split("DESCRIPTION")[1].split("\n")[1].strip()  # no justification
    if real.exists():
        ls = texts["ls.1.txt"]
        assert "list directory contents" in ls and "\\f" not in ls and ".TH" not in ls
        assert not any(line.startswith(".") for line in ls.splitlines())
    assert sum(len(t) for t in texts.values()) == stats["chars"]
    # the cap is exact, the order fixed by the seed, and jsonl is the other output
    small = [*argv[:3], "300", "--out", str(tmp_path / "b.jsonl")]
    assert prepare_corpus.main(small) == 0
    rows = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert sum(len(r["text"]) for r in rows) == 300
    assert prepare_corpus.main([*small[:-1], str(tmp_path / "c.jsonl")]) == 0
    assert (tmp_path / "c.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    capsys.readouterr()
    assert prepare_corpus.main(small) == 2  # an output in the way is not overwritten
    assert "exists and is not empty" in capsys.readouterr().err
    assert prepare_corpus.main(["--pages", str(tmp_path / "none*"), "--out", "x"]) == 2


@pytest.mark.parametrize(
    "module, argv, message",
    [
        ("modxla.cli.bench_data", ["train.batch_size=-1"], "error: train.batch_size: must be > 0"),
        (
            "tools.bench_step",
            ["--baseline", "nope.yaml"],
            "error: config file not found: nope.yaml",
        ),
        ("tools.profile_step", ["--mod", "nope.yaml"], "error: config file not found: nope.yaml"),
        ("tools.profile_ops", ["--mod", "nope.yaml"], "error: config file not found: nope.yaml"),
        ("tools.demo", ["model.mod.capacity=3"], "error: model.mod.capacity: must be in (0, 1]"),
        (
            "modxla.cli.generate",
            ["--run-dir", "nowhere", "--prompt", "x"],
            "error: nowhere is not a run",
        ),
    ],
)
def test_tools_refuse_bad_input_without_a_traceback(module, argv, message, capsys):
    import importlib

    tool = importlib.import_module(module)
    assert tool.main(argv) == 2
    assert message in capsys.readouterr().err


def test_demo_shows_the_xla_deprecation_line_once(monkeypatch):
    import io

    from tools import demo

    line = b"W sharding_propagation.cc] " + demo.DEPRECATION + b" (Shardy)\n"
    out = io.BytesIO()
    monkeypatch.setitem(demo._shown, "deprecation", False)
    demo._pump(io.BytesIO(line + b"train  10%\rtrain  20%\r" + line + b"done\n" + line), out)
    demo._pump(io.BytesIO(line + b"next step"), out)
    assert out.getvalue() == line + b"train  10%\rtrain  20%\rdone\nnext step"


# --- the post-hoc predictor tool (in-process, native CPU device: no XLA compile) ----------


def _predictor_main(run_dir, *args):
    from modxla.cli.train_predictor import main

    return main(["--run-dir", str(run_dir), "--log-every", "1", "--eval-batches", "2", *args])


def _pred_weight(path):
    from modxla.io.checkpoint import load

    key = "blocks.1.predictor.fc1.weight"
    return load(path, {"model": {key: torch.zeros(32, 64)}})["model"][key]


@pytest.mark.slow
def test_predictor_tool_adds_fresh_predictors_to_a_model_trained_without(
    tmp_path, data_cache, capsys
):
    from modxla.inference.load import load_run
    from modxla.routing.evaluate import evaluate_routing

    t, _ = cpu_trainer(tmp_path, data_cache, "run", "train.steps=4", "model.mod.predictor=false")
    run_dir = tmp_path / "run"
    base_cfg, base_model, _ = load_run(run_dir)
    val = [torch.from_numpy(t.train_seqs[:4].astype("int64"))]
    res = evaluate_routing(base_model, val)  # no predictors: no TypeError, no predictor mode
    assert set(res) == {"topk", "router", "batches"}
    assert _predictor_main(run_dir, "--steps", "6") == 0
    out = capsys.readouterr()
    assert "predictors: fresh" in out.out and "fresh predictors" in out.err
    ev = json.loads((run_dir / "predictor" / "eval.json").read_text())
    assert ev["predictor_init"] == "fresh" and ev["predictor"]["always_skip_accuracy"] > 0.8
    recs = [
        json.loads(x) for x in (run_dir / "predictor" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in recs] == list(range(1, 7))
    cfg, model, path = load_run(run_dir)  # evaluation and sampling load the predictors
    assert cfg.model.mod.predictor and path.endswith("predictor/checkpoints/step_00000006")
    assert model.blocks[1].predictor is not None
    assert evaluate_routing(model, val)["predictor"]["topk_accuracy"] > 0
    # resume: a longer run continues from step 6
    assert _predictor_main(run_dir, "--steps", "8") == 0
    assert "resuming predictor training from" in capsys.readouterr().err
    assert _predictor_main(run_dir, "--init", "continue") == 2  # none to continue from
    assert "model.mod.predictor: false" in capsys.readouterr().err


@pytest.mark.slow
def test_predictor_tool_offers_fresh_or_continue_on_a_joint_run(tmp_path, data_cache, capsys):
    cpu_trainer(tmp_path, data_cache, "run", "train.steps=4")
    run_dir = tmp_path / "run"
    joint = _pred_weight(str(run_dir / "checkpoints" / "step_00000004"))
    tiny_lr = ["--steps", "1", "--lr", "1e-12", "--restart"]  # the weights stay where they began
    got = {}
    for init in ("continue", "fresh"):
        assert _predictor_main(run_dir, "--init", init, *tiny_lr) == 0
        assert f"predictors: {init}" in capsys.readouterr().out
        got[init] = _pred_weight(str(run_dir / "predictor" / "checkpoints" / "step_00000001"))
    torch.testing.assert_close(got["continue"], joint, rtol=0, atol=1e-6)
    assert (got["fresh"] - joint).abs().max() > 1e-3
    assert _predictor_main(run_dir, "--init", "continue", "--steps", "2") == 2
    assert "pass --restart" in capsys.readouterr().err


@pytest.mark.slow
def test_predictor_tool_resumes_and_stops_like_the_trainer(
    tmp_path, data_cache, capsys, monkeypatch
):
    from modxla.routing import predictor

    cpu_trainer(tmp_path, data_cache, "run", "train.steps=4")
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "predictor" / "checkpoints"
    assert _predictor_main(run_dir, "--steps", "6", "--resume") == 2  # nothing to resume
    assert "resume: no complete checkpoint in" in capsys.readouterr().err
    assert _predictor_main(run_dir, "--restart", "--resume") == 2
    assert "exclude each other" in capsys.readouterr().err
    real, calls = predictor.predictor_step, []

    def sigterm_at_step_3(*a, **kw):  # the signal a preempted host gets, mid-step
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)

    monkeypatch.setattr(predictor, "predictor_step", sigterm_at_step_3)
    assert _predictor_main(run_dir, "--steps", "6") == EXIT_STOPPED  # was 0, with no table
    out = capsys.readouterr()
    assert "stop requested: left at step 3" in out.err and "predictors:" not in out.out
    assert not (run_dir / "predictor" / "eval.json").exists()
    assert [p.name for p in ckpts.iterdir()] == ["step_00000003"]
    monkeypatch.setattr(predictor, "predictor_step", real)
    assert _predictor_main(run_dir, "--steps", "6", "--resume") == 0
    out = capsys.readouterr()
    assert "resuming predictor training from" in out.err and "(step 3)" in out.err
    assert "predictors: continue" in out.out and (run_dir / "predictor" / "eval.json").exists()
    recs = read_metrics(run_dir / "predictor")
    assert [r["step"] for r in recs if "predictor_loss" in r] == [1, 2, 3, 4, 5, 6]
    assert _predictor_main(run_dir, "--steps", "6", "--restart") == 0  # deleted, from step 0
    assert "resuming" not in capsys.readouterr().err
    assert [p.name for p in ckpts.iterdir()] == ["step_00000006"]
    # the base model trains on: the predictors' frozen model is no longer the run's
    from modxla.inference.load import InferenceError, load_run

    cpu_trainer(
        tmp_path, data_cache, "run", "train.steps=6", "checkpoint.allow_schedule_change=true"
    )
    assert _predictor_main(run_dir, "--steps", "8") == 2
    assert "trained on the run's checkpoint of step 4" in capsys.readouterr().err
    with pytest.raises(InferenceError, match="step 4, but the run's newest is .*step_00000006"):
        load_run(run_dir)  # what sampling and evaluation load
    _, _, path = load_run(run_dir, stale_predictor=True, warn=lambda _: None)  # the old pair
    assert path.endswith("predictor/checkpoints/step_00000006")
    assert _predictor_main(run_dir, "--steps", "2", "--restart") == 0  # on the new base
    ev = json.loads((run_dir / "predictor" / "eval.json").read_text())
    assert ev["base_step"] == 6 and ev["base_checkpoint"].endswith("step_00000006")
    assert load_run(run_dir)[2].endswith("predictor/checkpoints/step_00000002")
