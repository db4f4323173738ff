"""The SPMD training loop, run in subprocesses (the device count is fixed per process)."""

import json
import textwrap

import pytest
import torch

from modxla.config import ConfigError, load_config
from modxla.parallel.mesh import MeshError, check_batch, resolve_mesh_shape
from tests.conftest import ROOT, TINY, cpu_trainer, read_metrics, run, train_args  # noqa: F401

# Trains one run per JSON list of overrides in argv[2] (one process, one device count).
PARAMS_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from modxla.config import load_config
    from modxla.train.trainer import Trainer
    from modxla.io.logger import MetricsLogger
    for i, over in enumerate(json.loads(sys.argv[2])):
        cfg = load_config("configs/tiny.yaml", over)
        t = Trainer(cfg, f"{sys.argv[1]}/{i}")
        hist = t.fit(MetricsLogger(t.run_dir, cfg.train.steps, 0, enabled=False))
        params = {k: v.detach().cpu() for k, v in t.model.state_dict().items()}
        torch.save({"losses": [h["loss"] for h in hist], "params": params}, f"{t.run_dir}/out.pt")
""")
# An MoE (4 experts, Switch top-1, in block 1) beside the tiny MoD model
MOE = ["model.mod.capacity=1.0", "model.moe.experts=4", "model.moe.every=2"]


@pytest.mark.slow
def test_sharded_equals_unsharded(tmp_path, data_cache):
    """MoD on a (data, fsdp, tensor) mesh, and an MoE (token choice, and expert choice with
    its predictor) with its experts split over the expert axis (which also carries batch),
    each equal to one device after 3 AdamW steps, with no tensor replicated whole on the mesh."""
    common = [*TINY, f"data.cache_dir={data_cache}", "train.steps=3", "train.log_every=1"]
    # expert choice with its top-C predictor, one step: at init the router's probabilities
    # are near uniform, and after a step the C-th and (C+1)-th tokens of some expert are
    # ~1e-6 apart, so the meshes' rounding picks different tokens (the gradients of step 1
    # agree to 1e-6)
    ec = [*MOE, "model.moe.routing=expert", "model.moe.predictor=true", "train.steps=1"]
    models = {"mod": [], "moe": MOE, "moe_expert_choice": ec}
    ep = ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2"]
    meshes = {
        "mod": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
        "moe": ep,
        "moe_expert_choice": ep,
    }
    results = {}
    for name, devices in (("one", 1), ("mesh", 8)):
        runs = [
            [*common, *over, *(meshes[m] if devices > 1 else ["mesh.data=1"])]
            for m, over in models.items()
        ]
        out = tmp_path / name
        proc = run(["-c", PARAMS_SCRIPT, str(out), json.dumps(runs)], devices)
        results[name] = [torch.load(out / str(i) / "out.pt") for i in range(len(runs))]
    # the MoE's flat dispatch/combine indices used to be replicated whole on a batch-sharded mesh
    assert "Involuntary full rematerialization" not in proc.stderr
    from modxla.model import build_model

    for i, m in enumerate(models):
        one, mesh = results["one"][i], results["mesh"][i]
        assert len(one["losses"]) == (1 if m == "moe_expert_choice" else 3)
        torch.testing.assert_close(mesh["losses"], one["losses"], rtol=1e-5, atol=1e-5, msg=m)
        assert one["params"].keys() == mesh["params"].keys()
        for k, v in one["params"].items():
            torch.testing.assert_close(mesh["params"][k], v, rtol=1e-5, atol=1e-5, msg=k)
        # the parameters did move (one step: 10x the tolerance): not untouched inits
        cfg = load_config("configs/tiny.yaml", [*TINY, *models[m]])
        init = build_model(cfg.model, seed=0).state_dict()
        moved = 1e-4 if m == "moe_expert_choice" else 1e-3
        assert max((init[k] - v).abs().max() for k, v in one["params"].items()) > moved, m
    assert any(".mlp.w1" in k and v.ndim == 3 for k, v in results["one"][1]["params"].items())


@pytest.mark.slow
def test_train_cli_compiles_once_and_loss_falls(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    args = train_args(
        run_dir,
        data_cache,
        "train.steps=30",
        "train.log_every=1",
        "train.eval_every=10",
        "mesh.data=2",
        "mesh.fsdp=2",
    )
    proc = run(args, 4)
    # the embedding's gradient used to replicate the activations whole every step
    assert "Involuntary full rematerialization" not in proc.stderr
    assert (run_dir / "config.yaml").exists()
    assert load_config(run_dir / "config.yaml").train.steps == 30
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    recs = read_metrics(run_dir)
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    required = {
        "step",
        "loss",
        "lm_loss",
        "router_loss",
        "predictor_loss",
        "lr",
        "grad_norm",
        "step_time_s",
        "tokens_per_s",
        "flops_per_step",
        "mfu",
        "compiles",
        "routed_frac/block1",
        "predictor_acc/block1",
    }
    assert required <= steps[-1].keys()
    compiles = [r["compiles"] for r in steps]
    # Step 1 builds AdamW's state, step 2 captures the graph to replay, step 3 checks it
    # (modxla/xla/replay.py); nothing new after that, evaluations included.
    assert compiles[2] == compiles[-1], compiles
    assert steps[0]["routed_frac/block1"] == pytest.approx(4 / 32)  # k = round(0.125 * 32)
    first = sum(r["lm_loss"] for r in steps[:3]) / 3
    last = sum(r["lm_loss"] for r in steps[-3:]) / 3
    assert last < first - 0.5, (first, last)
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    assert len(vals) == 4 and vals[-1] < vals[0]


def test_mesh_and_batch_errors():
    cfg = load_config(None, ["mesh.data=3"])
    match = "data x fsdp x expert x tensor = 3 x 1 x 1 x 1 = 3 but there are 8"
    with pytest.raises(MeshError, match=match):
        resolve_mesh_shape(cfg.mesh, 8)
    cfg = load_config(None, ["mesh.fsdp=3"])
    with pytest.raises(MeshError, match="8 devices do not divide by the fixed axes"):
        resolve_mesh_shape(cfg.mesh, 8)
    assert resolve_mesh_shape(load_config(None, ["mesh.tensor=2"]).mesh, 8) == (4, 1, 1, 2)
    with pytest.raises(MeshError, match="batch_size 6 is not divisible by the batch shards"):
        check_batch(6, (4, 1, 1, 2))


def test_expert_axis_fills_and_carries_batch():
    mesh = load_config(None, ["mesh.data=1", "mesh.expert=-1", "mesh.fsdp=2"]).mesh
    assert resolve_mesh_shape(mesh, 8) == (1, 2, 4, 1)
    mesh = load_config(None, ["mesh.expert=2", "mesh.tensor=2"]).mesh
    assert resolve_mesh_shape(mesh, 8) == (2, 1, 2, 2)  # data fills in
    check_batch(4, (1, 1, 4, 2))  # 4 batch shards: data x fsdp x expert
    match = "not divisible by the batch shards data x fsdp x expert = 8"
    with pytest.raises(MeshError, match=match):
        check_batch(12, (2, 2, 2, 1))
    with pytest.raises(ConfigError, match="mesh.expert: 3 does not divide model.moe.experts 4"):
        load_config(None, ["model.moe.experts=4", "mesh.expert=3"])
    load_config(None, ["mesh.expert=3"])  # without MoE layers it is only a batch axis
    with pytest.raises(ConfigError, match="mesh: at most one axis may be -1"):
        load_config(None, ["mesh.expert=-1"])  # data is -1 by default


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    from modxla.cli.train import main

    assert main(["--run-dir", str(tmp_path / "r"), "mesh.data=3"]) == 2  # 8 devices here
    err = capsys.readouterr().err
    assert "error: mesh: data x fsdp x expert x tensor = 3 x 1 x 1 x 1 = 3 but there are 8" in err
    assert main(["--run-dir", str(tmp_path / "r"), "model.mod.capacity=2"]) == 2
    assert "model.mod.capacity: must be in (0, 1]" in capsys.readouterr().err
    import torch_xla.runtime as xr

    assert not xr.is_spmd()  # refused before SPMD mode changed this process's devices


@pytest.mark.slow
def test_gradient_accumulation_equals_the_full_batch(tmp_path, data_cache):
    # 2 micro-batches of 4 see the same 8 sequences as one batch of 8 (the loader's order)
    full, losses_full = cpu_trainer(
        tmp_path, data_cache, "full", "train.steps=3", "train.batch_size=8", "train.grad_accum=1"
    )
    acc, losses_acc = cpu_trainer(
        tmp_path, data_cache, "acc", "train.steps=3", "train.batch_size=4", "train.grad_accum=2"
    )
    assert len(losses_full) == 3
    torch.testing.assert_close(losses_acc, losses_full, rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(
        acc.model.state_dict().items(), full.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert acc.data_position == 6 and full.data_position == 3


@pytest.mark.slow
def test_native_cpu_device_runs_the_same_loop(tmp_path, data_cache):
    t, losses = cpu_trainer(
        tmp_path, data_cache, "cpu", "train.steps=20", "optimizer.warmup_steps=2"
    )
    assert next(t.model.parameters()).device.type == "cpu"
    assert losses[-1] < losses[0] - 0.5
    assert (tmp_path / "cpu" / "checkpoints" / "step_00000020" / "COMPLETE").exists()


@pytest.mark.slow
def test_bfloat16_autocast_trains(tmp_path, data_cache):
    t, losses = cpu_trainer(
        tmp_path,
        data_cache,
        "bf16",
        "train.steps=10",
        "train.dtype=bfloat16",
        "optimizer.warmup_steps=2",
    )
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert next(t.model.parameters()).dtype == torch.float32  # fp32 master weights


@pytest.mark.slow
def test_scanned_model_trains_under_spmd(tmp_path, data_cache):
    # torch_xla's scan backward under SPMD shards gradients with shard_as (torchax -> flax):
    # a dependency nothing installed made this fail on a fresh clone.
    run_dir = tmp_path / "run"
    args = train_args(
        run_dir,
        data_cache,
        "model.scan=true",
        "model.num_layers=4",
        "train.steps=4",
        "train.log_every=1",
        "mesh.data=2",
        "mesh.fsdp=2",
    )
    run(args, 4)
    steps = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
