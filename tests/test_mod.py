"""MoD routing maths on eager CPU: parity, exact k, RoPE positions, gradients, causality."""

import pytest
import torch

from modxla.model import MoDBlock, build_model, capacity_k, causal_slots
from modxla.model.layers import DenseBlock

T = 32


def _block(cfg, seed=0):
    torch.manual_seed(seed)
    return MoDBlock(cfg.model)


def _positions(b, t=T):
    return torch.arange(t).expand(b, t)


def test_capacity_k_is_round_c_t():
    assert capacity_k(0.125, 256) == 32
    assert capacity_k(0.125, 64) == 8
    assert capacity_k(0.5, 3) == 2  # round half to even: 1.5 -> 2
    assert capacity_k(0.01, 16) == 1  # never an empty buffer
    assert capacity_k(1.0, 7) == 7


def test_full_capacity_with_unit_router_equals_dense_block(tiny_cfg):
    cfg = tiny_cfg(**{"model.mod.capacity": 1.0})
    mod = _block(cfg)
    dense = DenseBlock(cfg.model)
    dense.f.load_state_dict(mod.f.state_dict())
    mod.router_logits = lambda x: torch.ones(x.shape[:2])  # r fixed to 1
    x = torch.randn(3, T, cfg.model.d_model)
    out, info = mod(x, _positions(3))
    ref, _ = dense(x, _positions(3))
    assert info.routed_mask.sum().item() == 3 * T
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def _naive(mod, x, r, positions_of):
    """Per-token reference: f over the chosen tokens only, then x + r * f for them."""
    k = capacity_k(mod.capacity, x.shape[1])
    out = x.clone()
    for b in range(x.shape[0]):
        sel = sorted(torch.topk(r[b], k).indices.tolist())
        delta = mod.f(x[b, sel][None], positions_of(sel)[None])[0]
        for j, i in enumerate(sel):
            out[b, i] = x[b, i] + r[b, i] * delta[j]
    return out


def test_exactly_k_tokens_and_naive_reference(tiny_cfg):
    cfg = tiny_cfg()
    mod = _block(cfg)
    x = torch.randn(4, T, cfg.model.d_model)
    out, info = mod(x, _positions(4))
    k = capacity_k(0.25, T)
    assert info.idx.shape == (4, k)
    assert (info.routed_mask.sum(1) == k).all()
    assert (info.idx.diff(dim=1) > 0).all()  # sorted ascending, no duplicates
    unrouted = info.routed_mask == 0
    assert torch.equal(out[unrouted], x[unrouted])  # skipped tokens pass through untouched
    ref = _naive(mod, x, info.router_logits, lambda sel: torch.tensor(sel))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_routed_tokens_keep_their_original_rope_positions(tiny_cfg):
    mod = _block(tiny_cfg())
    x = torch.randn(2, T, 64)
    out, info = mod(x, _positions(2))
    k = info.idx.shape[1]
    # The pitfall: positions 0..k-1 inside the buffer. It must give a different answer.
    wrong = _naive(mod, x, info.router_logits, lambda sel: torch.arange(k))
    assert (out - wrong).abs().max() > 1e-3
    # An offset of every position (e.g. a later chunk) changes nothing but RoPE's phase.
    shifted, _ = mod(x, _positions(2) + 5)
    ref = _naive(mod, x, info.router_logits, lambda sel: torch.tensor(sel) + 5)
    torch.testing.assert_close(shifted, ref, rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_router_through_r_times_f(tiny_cfg):
    mod = _block(tiny_cfg())
    x = torch.randn(2, T, 64)
    out, _ = mod(x, _positions(2))
    out.pow(2).sum().backward()
    g = mod.router.weight.grad
    assert g is not None and g.abs().sum() > 0


def test_each_routed_block_has_its_own_router(tiny_cfg):
    model = build_model(tiny_cfg(**{"model.num_layers": 4}).model, seed=0)
    routers = [b.router.weight for b in model.blocks if b.routed]
    assert len(routers) == 2
    assert routers[0].data_ptr() != routers[1].data_ptr()
    assert not torch.equal(routers[0], routers[1])


def test_random_routing_draws_new_routes_each_call(tiny_cfg):
    mod = _block(tiny_cfg(**{"model.mod.router": "random"}))
    assert mod.router is None
    x = torch.randn(2, T, 64)
    _, a = mod(x, _positions(2))
    _, b = mod(x, _positions(2))
    assert (a.routed_mask.sum(1) == b.routed_mask.sum(1)).all()
    assert not torch.equal(a.idx, b.idx)


def test_causal_slots_take_the_first_k_routed_tokens():
    decide = torch.tensor([[0, 1, 1, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    idx, valid = causal_slots(decide, 3)
    assert idx[0].tolist() == [1, 2, 4] and valid[0].all()  # 5 and 7 overflow
    assert valid[1].sum() == 1 and idx[1][valid[1]].tolist() == [5]


def _future_changes_past(model, tokens, routing, t):
    changed = tokens.clone()
    changed[:, t + 1 :] = torch.randint(0, model.cfg.vocab_size, changed[:, t + 1 :].shape)
    a = model(tokens, routing=routing).logits[:, : t + 1]
    b = model(changed, routing=routing).logits[:, : t + 1]
    return (a - b).abs().max().item()


@pytest.mark.parametrize("routing", ["predictor", "router"])
@pytest.mark.parametrize("overflow", [True, False])
def test_causal_modes_do_not_leak_the_future(tiny_cfg, routing, overflow):
    # capacity 0.25 with ~half the tokens deciding overflows the buffer; 0.75 does not.
    cfg = tiny_cfg(**{"model.mod.capacity": 0.25 if overflow else 0.75})
    torch.manual_seed(0)
    model = build_model(cfg.model, seed=1)
    tokens = torch.randint(0, cfg.model.vocab_size, (4, T))
    with torch.no_grad():
        info = model(tokens, routing=routing).routing[0]
        k = info.idx.shape[1]
        assert bool((info.decided > k).any()) == overflow
        assert (info.decided > 0).all()  # something is routed in every sequence
        for t in (0, 5, 13, 20, 30):
            assert _future_changes_past(model, tokens, routing, t) < 1e-6


def test_topk_mode_does_see_the_future(tiny_cfg):
    # The control for the test above: top-k routing is not causal, and the check detects it.
    model = build_model(tiny_cfg().model, seed=1)
    torch.manual_seed(0)
    tokens = torch.randint(0, 128, (4, T))
    with torch.no_grad():
        assert max(_future_changes_past(model, tokens, "topk", t) for t in (5, 13, 20)) > 1e-4


def test_model_output_api(tiny_cfg):
    cfg = tiny_cfg(**{"model.num_layers": 4, "model.mod.aux_loss_weight": 0.1})
    model = build_model(cfg.model, seed=0)
    tokens = torch.randint(0, 128, (2, T))
    out = model(tokens)
    assert out.logits.shape == (2, T, 128)
    assert len(out.routing) == 2
    for info in out.routing:
        assert info.router_logits.shape == info.topk_mask.shape == (2, T)
        assert info.predictor_logits.shape == (2, T)
        assert info.valid.all()
    expected = 0.1 * out.router_loss + 1.0 * out.predictor_loss
    torch.testing.assert_close(out.aux_loss, expected)
    with pytest.raises(ValueError, match="routing must be one of"):
        model(tokens, routing="softmax")


def test_predictor_is_trained_on_stop_gradient_input(tiny_cfg):
    cfg = tiny_cfg(**{"model.mod.aux_loss_weight": 0.0})
    model = build_model(cfg.model, seed=0)
    out = model(torch.randint(0, 128, (2, T)))
    out.predictor_loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None for n, g in grads.items() if "predictor" not in n)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "predictor" in n)


def test_bench_step_reports_quartiles_on_the_eager_path(capsys):
    import json

    from tools.bench_step import main

    tiny = ["model.d_model=64", "model.num_heads=4", "model.vocab_size=128", "model.num_layers=2"]
    seq = ["model.max_seq_len=32", "data.seq_len=32", "train.batch_size=2", "train.device=cpu"]
    names = ["dense", "moe", "mod", "staged", "integrated"]
    assert main(["--steps", "3", "--variants", ",".join(names[1:] + ["dense"]), *tiny, *seq]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["backend"] == "eager" and list(res["variants"]) == names  # dense first
    assert res["size"] == "2 layers x d64, T32, B2, V128"  # one size: the dense config's
    v = res["variants"]
    assert v["dense"]["flop_ratio"] == v["dense"]["speedup"] == 1
    assert v["moe"]["flop_ratio"] < 1  # 4 experts at capacity factor 1.25: more slots
    assert min(v[n]["flop_ratio"] for n in ("mod", "staged", "integrated")) > 1
    half = 5e-5  # step times printed to 4 decimals
    b = v["dense"]["step_s"]
    for name in names:
        m = v[name]["step_s"]
        lo, hi = (b - half) / (m + half) - 5e-4, (b + half) / (m - half) + 5e-4
        assert lo <= v[name]["speedup"] <= hi
        for key in ("quartiles_s", "cpu_quartiles_s"):
            q1, med, q3 = v[name][key]
            assert 0 < q1 <= med <= q3
    for bad in (["--steps", "0"], ["--variants", "mod,moe"], ["--variants", "dense,big"]):
        with pytest.raises(SystemExit) as e:  # argparse: usage and exit 2
            main(bad)
        assert e.value.code == 2


@pytest.mark.parametrize("outputs", [1, 4])
@pytest.mark.parametrize("normed", [False, True])
def test_predictor_rows_equals_its_forward(outputs, normed):
    """Decoding's one-token form (W @ x^T) gives the logits of the training forward."""
    from modxla.model.predict import Predictor

    torch.manual_seed(0)
    p = Predictor(32, 16, normed, outputs)
    x = torch.randn(5, 32)
    expect = p(x[:, None])[:, 0] if outputs > 1 else p(x[:, None])  # (5, E) or (5, 1)
    torch.testing.assert_close(p.rows(x), expect.reshape(5, outputs), rtol=1e-5, atol=1e-6)
