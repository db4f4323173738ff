"""A step traced once and replayed (modxla/xla/replay.py) computes what tracing every step does."""

import json
import textwrap

import pytest
import torch
import torch_xla

from modxla.xla.replay import TracedStep
from tests.conftest import run, tiny_overrides

pytestmark = pytest.mark.slow  # compiles XLA graphs


MESH_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    import torch_xla.core.xla_model as xm
    from modxla.config import load_config
    from modxla.model import build_model
    from modxla.train.optim import build_optimizer, set_lr, step_state
    from modxla.xla.runtime import compile_count, setup_runtime
    from modxla.train.step import train_step

    def variant(cfg, rt, replay):
        model = build_model(cfg.model, seed=0).to(rt.device)
        rt.shard_model(model)
        opt = build_optimizer(model, cfg.optimizer)
        state = (lambda: step_state(model, opt)) if replay else None
        return model, opt, rt.compile(train_step, "replay" if replay else "traced", state=state)

    def compare(cfg, rt):
        traced, replayed = variant(cfg, rt, False), variant(cfg, rt, True)
        torch.manual_seed(0)
        stats, compiles = [[], []], []
        for i in range(6):
            batch = torch.randint(0, cfg.model.vocab_size, (1, 8, cfg.data.seq_len + 1))
            for j, (model, opt, fn) in enumerate((traced, replayed)):
                xm.set_rng_state(1000 + i)  # the same draws in both
                set_lr(opt, 1e-3 * (i + 1))
                out = fn(model, opt, batch.to(rt.device), 1.0, "float32")
                stats[j].append({k: float(v) for k, v in out.items()})
            compiles.append(compile_count())
        diff = {}
        saved = replayed[0].state_dict()  # detached aliases, as a checkpoint reads them
        for (name, a), b in zip(traced[0].named_parameters(), replayed[0].parameters()):
            diff[name] = (a.cpu() - saved[name].cpu()).abs().max().item()
            for key in ("step", "exp_avg", "exp_avg_sq"):
                x, y = traced[1].state[a][key].cpu(), replayed[1].state[b][key].cpu()
                diff[f"{name}/{key}"] = (x - y).abs().max().item()
        return {"stats": stats, "compiles": compiles, "traces": replayed[2].traces,
                "diff": diff}

    results = {}
    for router in ("learned", "random"):  # one process: torch_xla starts once
        cfg = load_config(None, sys.argv[2:] + [f"model.mod.router={router}"])
        results[router] = compare(cfg, setup_runtime(cfg))  # SPMD on 8 devices, as trained
    json.dump(results, open(sys.argv[1], "w"))
""")


def test_replayed_steps_match_traced_steps_on_a_mesh(tmp_path):
    """6 AdamW steps on the 8-device mesh, a new learning rate each step, learned and
    random routing (which draws from the RNG inside the graph). After the capture (step 2)
    and its check (step 3) nothing is traced or compiled again, and every number matches
    tracing each step: the parameters as state_dict() reads them and the AdamW state, bit
    for bit."""
    out = tmp_path / "replay.json"
    over = tiny_overrides(**{"model.mod.aux_loss_weight": 0.1})
    run(["-c", MESH_SCRIPT, str(out), *over], 8)
    results = json.loads(out.read_text())
    assert set(results) == {"learned", "random"}
    for router, r in results.items():
        traced, replayed = r["stats"]
        for i, (a, b) in enumerate(zip(traced, replayed, strict=True)):
            assert a.keys() == b.keys()
            for k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (router, i, k)
        assert r["traces"] == 3, router
        assert r["compiles"][2:] == [r["compiles"][2]] * 4, router  # steps 4-6 reuse both
        assert len(r["diff"]) == 4 * len([k for k in r["diff"] if "/" not in k])
        assert max(r["diff"].values()) == 0, (router, max(r["diff"].items(), key=lambda kv: kv[1]))


def test_a_python_number_that_changes_falls_back_to_tracing():
    """A float read inside the step, not passed in, would be frozen by a replay: the check
    trace sees it change, warns, and every later call is traced (and right)."""
    dev = torch_xla.device()
    w = torch.zeros(4).to(dev)
    calls = {"n": 0}

    def fn(x):
        calls["n"] += 1
        w.add_(x * float(calls["n"]))  # the host counter enters the graph as a constant
        return {"w": w * 1}

    step = TracedStep(fn, lambda: [w], "counter")
    x = torch.ones(4).to(dev)
    step(x)  # captured
    with pytest.warns(UserWarning, match="changes between calls"):
        step(x)
    for _ in range(2):
        out = step(x)
    assert out["w"].cpu().tolist() == [10.0] * 4  # 1 + 2 + 3 + 4
    assert step.traces == 4


def test_new_arguments_are_captured_apart():
    """A different shape or Python argument is another graph; each replays its own."""
    dev = torch_xla.device()
    w = torch.zeros(3).to(dev)

    def fn(x, scale: float):
        w.add_(x.sum() * scale)
        return w * 1

    step = TracedStep(fn, lambda: [w], "shapes")
    expect = 0.0
    for n, scale in [(2, 1.0), (2, 1.0), (5, 1.0), (2, 1.0), (5, 1.0), (2, -1.0), (2, -1.0)]:
        out = step(torch.ones(n).to(dev), scale)
        expect += n * scale
        assert out.cpu().tolist() == [expect] * 3
    assert len(step.graphs) == 3
    assert step.traces == 6  # each signature: captured, then checked once


def test_sync_false_replays_without_marking_steps_unless_the_graph_draws_random_numbers():
    """sync=False (decoding) skips the sync after a replay, whose only work is the RNG and
    step closures; a graph that reads the RNG seed still syncs, so its draws advance."""
    import torch_xla.debug.metrics as met

    dev = torch_xla.device()
    w = torch.zeros(3).to(dev)

    def plain(x):
        w.add_(x)
        return w * 1

    def noisy(x):
        return x + torch.rand(3, device=dev)

    def marks() -> int:
        return met.counter_value("MarkStep") or 0

    step, rand = (
        TracedStep(plain, lambda: [w], "plain", sync=False),
        TracedStep(noisy, list, "rand", sync=False),
    )
    x = torch.ones(3).to(dev)
    for _ in range(2):  # capture, check
        step(x)
        rand(x)
    before = marks()
    outs = [step(x).cpu().tolist() for _ in range(3)]
    assert marks() == before  # replayed three times, no sync
    assert outs == [[3.0] * 3, [4.0] * 3, [5.0] * 3]
    draws = [rand(x).cpu() for _ in range(2)]
    assert marks() == before + 2
    assert not torch.equal(draws[0], draws[1])
