"""Divergence guard: a diverged run stops before any checkpoint; skip mode undoes the step."""

import math
from pathlib import Path

import pytest
import torch

from modxla.errors import DivergenceError
from modxla.io.checkpoint import list_checkpoints, load
from modxla.model import build_model
from modxla.train.guard import guarded_step
from modxla.train.optim import build_optimizer
from tests.conftest import cpu_trainer


def _snapshot(model, opt):
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    moments = {
        (i, k): v.clone()
        for i, p in enumerate(model.parameters())
        for k, v in opt.state[p].items()
        if k != "step"
    }
    return params, moments


def test_skip_mode_puts_parameters_and_moments_back(tiny_cfg):
    cfg = tiny_cfg()
    model = build_model(cfg.model, seed=0)
    opt = build_optimizer(model, cfg.optimizer)
    batch = torch.randint(0, cfg.model.vocab_size, (1, 4, cfg.data.seq_len + 1))
    health = torch.tensor([0.0, 0.0, 0.0, 0.0])
    inf, below_any = torch.tensor(math.inf), torch.tensor(-1.0)
    stats, health = guarded_step(model, opt, batch, 1.0, "float32", health, inf, True)
    assert health.tolist()[0] == 0 and health.tolist()[3] == 1
    params, moments = _snapshot(model, opt)
    stats, health = guarded_step(model, opt, batch, 1.0, "float32", health, below_any, True)
    assert health[0] == 1 and health[2] == 2  # one diverged step, the second
    assert health[1] == pytest.approx(float(stats["loss"]))
    after = _snapshot(model, opt)
    for k, v in params.items():
        assert torch.equal(after[0][k], v), k
    for k, v in moments.items():
        assert torch.equal(after[1][k], v), k
    guarded_step(model, opt, batch, 1.0, "float32", health, inf, True)  # a good step moves
    assert not torch.equal(model.embed.weight, params["embed.weight"])


@pytest.mark.slow
def test_a_diverged_run_stops_before_writing_and_keeps_its_checkpoints(tmp_path, data_cache):
    over = ("train.steps=4", "checkpoint.every=2", "checkpoint.keep=2")
    t, _ = cpu_trainer(tmp_path, data_cache, "run", *over)
    base = t.ckpt_dir
    good = list_checkpoints(base)
    assert [s for s, _ in good] == [2, 4]
    markers = {p: (Path(p) / "COMPLETE").read_bytes() for _, p in good}

    from modxla.config import load_config
    from modxla.io.logger import MetricsLogger
    from modxla.train.trainer import Trainer
    from tests.conftest import TINY

    cfg = load_config(
        "configs/tiny.yaml",
        [
            *TINY,
            f"data.cache_dir={data_cache}",
            "train.device=cpu",
            "train.log_every=3",
            "train.steps=12",
            "checkpoint.allow_schedule_change=true",  # the run goes on past its 4 steps
            *over[1:],
        ],
    )
    again = Trainer(cfg, tmp_path / "run")  # resumes at step 4
    with torch.no_grad():
        again.model.norm.weight.fill_(float("nan"))  # the loss is NaN from the next step on
    with pytest.raises(DivergenceError, match=r"diverged at step 5: loss nan \(non-finite"):
        again.fit(MetricsLogger(again.run_dir, 12, 4, enabled=False))
    assert list_checkpoints(base) == good  # nothing written, nothing pruned
    for p, m in markers.items():
        assert (Path(p) / "COMPLETE").read_bytes() == m


@pytest.mark.slow
def test_skip_mode_counts_skipped_steps_and_keeps_training(tmp_path, data_cache):
    # factor 0.5: once 5 losses are logged, every later step is "far above" the median
    over = [
        "train.steps=8",
        "checkpoint.every=5",
        "train.on_divergence=skip",
        "train.divergence_factor=0.5",
        "train.divergence_window=5",
    ]
    t, losses = cpu_trainer(tmp_path, data_cache, "skip", *over)
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert t.history[-1]["skipped_steps"] == 3  # steps 6, 7, 8
    at5 = load(list_checkpoints(t.ckpt_dir)[0][1], {"model": t.model.state_dict()})
    for k, v in t.model.state_dict().items():
        assert torch.equal(at5["model"][k], v), k  # the skipped steps changed nothing
