"""The MoE MLP and both MoDE variants: per-token references, exact capacity, pass-through of
dropped and no-op tokens, router gradients, expert choice, aux losses, FLOPs and parameters."""

import math

import pytest
import torch
import torch.nn.functional as F

from modxla.analysis.flops import backward_flops, forward_flops, param_count
from modxla.analysis.memory_plan import plan
from modxla.config import ConfigError, load_config
from modxla.model import build_model
from modxla.model.decode import KVCache, decode_step, moe_capacity, python_cond
from modxla.model.layers import DenseBlock
from modxla.model.moe import MoEMLP, expert_capacity
from tests.conftest import read_metrics, tiny_overrides, train_args

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


@pytest.mark.parametrize("staged", [False, True])
def test_flops_and_params_count_the_expert_choice_predictor(staged):
    over = {"model.moe.routing": "expert", "model.moe.every": 2}
    over |= {"model.mod.capacity": 0.25} if staged else {}
    base = _cfg(**over).model
    cfg = _cfg(**over, **{"model.moe.predictor": True}).model
    n = 8 if staged else 32  # the tokens block 1's MoE sees: MoD's k = round(0.25 * 32), or T
    h, d, e = 16, 64, 4  # model.mod.predictor_hidden of the tiny config
    assert param_count(cfg) == build_model(cfg).num_params()
    assert param_count(cfg) - param_count(base) == d * h + h + h * e + e
    fwd, fwd0 = forward_flops(cfg, 32), forward_flops(base, 32)
    assert fwd["predictor"] - fwd0["predictor"] == 2 * n * (d * h + h * e)
    assert fwd["total"] - fwd0["total"] == 2 * n * (d * h + h * e)
    # backward: weight gradients and fc2's input gradient, none into stop_gradient(h)
    assert backward_flops(cfg, 32) - backward_flops(base, 32) == 2 * n * (d * h + 2 * h * e)


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
def test_each_variant_trains_resumes_and_samples_through_the_clis(
    tmp_path, data_cache, name, capsys
):
    """modxla-train and modxla-generate's mains in process (eager: no compile)."""
    import shutil

    from modxla.cli.generate import main as generate
    from modxla.cli.train import main as train

    extra = ("train.device=cpu", "train.steps=3", "train.log_every=1", "checkpoint.every=2")
    argv = train_args(tmp_path / name, data_cache, *extra, config=f"configs/{name}.yaml")[2:]
    assert train(argv) == 0
    first = {r["step"]: r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r}
    # the last checkpoint lost: the same command resumes from step 2 and redoes step 3
    shutil.rmtree(tmp_path / name / "checkpoints" / "step_00000003")
    assert train(argv) == 0
    assert "resuming from" in capsys.readouterr().err
    # and samples through modxla-generate (in-process, eager), --routing the default
    argv = ["--run-dir", str(tmp_path / name), "--prompt", "def f(", "--max-tokens", "4"]
    assert generate([*argv, "--device", "cpu", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "expert-processed fraction of choices per MoE block: block 1: " in err
    assert ("routed fraction per routed block" in err) == (name == "mode_staged")
    recs = [r for r in read_metrics(tmp_path / name) if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3]  # step 3's first record replaced
    for r in recs:  # the resumed step 3 computes what the first run's did
        assert r["loss"] == pytest.approx(first[r["step"]], rel=0, abs=1e-6)
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
    "expert_choice_predictor": {"model.moe.routing": "expert", "model.moe.predictor": True},
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


# --- decoding: token by token with the KV cache == the full forward at the trained length ---

DECODE_CASES = {  # capacity factor 0.5: experts overflow, so the drop rule is exercised
    "switch_top1": {},
    "gshard_top2": {"model.moe.top_k": 2},
    "integrated_top2": {"model.moe.top_k": 2, "model.moe.noop_experts": 2},
    "staged_top1": {"model.mod.capacity": 0.5},
    "staged_integrated_top2": {
        "model.mod.capacity": 0.5,
        "model.moe.top_k": 2,
        "model.moe.noop_experts": 1,
    },
}


def _decode_model(case: str):
    """Block 0 dense + MoE, block 1 routed (staged cases) + MoE; T = data.seq_len = 32."""
    over = {"model.moe.capacity_factor": 0.5, "model.mod.every": 2, **DECODE_CASES[case]}
    model = build_model(_cfg(**over).model, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a router far from uniform: overflow and distinct choices
        for layer in model.cfg.moe_layers:
            w = model.blocks[layer].f.mlp.router.weight
            w.copy_(torch.randn(w.shape, generator=g))
    return model


def _full_expert_use(model, seq, routing):
    """The full forward's logits and, per MoE block, its kept choices per expert (B, E) and
    the choices of a real expert it dropped on overflow."""
    got = {}
    for layer in model.cfg.moe_layers:
        mlp = model.blocks[layer].f.mlp

        def hook(m, args, out, layer=layer):
            _, info, _ = m.route(*args)
            real = info.expert < m.num_experts
            valid = torch.ones_like(real) if args[1] is None else args[1][..., None]
            chosen = F.one_hot(info.expert, info.router_logits.shape[-1])  # (B, n, K, E + N)
            used = (chosen * info.kept[..., None]).sum((1, 2))[:, : m.num_experts]
            got[layer] = (used, int((real & ~info.kept & valid).sum()), info.capacity)

        mlp.register_forward_hook(hook)
    with torch.no_grad():
        logits = model(seq, routing=routing).logits
    for layer in model.cfg.moe_layers:
        model.blocks[layer].f.mlp._forward_hooks.clear()
    return logits, got


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decoding_equals_the_full_forward_overflow_included(case):
    model = _decode_model(case)
    routing, t = "predictor", model.cfg.max_seq_len // 2  # T = 32, the trained length
    seq = torch.randint(0, 128, (B, t), generator=torch.Generator().manual_seed(2))
    full, use = _full_expert_use(model, seq, routing)
    staged = bool(model.cfg.routed_layers)
    # cond: the XLA path's logic eagerly (the XLA test runs it on staged_integrated_top2)
    for cond in (None, python_cond) if case == "staged_top1" else (None,):
        cache = KVCache.empty(model, B, t, seq_len=t)
        inc = [
            decode_step(model, cache, seq[:, i], torch.full((B,), i), routing, cond)
            for i in range(t)
        ]
        torch.testing.assert_close(torch.stack(inc, 1), full, rtol=1e-5, atol=1e-5)
        for layer in model.cfg.moe_layers:
            used, dropped, c = use[layer]
            assert c == moe_capacity(model.blocks[layer], t)
            assert dropped > 0 and int(used.max()) == c  # an expert overflowed
            assert torch.equal(cache.experts[layer], used)  # the same slots, expert by expert
    assert model.cfg.moe_layers == [0, 1] and model.cfg.routed_layers == ([1] if staged else [])
    assert c == expert_capacity(model.cfg.moe, 16 if staged else 32)  # k = 16 in block 1


def test_expert_choice_decoding_needs_its_predictor_and_a_causal_mode():
    from modxla.inference.load import InferenceError
    from modxla.inference.sample import generate

    model = build_model(_cfg(**{"model.moe.routing": "expert"}).model, seed=0)
    with pytest.raises(ValueError, match="needs its top-C predictor .* not causal"):
        KVCache.empty(model, 1, 8)
    with pytest.raises(InferenceError, match="not causal without its top-C predictor"):
        generate(model, [1, 2], 2)
    ec = build_model(_ec_cfg().model, seed=0)
    with pytest.raises(InferenceError, match="--routing predictor"):
        generate(ec, [1, 2], 2, routing="topk")
    cache = KVCache.empty(ec, 1, 8)  # with the predictor: a cache, and topk still refused
    with pytest.raises(ValueError, match="routing='predictor'"):
        decode_step(ec, cache, torch.tensor([1]), torch.tensor([0]), "topk")
    moe = build_model(_cfg().model, seed=0)  # token choice: bounded by the trained length too
    with pytest.raises(ValueError, match="trained length 32"):
        KVCache.empty(moe, 1, 33, seq_len=32)
    with pytest.raises(ConfigError, match="model.moe.predictor: needs model.moe.routing=expert"):
        _cfg(**{"model.moe.predictor": True})


# --- expert choice with its top-C predictor: causal routing and decoding ---


def _ec_cfg(**kw):
    return _cfg(**{"model.moe.routing": "expert", "model.moe.predictor": True, **kw})


def _ec_layer(seed=0, **kw) -> MoEMLP:
    layer = _layer(_ec_cfg(**kw), seed)
    with torch.no_grad():  # logits of order 1: decisions far from the threshold
        for p in layer.predictor.parameters():
            p.normal_(0.0, 0.5)
    return layer


def _ec_reference(layer, h, valid=None):
    """Each expert walks the tokens in position order and takes those its predictor logit
    puts above the threshold, while it has one of its C slots free; gate = router prob."""
    c, e_real = expert_capacity(layer.moe, h.shape[1]), layer.num_experts
    out, kept = torch.zeros_like(h), torch.zeros(h.shape[:2] + (e_real,), dtype=torch.bool)
    decided = torch.zeros(h.shape[0], e_real, dtype=torch.long)
    for b in range(h.shape[0]):
        for e in range(e_real):
            for t in range(h.shape[1]):
                logit = layer.predictor(h[b, t])[e]
                if logit <= layer.thresholds["predictor"] or (
                    valid is not None and not valid[b, t]
                ):
                    continue
                decided[b, e] += 1
                if decided[b, e] <= c:
                    p = torch.softmax(h[b, t] @ layer.router.weight.T, -1)[e]
                    out[b, t] += p * _expert(layer, e, h[b, t])
                    kept[b, t, e] = True
    return out, kept, decided


@pytest.mark.parametrize("masked", [False, True])
def test_expert_choice_predictor_mode_equals_the_per_token_reference(masked):
    layer = _ec_layer(seed=3)
    h = torch.randn(B, N, 64)
    valid = torch.rand(B, N, generator=torch.Generator().manual_seed(4)) > 0.3 if masked else None
    with torch.no_grad():
        c = expert_capacity(layer.moe, N)
        # a threshold at the (1 - C/N) quantile: about C wanted per expert, some more, some fewer
        layer.thresholds["predictor"] = float(layer.predictor(h).quantile(1 - c / N))
        delta, info, terms = layer.route(h, valid, "predictor")
        ref, kept, decided = _ec_reference(layer, h, valid)
    assert torch.equal(info.kept, kept)
    assert torch.equal(info.decided, decided)
    assert (decided > c).any() and (decided < c).any()  # overflow, and experts left short
    assert torch.equal(info.kept.sum(1), decided.clamp(max=c))  # exactly min(C, decided)
    torch.testing.assert_close(delta, ref, rtol=1e-5, atol=1e-5)
    untaken = ~info.kept.any(-1)  # dropped on overflow or never wanted: delta exactly 0
    assert untaken.sum() >= 2 and torch.equal(delta[untaken], torch.zeros_like(delta[untaken]))
    if masked:
        assert not info.kept[~valid].any()  # an invalid token takes no slot
    assert float(terms["dropped_frac"]) == pytest.approx(float(untaken.float().mean()))
    # top-k mode still takes each expert's top-C, and the predictor's target is that
    with torch.no_grad():
        _, top, _ = layer.route(h)
    assert torch.equal(top.kept, top.target > 0) and int(top.kept.sum()) == B * 4 * c


def test_expert_choice_predictor_learns_from_its_bce_only():
    """Its BCE on stop_gradient(h) reaches the predictor alone; the LM loss never reaches it;
    and the model's predictor loss is the mean BCE over MoD blocks and MoE predictors."""
    from modxla.model import lm_loss

    cfg = _ec_cfg(**{"model.num_layers": 4, "model.moe.every": 2, "model.mod.capacity": 0.5})
    model = build_model(cfg.model, seed=0)
    assert cfg.model.routed_layers == cfg.model.moe_predictor_layers == [1, 3]  # staged
    tokens = torch.randint(0, 128, (B, 33))
    out = model(tokens[:, :-1])
    mod_bce = [
        F.binary_cross_entropy_with_logits(i.predictor_logits, i.topk_mask) for i in out.routing
    ]
    moe_bce = [
        F.binary_cross_entropy_with_logits(i.predictor_logits, i.target) for i in out.experts
    ]
    torch.testing.assert_close(out.predictor_loss, torch.stack(mod_bce + moe_bce).mean())
    assert {"moe_predictor_acc/block1", "moe_predictor_acc/block3"} <= set(out.block_stats)
    for i in out.experts:  # the target: each expert's top-C of its k routed tokens
        assert torch.equal(i.target.sum(1), torch.full((B, 4), float(i.capacity)))
    out.predictor_loss.backward()
    for name, p in model.named_parameters():
        grad = p.grad is not None and p.grad.abs().sum() > 0
        assert grad == (".predictor." in name), name
    model.zero_grad(set_to_none=True)
    out = model(tokens[:, :-1])
    lm_loss(out.logits, tokens[:, 1:]).backward()
    moe_pred = [p for n, p in model.named_parameters() if ".mlp.predictor." in n]
    assert len(moe_pred) == 8 and all(p.grad is None for p in moe_pred)
    assert model.blocks[1].f.mlp.router.weight.grad.abs().sum() > 0


EC_DECODE_CASES = {
    "expert_choice": {},
    "staged_expert_choice": {"model.mod.capacity": 0.5},
    "one_expert": {"model.moe.experts": 1, "model.moe.capacity_factor": 0.5},  # (B, n, 1) logits
}


def _ec_decode_model(case: str, threshold: float):
    """Block 0 dense + EC MoE, block 1 routed (staged case) + EC MoE; T = 32."""
    over = {"model.moe.capacity_factor": 1.0, "model.mod.every": 2, **EC_DECODE_CASES[case]}
    model = build_model(_ec_cfg(**over).model, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # predictor logits of order 1: far from the threshold
        for layer in model.cfg.moe_layers:
            mlp = model.blocks[layer].f.mlp
            for p in (mlp.router.weight, *mlp.predictor.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if p.ndim > 1 else 0.1))
            mlp.thresholds["predictor"] = threshold
    return model


def _ec_full_use(model, seq):
    """Full predictor-mode forward: logits, and per MoE block (kept per expert (B, E),
    decided per expert (B, E), C)."""
    with torch.no_grad():
        out = model(seq, routing="predictor")
    use = {
        layer: (i.kept.sum(1), i.decided, i.capacity)
        for layer, i in zip(model.cfg.moe_layers, out.experts, strict=True)
    }
    return out.logits, use


@pytest.mark.parametrize(
    "case, batch, threshold",  # -1e9: every token wants every expert; 0 overflows some
    [
        ("expert_choice", 1, 0.0),
        ("expert_choice", 3, -1e9),
        ("staged_expert_choice", 1, -1e9),
        ("staged_expert_choice", 3, 0.0),
        ("one_expert", 2, 0.0),
    ],
)
def test_expert_choice_decoding_equals_the_causal_full_forward(case, batch, threshold):
    model = _ec_decode_model(case, threshold)
    t = 32  # the trained length
    seq = torch.randint(0, 128, (batch, t), generator=torch.Generator().manual_seed(2))
    full, use = _ec_full_use(model, seq)
    conds = (None, python_cond) if case == "staged_expert_choice" and batch == 3 else (None,)
    for cond in conds:
        cache = KVCache.empty(model, batch, t, seq_len=t)
        inc = [
            decode_step(model, cache, seq[:, i], torch.full((batch,), i), "predictor", cond)
            for i in range(t)
        ]
        torch.testing.assert_close(torch.stack(inc, 1), full, rtol=1e-5, atol=1e-5)
        for layer in model.cfg.moe_layers:
            kept, decided, c = use[layer]
            assert c == moe_capacity(model.blocks[layer], t)
            assert torch.equal(cache.experts[layer], kept)  # the same slots, expert by expert
            assert (decided > c).any()  # an expert overflowed
            if threshold < -1:  # every token wanted: each expert took its first C exactly
                assert torch.equal(kept, torch.full_like(kept, c))


@pytest.mark.slow  # compiles one decode graph
def test_xla_decoding_of_staged_integrated_mode_matches_eager():
    """Dense MoE block, routed block around an MoE with no-op experts, top-2, overflow: the
    XLA decode step (conditionals, buckets of rows) traced once, equal to the full forward."""
    import torch_xla

    from modxla.xla.decode import Decoder

    model = _decode_model("staged_integrated_top2")
    t, dev = 32, torch_xla.device()
    seq = torch.randint(0, 128, (B, t), generator=torch.Generator().manual_seed(3))
    full, use = _full_expert_use(model, seq, "predictor")
    decoder = Decoder(_decode_model("staged_integrated_top2").to(dev), "predictor")
    cache = KVCache.empty(decoder.model, B, t, dev, seq_len=t)
    inc = [decoder(cache, seq[:, i].to(dev), torch.full((B,), i).to(dev)).cpu() for i in range(t)]
    torch.testing.assert_close(torch.stack(inc, 1), full, rtol=1e-5, atol=1e-5)
    for layer in model.cfg.moe_layers:
        assert use[layer][1] > 0  # overflow
        assert torch.equal(cache.experts[layer].cpu(), use[layer][0])
    assert decoder.traces == 2  # traced at the first token, checked once, replayed after


@pytest.mark.slow  # compiles one decode graph
def test_xla_decoding_of_staged_expert_choice_matches_eager():
    """A dense block's and a routed block's expert-choice MoE, decided by their predictors,
    overflow included: the XLA decode step (conditionals, buckets of rows) traced once, equal
    to the causal full forward."""
    import torch_xla

    from modxla.xla.decode import Decoder

    model = _ec_decode_model("staged_expert_choice", 0.0)
    t, dev = 32, torch_xla.device()
    seq = torch.randint(0, 128, (B, t), generator=torch.Generator().manual_seed(3))
    full, use = _ec_full_use(model, seq)
    decoder = Decoder(_ec_decode_model("staged_expert_choice", 0.0).to(dev), "predictor")
    cache = KVCache.empty(decoder.model, B, t, dev, seq_len=t)
    inc = [decoder(cache, seq[:, i].to(dev), torch.full((B,), i).to(dev)).cpu() for i in range(t)]
    torch.testing.assert_close(torch.stack(inc, 1), full, rtol=1e-5, atol=1e-5)
    for layer in model.cfg.moe_layers:
        kept, decided, c = use[layer]
        assert (decided > c).any()  # overflow
        assert torch.equal(cache.experts[layer].cpu(), kept)
    assert decoder.traces == 2  # traced at the first token, checked once, replayed after


def test_expert_choice_trains_gets_post_hoc_predictors_and_samples(tmp_path, data_cache, capsys):
    """modxla-train (expert choice, no predictor), modxla-train-predictor (adds and trains
    the experts' top-C predictors on the frozen model), modxla-generate: mains in process."""
    import json

    from modxla.cli.generate import main as generate
    from modxla.cli.train import main as train
    from modxla.cli.train_predictor import main as train_predictor

    run = tmp_path / "ec"
    extra = ("train.device=cpu", "train.steps=3", "model.moe.routing=expert")
    assert train(train_args(run, data_cache, *extra, config="configs/moe.yaml")[2:]) == 0
    argv = ["--run-dir", str(run), "--prompt", "def f(", "--max-tokens", "4", "--device", "cpu"]
    assert generate(argv) == 2  # no predictor yet: refused, and said how to add one
    assert "modxla-train-predictor" in capsys.readouterr().err
    steps = ["--steps", "30", "--lr", "3e-2", "--eval-batches", "2", "--log-every", "30"]
    assert train_predictor(["--run-dir", str(run), *steps]) == 0
    out = capsys.readouterr().out
    assert "predictors: fresh" in out and "predictor vs top-k: accuracy" in out
    result = json.loads((run / "predictor" / "eval.json").read_text())
    q = result["predictor"]
    # C = round(1.25 * 32 / 4) = 10 of 32 tokens per expert: always-skip scores 22/32
    assert q["always_skip_accuracy"] == pytest.approx(22 / 32)
    assert q["topk_accuracy"] > q["always_skip_accuracy"] + 0.1  # 0.91 vs 0.69 when written
    assert 0 < result["predictor"]["moe_taken"] < 1 and "routed" not in result["predictor"]
    assert set(result) >= {"topk", "predictor"} and "router" not in result
    assert generate([*argv, "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "routing=predictor" in err
    assert "expert-processed fraction of choices per MoE block: block 1: " in err


@pytest.mark.slow  # compiles one decode graph
def test_generate_on_xla_samples_a_token_choice_moe_run(tmp_path, data_cache, capsys):
    from modxla.cli.generate import main as generate
    from modxla.cli.train import main as train

    run = tmp_path / "moe"
    extra = ("train.device=cpu", "train.steps=2")
    assert train(train_args(run, data_cache, *extra, config="configs/moe.yaml")[2:]) == 0
    argv = ["--run-dir", str(run), "--prompt", "def f(", "--max-tokens", "4", "--seed", "1"]
    assert generate([*argv, "--device", "cpu", "--temperature", "0"]) == 0
    cpu = capsys.readouterr()
    assert generate([*argv, "--device", "xla", "--temperature", "0"]) == 0
    xla = capsys.readouterr()
    assert xla.out == cpu.out  # greedy: the same tokens as eager
    assert "expert-processed fraction of choices per MoE block: block 1: " in xla.err


@pytest.mark.slow  # trains, then trains predictors: ~6 s
def test_post_hoc_predictors_continue_mods_and_add_the_missing_moe_ones(
    tmp_path, data_cache, capsys
):
    """Staged MoDE with expert choice, trained with MoD's predictors and not the MoE's:
    --init auto continues MoD's jointly trained predictors and starts only the MoE's fresh."""
    import json

    from modxla.cli.train import main as train
    from modxla.cli.train_predictor import main as train_predictor
    from modxla.io.checkpoint import latest_checkpoint, load

    run = tmp_path / "staged"
    extra = ("train.device=cpu", "train.steps=2", "model.moe.routing=expert")
    assert train(train_args(run, data_cache, *extra, config="configs/mode_staged.yaml")[2:]) == 0
    steps = ["--steps", "1", "--eval-batches", "1", "--log-every", "1"]
    assert train_predictor(["--run-dir", str(run), *steps]) == 0
    out = capsys.readouterr().out
    assert "predictors: continue (joint weights; fresh: model.moe)" in out
    result = json.loads((run / "predictor" / "eval.json").read_text())
    assert result["fresh_predictors"] == ["model.moe"]
    # the MoD predictor went on from the run's weights: one step away from them, not a new init
    model = build_model(load_config(str(run / "config.yaml")).model, seed=0)
    key = next(
        k for k, _ in model.named_parameters() if ".predictor.fc1.weight" in k and ".mlp." not in k
    )

    def weight(ckpts: str) -> torch.Tensor:
        template = {"model": {key: torch.zeros_like(model.state_dict()[key])}}
        return load(latest_checkpoint(str(run / ckpts)), template)["model"][key]

    base, post = weight("checkpoints"), weight("predictor/checkpoints")
    assert 0 < (post - base).abs().max() < 0.05 < base.abs().max()
