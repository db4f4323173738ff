"""The MoE MLP and both MoDE variants: per-token references, exact capacity, pass-through of
dropped and no-op tokens, router gradients, expert choice, aux losses, FLOPs and parameters."""

import math

import pytest
import torch
import torch.nn.functional as F

from modxla.analysis.flops import forward_flops, param_count
from modxla.analysis.memory_plan import plan
from modxla.config import ConfigError, load_config
from modxla.model import build_model
from modxla.model.layers import DenseBlock
from modxla.model.moe import MoEMLP, expert_capacity
from tests.conftest import read_metrics, run, tiny_overrides, train_args

B, N = 2, 16  # sequences, tokens the MLP sees


def _cfg(**kw):
    over = {"model.moe.experts": 4, "model.moe.capacity_factor": 1.0, "model.mod.capacity": 1.0}
    return load_config(None, tiny_overrides(**{**over, **kw}))


def _layer(cfg, seed=0) -> MoEMLP:
    torch.manual_seed(seed)
    layer = MoEMLP(cfg.model)
    with torch.no_grad():  # larger than the init, so that routing and outputs are far from ties
        layer.router.weight.normal_(0.0, 1.0)
        for p in (layer.w1, layer.w3, layer.w2):
            p.normal_(0.0, 0.2)
    return layer


def _expert(layer, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e's SwiGLU MLP on one token (D,)."""
    return (F.silu(x @ layer.w1[e]) * (x @ layer.w3[e])) @ layer.w2[e]


def _token_choice_reference(layer, h):
    """Each token in position order takes its top_k choices; an expert's first C are kept."""
    moe, e_real = layer.moe, layer.num_experts
    c = expert_capacity(moe, h.shape[1])
    out, kept = torch.zeros_like(h), torch.zeros(h.shape[:2] + (moe.top_k,), dtype=torch.bool)
    for b in range(h.shape[0]):
        taken = [0] * (moe.experts + moe.noop_experts)
        for t in range(h.shape[1]):
            p = torch.softmax(h[b, t] @ layer.router.weight.T, -1)
            top = torch.topk(p, moe.top_k)
            gates = top.values / top.values.sum() if moe.top_k > 1 else top.values
            for j, (g, e) in enumerate(zip(gates, top.indices.tolist(), strict=True)):
                if e < e_real and taken[e] < c:
                    out[b, t] += g * _expert(layer, e, h[b, t])
                    kept[b, t, j] = True
                taken[e] += 1
    return out, kept


CASES = {
    "switch_top1": {},
    "gshard_top2": {"model.moe.top_k": 2},
    "integrated_noop": {"model.moe.noop_experts": 2},
    "integrated_top2": {"model.moe.noop_experts": 2, "model.moe.top_k": 2},
}


@pytest.mark.parametrize("case", CASES)
def test_token_choice_equals_the_per_token_reference(case):
    layer = _layer(_cfg(**CASES[case]))
    h = torch.randn(B, N, 64)
    with torch.no_grad():
        delta, info, _ = layer.route(h)
        ref, kept = _token_choice_reference(layer, h)
    assert torch.equal(info.kept, kept)  # same choices kept, overflow dropped in position order
    real = info.expert < layer.num_experts
    assert (real & ~info.kept).any()  # the case does overflow
    torch.testing.assert_close(delta, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_each_expert_keeps_exactly_min_c_demand_earliest_first(case):
    layer = _layer(_cfg(**CASES[case]), seed=1)
    with torch.no_grad():
        _, info, terms = layer.route(torch.randn(B, N, 64))
    c = info.capacity
    assert c == round(1.0 * N * layer.moe.top_k / (4 + layer.moe.noop_experts))
    for b in range(B):
        for e in range(layer.num_experts):
            chose = (info.expert[b] == e).any(-1)  # (N,) tokens that chose e
            got = (info.kept[b] & (info.expert[b] == e)).any(-1)
            assert int(got.sum()) == min(c, int(chose.sum()))
            first = torch.nonzero(chose).flatten()[:c]  # the earliest C that chose e
            assert torch.equal(torch.nonzero(got).flatten(), first)
    noop = info.expert >= layer.num_experts
    assert not (info.kept & noop).any()
    fracs = {k: float(v) for k, v in terms.items() if k.endswith("_frac")}
    n = info.kept.numel()
    assert fracs["routed_frac"] == pytest.approx(int(info.kept.sum()) / n)
    assert fracs["dropped_frac"] == pytest.approx(int((~info.kept & ~noop).sum()) / n)
    assert fracs.get("noop_frac", 0.0) == pytest.approx(int(noop.sum()) / n)
    assert sum(fracs.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("case", ["switch_top1", "integrated_noop"])
def test_dropped_and_noop_tokens_keep_their_residual_in_the_block(case):
    cfg = _cfg(**CASES[case])
    torch.manual_seed(2)
    block = DenseBlock(cfg.model, moe=True)
    with torch.no_grad():
        block.f.mlp.router.weight.normal_(0.0, 1.0)
        x, pos = torch.randn(B, N, 64), torch.arange(N).expand(B, N)
        out, _ = block(x, pos)
        a = block.f.attn(block.f.attn_norm(x), pos)
        _, info, _ = block.f.mlp.route(block.f.mlp_norm(x + a))
    passed = ~info.kept.any(-1)  # (B, N) no expert processed the token
    assert passed.sum() >= 2
    assert torch.equal(out[passed], (x + a)[passed])  # exactly the residual, no MLP delta
    assert not torch.allclose(out[~passed], (x + a)[~passed])
    if case == "integrated_noop":
        assert (info.expert[..., 0] >= 4).sum() >= 2  # some tokens chose a no-op expert


@pytest.mark.parametrize("routing", ["token", "expert"])
def test_gradients_reach_the_router_through_the_gates(routing):
    layer = _layer(_cfg(**{"model.moe.routing": routing}))
    delta, _, terms = layer.route(torch.randn(B, N, 64))
    delta.pow(2).sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in (layer.w1, layer.w3, layer.w2))
    if routing == "token":  # the balance loss alone reaches the router too
        layer.router.weight.grad = None
        _, _, terms = layer.route(torch.randn(B, N, 64))
        terms["balance_loss"].backward()
        assert layer.router.weight.grad.abs().sum() > 0


def test_expert_choice_takes_each_experts_top_c_tokens():
    layer = _layer(_cfg(**{"model.moe.routing": "expert"}))
    h = torch.randn(B, N, 64)
    with torch.no_grad():
        delta, info, terms = layer.route(h)
    c = info.capacity
    assert c == N // 4
    probs = torch.softmax(h @ layer.router.weight.T, -1)  # (B, N, E)
    ref = torch.zeros_like(h)
    for b in range(B):
        for e in range(4):
            top = set(torch.topk(probs[b, :, e], c).indices.tolist())
            assert set(torch.nonzero(info.kept[b, :, e]).flatten().tolist()) == top
            for t in top:
                ref[b, t] += probs[b, t, e] * _expert(layer, e, h[b, t])
    torch.testing.assert_close(delta, ref, rtol=1e-5, atol=1e-5)
    untaken = ~info.kept.any(-1)
    assert torch.equal(delta[untaken], torch.zeros_like(delta[untaken]))
    assert float(terms["dropped_frac"]) == pytest.approx(float(untaken.float().mean()))


def test_model_adds_weighted_moe_losses_and_logs_per_layer_stats():
    over = {"model.num_layers": 4, "model.moe.every": 2, "model.moe.noop_experts": 2}
    over |= {"model.moe.load_balance_weight": 0.5, "model.moe.z_loss_weight": 0.25}
    model = build_model(_cfg(**over).model, seed=0)
    out = model(torch.randint(0, 128, (B, 32)))
    s = out.block_stats
    assert sorted(k for k in s if "/" in k) == sorted(
        f"moe_{n}_frac/block{i}" for i in (1, 3) for n in ("dropped", "noop", "routed")
    )
    torch.testing.assert_close(out.aux_loss, 0.5 * s["moe_balance_loss"] + 0.25 * s["moe_z_loss"])
    assert float(s["moe_z_loss"].detach()) > 0
    out.aux_loss.backward()
    assert model.blocks[1].f.mlp.router.weight.grad.abs().sum() > 0
    assert model.blocks[3].f.mlp.router.weight.grad.abs().sum() > 0
    assert model.blocks[1].f.mlp.terms == {}  # not kept past the forward


def test_staged_mode_runs_the_moe_on_the_k_routed_tokens_only():
    cfg = _cfg(**{"model.mod.capacity": 0.25, "model.moe.every": 2})  # T=32: k = 8
    model = build_model(cfg.model, seed=0)
    assert cfg.model.routed_layers == cfg.model.moe_layers == [1]
    seen = []
    model.blocks[1].f.mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    out = model(torch.randint(0, 128, (B, 32)))
    assert seen == [(B, 8, 64)]
    assert expert_capacity(cfg.model.moe, 8) == 2  # C = round(1.0 * 8 * 1 / 4)
    assert {"routed_frac/block1", "moe_routed_frac/block1"} <= set(out.block_stats)


def test_moe_is_off_by_default_and_checked():
    assert load_config(None).model.moe_layers == []
    assert load_config("configs/tiny.yaml").model.moe_layers == []
    with pytest.raises(ConfigError, match="model.moe.noop_experts"):
        _cfg(**{"model.moe.routing": "expert", "model.moe.noop_experts": 1})
    with pytest.raises(ConfigError, match="model.moe.top_k"):
        _cfg(**{"model.moe.top_k": 5})
    with pytest.raises(ConfigError, match="model.scan"):
        _cfg(**{"model.scan": True})
    with pytest.raises(ConfigError, match="train.remat"):
        _cfg(**{"train.remat": "block"})


FLOP_CASES = {  # (overrides, C, mlp FLOPs of the MoE layer, its router's FLOPs)
    # T=32, D=64, F=192 (SwiGLU: 3 matmuls), E=4, factor 1.25, one MoE layer (block 1)
    "moe": ({}, 10, 2 * 4 * 10 * 64 * 192 * 3, 2 * 32 * 64 * 4),
    # MoD k = round(0.25 * 32) = 8 tokens reach the MoE: C = round(1.25 * 8 / 4) = 2
    "staged": ({"model.mod.capacity": 0.25}, 2, 2 * 4 * 2 * 64 * 192 * 3, 2 * 8 * 64 * 4),
    # 4 no-op experts: C = round(1.25 * 32 / 8) = 5; the router scores 8 choices
    "integrated": ({"model.moe.noop_experts": 4}, 5, 2 * 4 * 5 * 64 * 192 * 3, 2 * 32 * 64 * 8),
}


@pytest.mark.parametrize("case", FLOP_CASES)
def test_flops_count_experts_at_capacity_routers_and_free_noops(case):
    over, c, mlp, router = FLOP_CASES[case]
    cfg = _cfg(**{"model.moe.capacity_factor": 1.25, "model.moe.every": 2, **over}).model
    assert cfg.ffn_dim == 192
    dense = forward_flops(_cfg(**{"model.moe.experts": 0, **over}).model, 32)
    got = forward_flops(cfg, 32)
    mod_router = 2 * 32 * 64 if cfg.routed_layers else 0
    predictor = 2 * 32 * (64 * 16 + 16) if cfg.routed_layers else 0
    layer1_dense_mlp = 2 * (8 if cfg.routed_layers else 32) * 64 * 192 * 3
    assert got["mlp"] == dense["mlp"] - layer1_dense_mlp + mlp
    assert got["router"] == mod_router + router
    assert got["predictor"] == predictor
    assert got["total"] == dense["total"] - layer1_dense_mlp + mlp + router
    if case == "moe":  # the whole forward by hand: 2 blocks' attention, block 0's MLP, head
        attn = 2 * 32 * 64 * 64 * 4 + 2 * 2 * 32 * 32 * 64
        assert got["total"] == 2 * attn + 2 * 32 * 64 * 192 * 3 + mlp + router + 2 * 32 * 64 * 128
        assert got["total"] == 8_470_528


@pytest.mark.parametrize("name", ["moe", "mode_staged", "mode_integrated"])
def test_param_count_and_memory_plan_know_the_expert_weights(name):
    cfg = load_config(f"configs/{name}.yaml")
    model = build_model(cfg.model)
    assert param_count(cfg.model) == model.num_params()
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.w" in n and p.ndim == 3)
    assert experts == 4 * 64 * 192 * 3  # one MoE layer of 4 SwiGLU experts, D64, F192
    p = plan(cfg, devices=1)
    assert p.params_total == model.num_params()
    assert p.parameters == 4 * model.num_params()
    dense = plan(load_config(f"configs/{name}.yaml", ["model.moe.experts=0"]), devices=1)
    router = 64 * (4 + cfg.model.moe.noop_experts)
    assert p.params_total - dense.params_total == 3 * 64 * 192 * 3 + router


@pytest.mark.parametrize("name", ["moe", "mode_staged", "mode_integrated"])
def test_each_variant_trains_through_the_cli(tmp_path, data_cache, name):
    extra = ("train.device=cpu", "train.steps=3", "train.log_every=1")
    run(train_args(tmp_path / name, data_cache, *extra, config=f"configs/{name}.yaml"), 1)
    recs = [r for r in read_metrics(tmp_path / name) if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert math.isfinite(r["loss"]) and math.isfinite(r["moe_balance_loss"])
        fracs = [r[f"moe_{k}_frac/block1"] for k in ("routed", "dropped")]
        if name == "mode_integrated":
            fracs.append(r["moe_noop_frac/block1"])
        assert sum(fracs) == pytest.approx(1.0, abs=1e-5)
        assert ("routed_frac/block1" in r) == (name == "mode_staged")


XLA_CASES = {
    "gshard_top2_noop": {"model.moe.top_k": 2, "model.moe.noop_experts": 2},
    "expert_choice": {"model.moe.routing": "expert"},
    "staged": {"model.mod.capacity": 0.25, "model.moe.every": 2},
}


@pytest.mark.slow  # compiles XLA graphs
@pytest.mark.parametrize("case", XLA_CASES)
def test_xla_matches_eager_and_compiles_once_per_shape(case):
    import torch_xla
    import torch_xla.debug.metrics as met

    from modxla.model import lm_loss

    def compiles() -> int:
        data = met.metric_data("CompileTime")
        return data[0] if data else 0

    cfg = _cfg(**XLA_CASES[case])
    dev = torch_xla.device()
    eager, xla = build_model(cfg.model, seed=0), build_model(cfg.model, seed=0).to(dev)
    before = compiles()
    for step in range(3):  # fresh tokens: new routing, same shapes, no new graph
        tokens = torch.randint(0, 128, (B, 33), generator=torch.Generator().manual_seed(step))
        outs = []
        for model, t in ((eager, tokens), (xla, tokens.to(dev))):
            model.zero_grad()
            out = model(t[:, :-1])
            (lm_loss(out.logits, t[:, 1:]) + out.aux_loss).backward()
            outs.append(out)
        torch_xla.sync()
        (out_e, out_x) = outs
        torch.testing.assert_close(out_x.logits.cpu(), out_e.logits, rtol=1e-5, atol=1e-5)
        for k, v in out_e.block_stats.items():
            torch.testing.assert_close(out_x.block_stats[k].cpu(), v, msg=k)
        for (name, px), pe in zip(xla.named_parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(px.grad.cpu(), pe.grad, rtol=1e-5, atol=1e-5, msg=name)
    assert compiles() - before == 1
