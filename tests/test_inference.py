"""Causal decoding (KV cache) parity, cache contents, sampling, and the predictor tool."""

import json

import pytest
import torch
import torch_xla
import torch_xla.debug.metrics as met

from modxla.cli.generate import clip_to_context
from modxla.inference.load import InferenceError, set_thresholds
from modxla.inference.sample import generate, sample_next
from modxla.model import build_model, capacity_k
from modxla.model.decode import KVCache, decode_step, python_cond
from modxla.routing.calibration import fit_thresholds
from modxla.routing.evaluate import evaluate_routing
from tests.conftest import read_metrics, run, train_args

PROMPT, NEW = 32, 32
T = PROMPT + NEW  # the length the test models are "trained" at (data.seq_len)


def _model(tiny_cfg, seed=3, **kw):
    # max_seq_len 2T: the trained length T, not max_seq_len, must set the routed blocks' k
    over = {"model.num_layers": 4, "model.mod.capacity": 0.25, "data.seq_len": T}
    cfg = tiny_cfg(**{**over, "model.max_seq_len": 2 * T, **kw})
    return build_model(cfg.model, seed=seed).eval()


def _decode_all(model, tokens, routing, seq_len=T):
    """Logits of every position, feeding tokens (B, S) one at a time through the cache of a
    model trained at `seq_len`."""
    b, s = tokens.shape
    cache = KVCache.empty(model, b, s, seq_len=seq_len)
    out = [decode_step(model, cache, tokens[:, t], torch.full((b,), t), routing) for t in range(s)]
    return torch.stack(out, 1), cache


def _compiles() -> int:
    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


def _check_cache(model, full, cache, row=0):
    """A routed block caches exactly the tokens the full forward routed, in k slots."""
    s = full.logits.shape[1]
    for info, layer in zip(full.routing, model.cfg.routed_layers, strict=True):
        k = info.idx.shape[1]
        routed = torch.nonzero(info.routed_mask[row] > 0)[:, 0]
        assert cache.k[layer].shape[2] == k < s  # capacity slots, not S
        n = int(cache.count[layer][row])
        assert n == len(routed) and 0 < n <= k
        assert cache.pos[layer][row, :n].tolist() == routed.tolist()  # original positions
        assert (cache.pos[layer][row, n:] == -1).all()
        assert cache.k[layer][row][:, n:].abs().sum() == 0  # empty slots never written
        assert cache.k[layer][row][:, :n].abs().sum() > 0
    assert cache.k[0].shape[2] == s  # a dense block caches every token


@pytest.mark.parametrize(
    "routing,mode,calibrated",
    [
        ("predictor", "learned", False),
        ("router", "learned", False),
        ("predictor", "random", False),
        ("predictor", "learned", True),  # the router's threshold is read the same way
    ],
)
def test_incremental_decoding_matches_the_full_forward(tiny_cfg, routing, mode, calibrated):
    model = _model(tiny_cfg, **{"model.mod.router": mode})
    torch.manual_seed(0)
    if calibrated:  # thresholds routing 40% of tokens (capacity 25%): decide = logit > t
        fit = [torch.randint(0, 128, (2, T + 1))]
        before = model(fit[0][:, :-1], routing=routing).routing
        set_thresholds(model, fit_thresholds(model, fit, 0.4, [routing]))
        after = model(fit[0][:, :-1], routing=routing).routing
        for b, a in zip(before, after, strict=True):  # the thresholds change the decisions
            assert not torch.equal(b.decided, a.decided)
            assert float(a.decided.sum()) == pytest.approx(0.4 * 2 * T, abs=1)
    prompt = torch.randint(0, 128, (PROMPT,)).tolist()
    tokens, _ = generate(model, prompt, NEW, routing, temperature=1.0, seed=1, seq_len=T)
    assert len(tokens) == T and tokens[:PROMPT] == prompt
    seq = torch.tensor([tokens])
    full = model(seq, routing=routing)
    k = full.routing[0].idx.shape[1]
    assert any(bool((i.decided > k).any()) for i in full.routing)  # overflow is exercised
    inc, cache = _decode_all(model, seq, routing)
    torch.testing.assert_close(inc, full.logits, rtol=1e-5, atol=1e-5)
    _check_cache(model, full, cache)


def test_batched_decoding_processes_only_routing_rows(tiny_cfg):
    model = _model(tiny_cfg)
    torch.manual_seed(1)
    seq = torch.randint(0, 128, (3, T))
    full = model(seq, routing="predictor")
    inc, cache = _decode_all(model, seq, "predictor")
    torch.testing.assert_close(inc, full.logits, rtol=1e-5, atol=1e-5)
    for row in range(3):
        _check_cache(model, full, cache, row)
    # rows route differently, so each step works on a changing subset of the batch
    masks = full.routing[0].routed_mask
    assert not torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("cond", [None, python_cond], ids=["eager", "cond"])
@pytest.mark.parametrize("batch", [1, 2])
def test_a_skipped_token_does_no_block_work(tiny_cfg, monkeypatch, batch, cond):
    model = _model(tiny_cfg)
    layer = model.cfg.routed_layers[0]
    block = model.blocks[layer]
    qkv, rows = block.f.attn.qkv, []

    def counted_qkv(x, positions):
        rows.append(x.shape[0])  # how many rows did attention work
        return qkv(x, positions)

    monkeypatch.setattr(block.f.attn, "qkv", counted_qkv)
    logit = torch.tensor([-1.0, 1.0][:batch])  # row 0 always skips, row 1 always routes
    monkeypatch.setattr(block.predictor, "rows", lambda x: logit[:, None])  # decoding's form
    s = 24
    cache = KVCache.empty(model, batch, s, seq_len=T)
    for t in range(s):
        tokens, pos = torch.full((batch,), 5), torch.full((batch,), t)
        decode_step(model, cache, tokens, pos, "predictor", cond)
    k = cache.k[layer].shape[2]
    assert k == capacity_k(0.25, T) == 16 < s  # the trained capacity, not round(C * s)
    # row 1 routes its first k tokens (then the buffer is full); row 0 is never processed
    # (the conditional path: bucket 1 of (1, 2) takes the one routing row)
    assert rows == [1] * (k if batch == 2 else 0)
    assert cache.count[layer].tolist() == [0, k][:batch]


@pytest.mark.parametrize("routing", ["predictor", "router"])
def test_a_shorter_decode_keeps_the_trained_capacity(tiny_cfg, routing):
    """Decoding n < T tokens equals the full forward at the trained length T on those n
    positions (causal routing: position t sees tokens 0..t only), with k = round(C * T)
    slots; a full forward of n tokens (k = round(C * n)) is another computation."""
    model = _model(tiny_cfg)
    torch.manual_seed(2)
    seq = torch.randint(0, 128, (2, T))
    full = model(seq, routing=routing)  # the trained length: k = 16
    k = capacity_k(0.25, T)
    for n in (8, 40):
        inc, cache = _decode_all(model, seq[:, :n], routing)
        torch.testing.assert_close(inc, full.logits[:, :n], rtol=1e-5, atol=1e-5)
        for info, layer in zip(full.routing, model.cfg.routed_layers, strict=True):
            assert cache.k[layer].shape[2] == k  # not round(C * n)
            for row in range(2):  # the tokens the full forward routed, up to position n
                routed = torch.nonzero(info.routed_mask[row, :n] > 0)[:, 0].tolist()
                c = int(cache.count[layer][row])
                assert cache.pos[layer][row, :c].tolist() == routed
        short = model(seq[:, :n], routing=routing).logits  # what a cache of round(C*n) gave
        assert (short - full.logits[:, :n]).abs().max() > 1e-4  # 10x the parity tolerance
    # greedy generation: the logits at a position do not depend on how many tokens are asked
    a, _ = generate(model, seq[0, :5].tolist(), 4, routing, temperature=0, seq_len=T)
    b, _ = generate(model, seq[0, :5].tolist(), 50, routing, temperature=0, seq_len=T)
    assert b[: len(a)] == a
    # past the trained length no k reproduces training: refused
    with pytest.raises(ValueError, match="trained length 64"):
        KVCache.empty(model, 1, T + 1, seq_len=T)
    with pytest.raises(InferenceError, match="trained length 64"):
        generate(model, seq[0].tolist(), 1, routing, seq_len=T)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize(
    "routing,mode", [("predictor", "learned"), ("router", "learned"), ("predictor", "random")]
)
def test_conditional_decoding_matches_the_full_forward(tiny_cfg, routing, mode, batch):
    """The XLA path's logic (routed blocks in conditionals, routing rows in buckets of
    1, 2, 4, 8), run eagerly with a Python `cond`: equal to the full forward, overflow too."""
    model = _model(tiny_cfg, **{"model.mod.router": mode})
    torch.manual_seed(batch)
    seq = torch.randint(0, 128, (batch, T))
    full = model(seq, routing=routing)
    k = full.routing[0].idx.shape[1]
    assert any(bool((i.decided > k).any()) for i in full.routing)  # overflow is exercised
    cache = KVCache.empty(model, batch, T, seq_len=T)
    inc = torch.stack(
        [
            decode_step(model, cache, seq[:, t], torch.full((batch,), t), routing, python_cond)
            for t in range(T)
        ],
        1,
    )
    torch.testing.assert_close(inc, full.logits, rtol=1e-5, atol=1e-5)
    for row in range(batch):
        _check_cache(model, full, cache, row)


@pytest.mark.slow
@pytest.mark.parametrize(
    "routing,mode,batch",
    [("predictor", "learned", 1), ("router", "learned", 8), ("predictor", "random", 8)],
)
def test_xla_decoding_is_traced_once_and_matches(tiny_cfg, routing, mode, batch):
    from modxla.xla.decode import Decoder

    over = {"model.mod.router": mode}
    model = _model(tiny_cfg, **over)
    dev = torch_xla.device()
    decoder = Decoder(_model(tiny_cfg, **over).to(dev), routing)
    for prompt in range(2):  # a second prompt: a fresh cache, the same graph
        torch.manual_seed(10 * batch + prompt)
        seq = torch.randint(0, 128, (batch, T))
        full = model(seq, routing=routing)
        cache = KVCache.empty(decoder.model, batch, T, dev, seq_len=T)
        before = _compiles()
        out = []
        for t in range(T):
            pos = torch.full((batch,), t).to(dev)  # the position is a tensor input
            out.append(decoder(cache, seq[:, t].to(dev), pos).cpu())
        torch.testing.assert_close(torch.stack(out, 1), full.logits, rtol=1e-5, atol=1e-5)
        k = full.routing[0].idx.shape[1]
        assert any(bool((i.decided > k).any()) for i in full.routing)  # overflow
        cpu = KVCache(
            *(
                [
                    [None if t is None else t.cpu() for t in ts]
                    for ts in (cache.k, cache.v, cache.pos, cache.count)
                ]
            ),
            cache.length,
            cache.seq_len,
        )
        for row in range(batch):
            _check_cache(model, full, cpu, row)
        # traced at the first token and once more to check what it read; replayed after,
        # at every later token, position and prompt
        assert (decoder.calls, decoder.traces) == ((prompt + 1) * T, 2)
        if prompt:  # at most the new cache's zeros compile: no decode graph
            assert _compiles() - before <= 1


@pytest.mark.slow
def test_xla_decoding_traced_every_token_counts_every_trace(tiny_cfg):
    """The benchmark's old path: the counter tells it from the replayed one."""
    from modxla.xla.decode import Decoder

    dev = torch_xla.device()
    decoder = Decoder(_model(tiny_cfg).to(dev), "predictor", skip="where", replay=False)
    cache = KVCache.empty(decoder.model, 2, T, dev, seq_len=T)
    for t in range(8):
        decoder(cache, torch.full((2,), 3).to(dev), torch.full((2,), t).to(dev)).cpu()
    assert decoder.traces == decoder.calls == 8


def test_generate_clips_to_the_context(capsys):
    assert clip_to_context([1, 2, 3], 10, 64) == ([1, 2, 3], 10)
    assert clip_to_context([1, 2, 3], 64, 64) == ([1, 2, 3], 61)
    assert "generating 61 tokens, not 64" in capsys.readouterr().err
    prompt, n = clip_to_context(list(range(70)), 5, 64)
    assert prompt == list(range(7, 70)) and n == 1
    assert "keeping its last 63" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max-tokens"):
        clip_to_context([1], 0, 64)


def test_sampling_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, temperature=0).item() == 1
    assert all(sample_next(logits, 1.0, top_k=1, generator=g).item() == 1 for _ in range(20))
    seen = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert seen == {1, 2}
    # top-p 0.8: p = softmax = [.09, .67, .24, .01]; keeps {1, 2} (0.67 < 0.8 <= 0.91)
    seen = {sample_next(logits, 1.0, top_p=0.8, generator=g).item() for _ in range(300)}
    assert seen == {1, 2}


def test_evaluate_routing_reports_the_trivial_baseline(tiny_cfg):
    model = _model(tiny_cfg)
    torch.manual_seed(0)
    batches = [torch.randint(0, 128, (4, 65)) for _ in range(2)]
    res = evaluate_routing(model, batches)
    assert res["topk"]["routed"] == pytest.approx(0.25)
    assert res["topk"]["overflow"] == 0.0
    assert res["predictor"]["always_skip_accuracy"] == pytest.approx(0.75)
    for mode in ("predictor", "router"):
        assert 0 < res[mode]["routed"] <= 0.25 and res[mode]["nll"] > 0


def test_predictor_tool_learns_top_k_membership(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    # predictor_loss_weight 0: the predictors stay at their init, as in a post-hoc setting.
    # Eager (train.device=cpu, which the tool inherits): a tiny model trains in seconds
    # there; the tool's XLA path is run by test_faults and the README's quick start.
    run(
        train_args(
            run_dir,
            data_cache,
            "train.steps=120",
            "train.log_every=40",
            "model.mod.predictor_loss_weight=0",
            "data.val_fraction=0.05",
            "train.device=cpu",
        ),
        2,
    )
    proc = run(
        [
            "tools/train_predictor.py",
            "--run-dir",
            str(run_dir),
            "--steps",
            "300",
            "--log-every",
            "10",
            "--eval-batches",
            "4",
        ],
        2,
    )
    recs = read_metrics(run_dir / "predictor")
    assert recs[-1]["predictor_loss"] < 0.6 * recs[0]["predictor_loss"]
    res = json.loads((run_dir / "predictor" / "eval.json").read_text())
    skip = res["predictor"]["always_skip_accuracy"]
    assert skip == pytest.approx(1 - 4 / 32, abs=1e-6)
    # measured on validation: accuracy 0.953, recall 0.875 (always-skip: 0.875, recall 0)
    assert res["predictor"]["topk_accuracy"] > skip + 0.04
    assert res["predictor"]["recall"] > 0.5
    assert res["predictor"]["normalized_ll"] > 0.99  # predictor routing ~ top-k routing
    assert "predictor" in proc.stdout and "always-skip" in proc.stdout
    assert (run_dir / "predictor" / "checkpoints").exists()
    out = run(
        [
            "tools/generate.py",
            "--run-dir",
            str(run_dir),
            "--prompt",
            "import os",
            "--seed",
            "0",
        ],
        1,
    )
    assert out.stdout.startswith("import os") and "step_00000300" in out.stderr
    # the default 64 new tokens do not fit max_seq_len 64 after the prompt: clipped, said so
    assert "note: generating" in out.stderr and "tokens/s" in out.stderr


def test_predictor_tool_refusals(tmp_path, data_cache):
    proc = run(["tools/train_predictor.py", "--run-dir", str(tmp_path / "none")], 1, check=False)
    assert proc.returncode == 2 and "is not a run directory" in proc.stderr
    base = tmp_path / "base"
    run(
        train_args(base, data_cache, "train.steps=2", "model.mod.capacity=1.0", "train.device=cpu"),
        1,
    )
    proc = run(["tools/train_predictor.py", "--run-dir", str(base)], 1, check=False)
    assert proc.returncode == 2 and "without routed blocks" in proc.stderr
    for p in (base / "checkpoints").iterdir():
        (p / "COMPLETE").unlink()
    proc = run(["tools/generate.py", "--run-dir", str(base), "--prompt", "x"], 1, check=False)
    assert proc.returncode == 2 and "has no complete checkpoint" in proc.stderr


def test_bench_decode_reports_both_variants(capsys):
    from tools.bench_decode import main

    tiny = [f"model.{k}={v}" for k, v in (("d_model", 64), ("num_heads", 4), ("vocab_size", 128))]
    args = [
        "--backends",
        "eager",
        "--batches",
        "1,2",
        "--reps",
        "1",
        "model.max_seq_len=32",
        "data.seq_len=32",
    ]
    assert main(args + tiny) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["flop_ratio"] > 1
    for batch in ("B1", "B2"):
        r = res["results"][f"eager/{batch}"]
        b, m, half = r["decode_ms_baseline"], r["decode_ms_mod"], 5e-4  # 3 decimals
        assert (b - half) / (m + half) - 5e-4 <= r["speedup"] <= (b + half) / (m - half) + 5e-4
        for q in ("quartiles_ms_baseline", "quartiles_ms_mod"):
            assert r[q][0] <= r[q.replace("quartiles", "decode")] <= r[q][2]
        assert r["kv_bytes_mod"] < r["kv_bytes_baseline"]
        # k = round(0.125 * 32) = 4 slots of 32, plus 8-byte positions and a count
        assert r["routed_block_kv_over_dense"] == pytest.approx(4 / 32, rel=0.02)
        assert all(0 < f <= 4 / 32 for f in r["routed_frac"])  # calibration routes tokens
        # taking fewer than k/S of the tokens only raises the FLOP ratio
        assert r["flop_ratio_at_routed_frac"] >= res["flop_ratio"]
    assert res["interleave"] == "sequence"
    assert main(args[:2] + ["--batches", "1", "--interleave", "token"] + args[4:] + tiny) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["interleave"] == "token" and res["results"]["eager/B1"]["speedup"] > 0
    assert main(["--batches", "0"]) == 2
