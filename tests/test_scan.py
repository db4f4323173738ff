"""Scan over layers and activation checkpointing: same losses and gradients as the plain model."""

import copy

import pytest
import torch
import torch_xla

from modxla.config import ConfigError, load_config
from modxla.io.layout import to_stacked, to_unrolled
from modxla.model import build_model, lm_loss
from modxla.parallel.sharding import param_spec
from modxla.train.optim import build_optimizer, convert_optimizer_state, optimizer_names
from tests.conftest import tiny_overrides


def _cfg(**kw):
    return load_config(None, tiny_overrides(**{"model.num_layers": 4, **kw}))


def _loss_and_grads(model, tokens, device, remat="none"):
    model = copy.deepcopy(model).to(device)
    model.remat = remat
    t = tokens.to(device)
    out = model(t[:, :-1])
    loss = lm_loss(out.logits, t[:, 1:]) + out.aux_loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    if device != "cpu":
        torch_xla.sync()
    stats = {k: float(v.detach()) for k, v in out.block_stats.items()}
    return float(loss.detach()), {n: g.cpu() for n, g in grads.items()}, stats


def test_stacked_layout_round_trips_and_starts_from_the_same_weights():
    unrolled = build_model(_cfg().model, seed=0)
    scanned = build_model(_cfg(**{"model.scan": "true"}).model, seed=0)
    assert scanned.num_params() == unrolled.num_params()
    # 4 layers, every 2: periods of (dense, routed), stacked over P = 2
    assert scanned.layers[0].f.attn.wq.weight.shape == (2, 64, 64)
    assert hasattr(scanned.layers[1], "router") and "blocks" not in scanned._modules
    # the blocks view (decoding walks it) shares the stacked storage
    view = scanned.blocks[3].f.mlp.w2.weight
    assert view.data_ptr() == scanned.layers[1].f.mlp.w2.weight[1].data_ptr()
    stacked = to_stacked(unrolled.state_dict(), 2)
    assert list(stacked) == list(scanned.state_dict())
    for k, v in scanned.state_dict().items():
        torch.testing.assert_close(v, stacked[k], rtol=0, atol=0, msg=k)
    back = to_unrolled(stacked, 2)
    assert list(back) == list(unrolled.state_dict())
    for k, v in unrolled.state_dict().items():
        torch.testing.assert_close(back[k], v, rtol=0, atol=0, msg=k)
    # the period axis is never sharded; the rest follows the per-block rule
    assert param_spec("layers.0.f.attn.wq.weight", 3) == (None, "tensor", "fsdp")
    assert param_spec("layers.0.f.attn.wo.weight", 3) == (None, "fsdp", "tensor")
    assert param_spec("layers.1.f.attn_norm.weight", 2) is None
    assert param_spec("layers.1.router.weight", 3) == (None, None, "fsdp")
    # built once: what is set on a block stays; an in-place load shows through; a move rebuilds
    assert scanned.blocks is scanned.blocks
    scanned.blocks[3].thresholds["router"] = 0.5
    assert scanned.blocks[3].thresholds["router"] == 0.5
    other = build_model(_cfg(**{"model.scan": "true"}).model, seed=1)
    scanned.load_state_dict(other.state_dict())
    w2 = other.layers[1].f.mlp.w2.weight[1]
    torch.testing.assert_close(scanned.blocks[3].f.mlp.w2.weight, w2, rtol=0, atol=0)
    before = scanned.blocks
    scanned.to(torch.float64)
    assert scanned.blocks is not before and scanned.blocks[3].f.mlp.w2.weight.dtype == torch.float64


def test_optimizer_state_converts_between_layouts():
    unrolled = build_model(_cfg().model, seed=0)
    opt = build_optimizer(unrolled, _cfg().optimizer)
    out = unrolled(torch.randint(0, 128, (2, 32)))
    (out.logits.mean() + out.aux_loss).backward()
    opt.step()
    names = optimizer_names(unrolled.state_dict())
    scanned = build_model(_cfg(**{"model.scan": "true"}).model, seed=0)
    stacked_names = optimizer_names(scanned.state_dict())
    stacked = convert_optimizer_state(opt.state_dict(), names, stacked_names, 2)
    opt2 = build_optimizer(scanned, _cfg().optimizer)
    opt2.load_state_dict(stacked)  # sizes and group membership must match the scanned model
    p = scanned.layers[0].f.mlp.w1.weight
    expect = torch.stack([opt.state[b.f.mlp.w1.weight]["exp_avg"] for b in unrolled.blocks[::2]])
    torch.testing.assert_close(opt2.state[p]["exp_avg"], expect, rtol=0, atol=0)
    back = convert_optimizer_state(stacked, stacked_names, names, 2)
    assert len(back["state"]) == len(opt.state_dict()["state"]) == len(names)
    for i, st in opt.state_dict()["state"].items():
        torch.testing.assert_close(back["state"][i]["exp_avg_sq"], st["exp_avg_sq"], msg=str(i))


def test_scan_needs_whole_periods():
    with pytest.raises(ConfigError, match="model.scan: needs num_layers"):
        _cfg(**{"model.scan": "true", "model.num_layers": 3})
    with pytest.raises(ConfigError, match="train.remat"):
        _cfg(**{"train.remat": "everything"})


def test_eager_scan_layout_and_remat_match_the_unrolled_model():
    tokens = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(0))
    unrolled = build_model(_cfg().model, seed=0)
    scanned = build_model(_cfg(**{"model.scan": "true"}).model, seed=0)
    ref_loss, ref_grads, ref_stats = _loss_and_grads(unrolled, tokens, "cpu")
    for model, remat in ((unrolled, "block"), (scanned, "none"), (scanned, "block")):
        loss, grads, stats = _loss_and_grads(model, tokens, "cpu", remat)
        assert abs(loss - ref_loss) <= 1e-5 and stats == pytest.approx(ref_stats, abs=1e-6)
        if model is scanned:
            grads = to_unrolled(grads, 2)
        for n, g in ref_grads.items():
            torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-5, msg=n)


@pytest.mark.slow
def test_xla_scan_and_remat_match_the_unrolled_model():
    """On XLA: the scanned unit (one While loop) with both partitions, and the unrolled
    model's block remat (2 layers: a dense and a routed block, the smallest graph with both),
    against eager."""
    tokens = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(1))
    dev = torch_xla.device()
    unrolled, scanned = _cfg(**{"model.num_layers": 2}), _cfg(**{"model.scan": "true"})
    for cfg, remats in ((unrolled, ["block"]), (scanned, ["none", "block"])):
        ref_loss, ref_grads, ref_stats = _loss_and_grads(
            build_model(_cfg(**{"model.num_layers": cfg.model.num_layers}).model, seed=0),
            tokens,
            "cpu",
        )
        model = build_model(cfg.model, seed=0)
        for remat in remats:
            loss, grads, stats = _loss_and_grads(model, tokens, dev, remat)
            assert abs(loss - ref_loss) <= 1e-5, (remat, loss, ref_loss)
            assert stats == pytest.approx(ref_stats, abs=1e-6)
            if cfg.model.scan:
                grads = to_unrolled(grads, 2)
            for n, g in ref_grads.items():
                torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-5, msg=f"{remat} {n}")


def _cpu_run(run_dir, data_cache, *over):
    from modxla.io.logger import MetricsLogger
    from modxla.train.trainer import Trainer

    common = [
        "model.vocab_size=384", "model.max_seq_len=64", "data.seq_len=32",
        "data.max_chars=400000", "train.batch_size=4", "train.eval_every=0",
        "model.num_layers=4", "train.device=cpu", "train.log_every=1",
        f"data.cache_dir={data_cache}",
    ]  # fmt: skip
    cfg = load_config("configs/tiny.yaml", [*common, *over])
    t = Trainer(cfg, run_dir)
    hist = t.fit(MetricsLogger(t.run_dir, cfg.train.steps, t.step, enabled=False))
    return t, [h["loss"] for h in hist if "loss" in h]


def test_checkpoints_resume_across_layouts(tmp_path, data_cache):
    """unrolled step 1 -> scan step 2 -> unrolled step 3: each resumed step's loss equals the
    uninterrupted unrolled run's (checkpoints, optimizer state included, convert both ways)."""
    _, straight = _cpu_run(tmp_path / "straight", data_cache, "train.steps=3")
    run = tmp_path / "run"
    _cpu_run(run, data_cache, "train.steps=1", "model.scan=false")
    for step, scan in ((2, "true"), (3, "false")):
        extend = (f"train.steps={step}", "checkpoint.allow_schedule_change=true")
        resumed, losses = _cpu_run(run, data_cache, *extend, f"model.scan={scan}")
        assert resumed.model.cfg.scan == (scan == "true") and len(losses) == 1
        assert abs(losses[0] - straight[step - 1]) <= 1e-5, (step, losses, straight)


def test_a_scanned_model_decodes_like_the_unrolled_one():
    from modxla.inference.sample import generate

    over = {"model.num_layers": 4, "data.seq_len": 48}
    unrolled = build_model(_cfg(**over).model, seed=3).eval()
    scanned = build_model(_cfg(**over, **{"model.scan": "true"}).model, seed=3).eval()
    prompt = list(range(5, 37))
    a, _ = generate(unrolled, prompt, 8, "router", temperature=1.0, seed=1)
    b, _ = generate(scanned, prompt, 8, "router", temperature=1.0, seed=1)
    assert a == b
    tokens = torch.tensor([a])
    full_u, full_s = unrolled(tokens, routing="router"), scanned(tokens, routing="router")
    torch.testing.assert_close(full_s.logits, full_u.logits, rtol=1e-5, atol=1e-5)
    assert [i.idx.tolist() for i in full_s.routing] == [i.idx.tolist() for i in full_u.routing]
