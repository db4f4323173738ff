"""What routed blocks do (inspect-routing), causal routing calibration and the predictor
tool's curve and ablations, on a tiny eager run."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from modxla.cli.calibrate_routing import main as calibrate_main
from modxla.cli.generate import main as generate_main
from modxla.cli.inspect_routing import main as inspect_main
from modxla.inference.load import get_thresholds, load_run, set_thresholds, validation_batches
from modxla.routing.calibration import fit_thresholds
from modxla.routing.evaluate import routing_stats
from modxla.routing.report import contributions, switched_off
from tests.conftest import cpu_trainer, read_metrics

OVER = (
    "train.steps=30",
    "model.num_layers=4",
    "model.d_model=32",
    "model.num_heads=2",
    "model.mod.capacity=0.25",
    "data.val_fraction=0.3",
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_cache):
    """A 4-block model (routed blocks 1 and 3), 30 eager steps, and 4 validation batches."""
    t, _ = cpu_trainer(tmp_path_factory.mktemp("routing"), data_cache, "run", *OVER)
    cfg, _, _ = load_run(str(t.run_dir))
    return str(t.run_dir), validation_batches(cfg, 4)


@pytest.fixture(scope="module")
def aux0_run(tmp_path_factory, data_cache):
    """A run trained with the default model.mod.aux_loss_weight 0 (tiny.yaml sets 0.01):
    its router logit was never trained to classify top-k membership."""
    t, _ = cpu_trainer(
        tmp_path_factory.mktemp("aux0"), data_cache, "run", *OVER, "model.mod.aux_loss_weight=0"
    )
    return str(t.run_dir)


def _model(run_dir):
    return load_run(run_dir, calibrated=False)[1]


def test_inspect_routing_reports_every_routed_block(tiny_run, tmp_path, capsys):
    run_dir, _ = tiny_run
    out = tmp_path / "report.json"
    assert inspect_main(["--run-dir", run_dir, "--batches", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["blocks"]) == {"1", "3"} and res["batches"] == 1
    loss = res["loss"]
    for b in res["blocks"].values():
        assert b["routed_frac"] == pytest.approx(8 / 32)  # k = 8 of T = 32
        assert 0 < b["rf_over_x"] and 0 < b["f_over_x"]
        assert b["r_routed"]["q50"] > b["r_all"]["q50"]  # top-k picks the larger r
        assert b["r_all"]["q00"] <= b["r_all"]["q50"] <= b["r_all"]["q100"]
        assert abs(b["loss_off"] - loss["topk"]) > 1e-4  # each block changes the loss
        assert 0.75 <= b["threshold_acc"] <= 1  # at least always-skip (1 - k/T)
    assert abs(loss["all_off"] - loss["topk"]) > 1e-3
    for mode in ("predictor", "router"):
        assert 0 <= loss[mode]["routed"] <= loss[mode]["decided"] + 1e-9
        assert 0 <= loss[mode]["overflow"] <= 1
    text = capsys.readouterr().out
    assert "all routed blocks off" in text and "predictor routing" in text


def test_switched_off_routed_blocks_are_identities(tiny_run):
    run_dir, batches = tiny_run
    model = _model(run_dir)
    tokens = batches[0][:, :-1]
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad(), switched_off(model, [1, 3]):
        got = model(tokens).logits
        x = model.embed(tokens)
        for i in (0, 2):  # the dense blocks alone
            x = model.blocks[i](x, pos)[0]
        want = torch.nn.functional.linear(model.norm(x), model.embed.weight)
    torch.testing.assert_close(got, want)
    assert "forward" not in model.blocks[1].__dict__  # restored


def test_contribution_scales_with_the_router_weight(tiny_run):
    run_dir, batches = tiny_run
    model = _model(run_dir)
    before = contributions(model, batches[:1])
    with torch.no_grad():
        model.blocks[3].router.weight.mul_(2.0)  # same top-k set, r doubled, f unchanged
    after = contributions(model, batches[:1])
    assert after["3"]["rf_over_x"] == pytest.approx(2 * before["3"]["rf_over_x"], rel=1e-4)
    assert after["3"]["f_over_x"] == pytest.approx(before["3"]["f_over_x"], rel=1e-4)
    assert after["1"] == before["1"]  # block 1 comes first: untouched


def test_calibration_matches_capacity_and_cuts_overflow(tiny_run):
    run_dir, batches = tiny_run
    model = _model(run_dir)
    with torch.no_grad():  # a predictor that routes far too many tokens: heavy overflow
        for i in (1, 3):
            model.blocks[i].predictor.fc2.bias.add_(3.0)
    batches = batches[:2]
    before = routing_stats(model, batches, "predictor")
    set_thresholds(model, fit_thresholds(model, batches, 0.25, ["predictor"]))
    after = routing_stats(model, batches, "predictor")
    for layer in ("1", "3"):  # on the data it was fitted on, each block wants ~C
        assert after["blocks"][layer]["decided"] == pytest.approx(0.25, abs=0.01)
        assert before["blocks"][layer]["decided"] > 0.5
    assert after["overflow"] < before["overflow"] - 0.2
    assert after["dropped"] < before["dropped"]
    assert after["nll"] != before["nll"]


def test_calibrate_cli_writes_thresholds_that_load_run_applies(tiny_run, tmp_path, capsys):
    run_dir, _ = tiny_run
    out = tmp_path / "cal.json"
    args = ["--run-dir", run_dir, "--batches", "1", "--json", str(out)]
    assert calibrate_main(args) == 0
    res = json.loads(out.read_text())
    assert res["held_out"] and res["fit_batches"] == 1
    assert set(res["after"]) == {"predictor", "router"}
    text = capsys.readouterr().out
    assert "top-k NLL" in text
    # the thresholds record the length they were fitted for: the run's data.seq_len
    assert res["seq_len"] == 32 and "batches of 32 tokens" in text
    _, model, path = load_run(run_dir)
    assert path == res["checkpoint"]
    assert get_thresholds(model) == res["thresholds"]
    assert any(t != 0 for d in res["thresholds"].values() for t in d.values())
    # fitted on another checkpoint (the predictors were retrained since): ignored, said so
    cal = Path(run_dir) / "predictor" / "calibration.json"
    cal.write_text(json.dumps({**res, "checkpoint": "elsewhere"}))
    warned = []
    try:
        _, model, _ = load_run(run_dir, warn=warned.append)
    finally:
        cal.unlink()  # the other tests see the run uncalibrated
    assert all(t == 0 for d in get_thresholds(model).values() for t in d.values())
    assert "fitted on elsewhere" in warned[0] and "ignored" in warned[0]
    # fitted for another length (k = round(C * 64) slots): ignored, said so, naming the fix
    cal.write_text(json.dumps({**res, "seq_len": 64}))
    warned = []
    try:
        _, model, _ = load_run(run_dir, warn=warned.append)
    finally:
        cal.unlink()
    assert all(t == 0 for d in get_thresholds(model).values() for t in d.values())
    assert len(warned) == 1 and "fitted for sequences of 64 tokens, not the 32" in warned[0]
    assert f"modxla-calibrate-routing --run-dir {run_dir}" in warned[0]
    # a file from before the length was recorded: fitted at data.seq_len, applied
    cal.write_text(json.dumps({k: v for k, v in res.items() if k != "seq_len"}))
    try:
        _, model, _ = load_run(run_dir, warn=warned.append)
    finally:
        cal.unlink()
    assert get_thresholds(model) == res["thresholds"] and len(warned) == 1


def _generate(run_dir, capsys, *args, monkeypatch=None):
    """modxla-generate in-process, greedy: stdout, stderr, and (with `monkeypatch`) the
    tokens fed to each decode step and the logits it returned."""
    import modxla.inference.sample as sample

    fed, logits = [], []
    if monkeypatch is not None:
        step = sample.decode_step

        def recording(model, cache, tokens, pos, routing):
            fed.append(int(tokens[0]))
            logits.append(step(model, cache, tokens, pos, routing)[0].clone())
            return logits[-1][None]

        monkeypatch.setattr(sample, "decode_step", recording)
    argv = ["--run-dir", run_dir, "--prompt", "import os", "--temperature", "0", *args]
    assert generate_main(argv) == 0
    out = capsys.readouterr()
    if monkeypatch is not None:
        monkeypatch.undo()
    return out.out, out.err, fed, logits


@pytest.mark.parametrize("routing", ["predictor", "router"])
def test_generated_logits_do_not_depend_on_max_tokens(tiny_run, capsys, monkeypatch, routing):
    """The routed blocks keep the trained k = round(C * 32) = 8 slots whatever --max-tokens
    asks: position t's logits are the same for 4 and 24 new tokens (to float rounding: the
    dense blocks' caches are as long as the request), and equal those of the
    full forward at the trained length (data.seq_len 32; max_seq_len is 64)."""
    run_dir, _ = tiny_run
    gen = ("--routing", routing, "--max-tokens")
    short_out, _, short_fed, short = _generate(run_dir, capsys, *gen, "4", monkeypatch=monkeypatch)
    long_out, _, fed, long = _generate(run_dir, capsys, *gen, "24", monkeypatch=monkeypatch)
    assert 4 <= len(short) < len(long)
    assert fed[: len(short_fed)] == short_fed
    # the same computation; only the dense blocks' caches differ in length (masked slots)
    torch.testing.assert_close(torch.stack(long[: len(short)]), torch.stack(short))
    assert long_out.startswith(short_out.rstrip("\n"))  # greedy: the short one is a prefix
    # decoding == the full forward at the trained length (padded to it) on those positions
    _, model, _ = load_run(run_dir)
    seq = torch.tensor([fed + [0] * (32 - len(fed))])
    with torch.no_grad():
        full = model(seq, routing=routing).logits[0, : len(fed)]
    torch.testing.assert_close(torch.stack(long), full, rtol=1e-5, atol=1e-5)
    # more than the trained length: clipped to data.seq_len 32, not max_seq_len 64
    _, err, _, _ = _generate(run_dir, capsys, *gen, "60")
    assert "must fit data.seq_len (the trained length) 32" in err


def test_router_routing_without_aux_loss_or_calibration_warns(aux0_run, tiny_run, tmp_path, capsys):
    fix = f"modxla-calibrate-routing --run-dir {aux0_run}"
    _, err, _, _ = _generate(aux0_run, capsys, "--routing", "router", "--max-tokens", "2")
    assert err.count(fix) == 1 and "aux_loss_weight 0" in err  # once, naming the fix
    _, err, _, _ = _generate(aux0_run, capsys, "--max-tokens", "2")  # predictor routing: sound
    assert "warning" not in err
    assert inspect_main(["--run-dir", str(aux0_run), "--batches", "1"]) == 0  # router rows
    assert capsys.readouterr().err.count(fix) == 1
    # trained with aux_loss_weight 0.01 (tiny.yaml): the router logit is a classifier
    _, err, _, _ = _generate(tiny_run[0], capsys, "--routing", "router", "--max-tokens", "2")
    assert "warning" not in err
    # calibrated: its thresholds replace logit > 0
    run_dir = tmp_path / "run"
    shutil.copytree(aux0_run, run_dir)
    assert calibrate_main(["--run-dir", str(run_dir), "--batches", "1"]) == 0
    _, err, _, _ = _generate(str(run_dir), capsys, "--routing", "router", "--max-tokens", "2")
    assert "warning" not in err and "modxla-calibrate-routing" not in err


def test_clear_errors_for_bad_run_dirs(tiny_run, tmp_path, capsys):
    assert inspect_main(["--run-dir", str(tmp_path / "none")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    base = tmp_path / "baseline"
    base.mkdir()
    cfg = yaml.safe_load(open(f"{tiny_run[0]}/config.yaml"))
    cfg["model"]["mod"]["capacity"] = 1.0
    (base / "config.yaml").write_text(yaml.safe_dump(cfg))
    for main in (inspect_main, calibrate_main):
        assert main(["--run-dir", str(base)]) == 2
        assert "no routed blocks" in capsys.readouterr().err


def test_predictor_tool_logs_a_validation_curve_and_ablates(tiny_run, tmp_path):
    from modxla.routing.predictor import PredictorOptions, train_predictors

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir)  # its predictor/ stays out of the shared run
    opts = dict(steps=4, eval_every=2, eval_batches=1, log_every=2)  # logging, not learning
    opts |= dict(hidden=8, input="normed", init="fresh", restart=True)
    # the routed class weighted (1-C)/C = 3 (test_weighted_bce_... checks the loss)
    bal = train_predictors(str(run_dir), PredictorOptions(**opts, pos_weight="balanced"))
    recs = [r for r in read_metrics(run_dir / "predictor") if "val/precision" in r]
    assert [r["step"] for r in recs] == [2, 4]
    for r in recs:
        assert r["val/always_skip_acc"] == pytest.approx(0.75)  # k = 8 of 32
        assert 0 <= r["val/precision"] <= 1 and 0 <= r["val/recall"] <= 1
        assert 0 <= r["val/predictor_acc"] <= 1
        assert set(r) >= {"val/predictor_acc/block1", "val/predictor_acc/block3"}
    assert recs[-1]["val/predictor_acc"] == pytest.approx(bal["predictor"]["topk_accuracy"])
    assert bal["predictor_hidden"] == 8 and bal["predictor_input"] == "normed"
    _, model, _ = load_run(str(run_dir))  # sampling and evaluation build the same predictor
    assert model.blocks[1].predictor.fc1.out_features == 8 and model.blocks[1].predictor.normed
    assert bal["pos_weight"] == pytest.approx(3.0)


def test_weighted_bce_counts_the_routed_class_w_times(tiny_run):
    from modxla.routing.predictor import weighted_bce

    run_dir, batches = tiny_run
    out = _model(run_dir)(batches[0][:, :-1])
    torch.testing.assert_close(weighted_bce(out.routing, 1.0), out.predictor_loss)
    pos = torch.stack(
        [(i.topk_mask * F.logsigmoid(i.predictor_logits)).mean() for i in out.routing]
    )
    # raising the weight by 2 adds 2 * the routed class's mean -log sigmoid(p)
    extra = weighted_bce(out.routing, 3.0) - weighted_bce(out.routing, 1.0)
    torch.testing.assert_close(extra, -2 * pos.mean())
    assert extra > 0


def test_threshold_accuracy_is_the_best_single_cut():
    from modxla.routing.evaluate import threshold_accuracy

    g = torch.Generator().manual_seed(0)
    r = torch.randn(200, generator=g)
    # top-k of each "sequence" of 20 tokens: its cut-off moves, so no single cut is perfect
    shift = torch.randn(10, 1, generator=g).expand(10, 20).flatten()
    member = torch.zeros(200, dtype=torch.bool)
    for s in range(10):
        member[s * 20 + torch.topk((r + shift)[s * 20 : (s + 1) * 20], 5).indices] = True
    brute = max(float(((r > c) == member).float().mean()) for c in [*r.tolist(), -1e9])
    assert threshold_accuracy(r, member) == pytest.approx(brute)
    assert 0.75 < brute < 1.0
    separable = r > 0.3
    assert threshold_accuracy(r, separable) == 1.0
