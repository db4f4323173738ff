"""Sampling speed and KV-cache memory of the dense baseline vs MoD, interleaved; prints JSON.

    PJRT_DEVICE=CPU python tools/bench_decode.py [--batches 1,8] [--backends eager,xla]
    python tools/bench_decode.py --backends cuda      # eager PyTorch on a GPU

Both models decode the same random tokens, one position at a time over the whole trained
context (S = data.seq_len, so a routed block keeps the k = round(C * S) slots it trains with),
with `modxla.model.decode.decode_step` as modxla-generate runs it: on XLA traced once and
replayed, routed blocks in HLO conditionals (`modxla.xla.decode.Decoder`), interleaved with the
same decoding traced at every token with every row computed (`--xla-modes`, as before).
The models take turns a sequence at a time (`--interleave sequence`, the default; who goes
first alternates between repetitions), so both see the same machine load and each decodes as a
sampler does, its weights and cache as warm as its own working set leaves them. With
`--interleave token` they alternate token by token: then each step follows the other model's,
which has evicted its weights from the CPU's caches, and a model whose working set would fit
(MoD: half the dense blocks at this size) loses that advantage. Each
repetition decodes S tokens with fresh caches; the figure per repetition is its mean time per
token (a routed block's cost differs from token to token, so a per-token median would hide
it), reported as the median over repetitions with quartiles.

Routing. A freshly initialised predictor routes almost nothing or almost everything, which
would make MoD look better or worse than it is. So before timing, each routed block's
predictor bias is shifted so that it routes a fraction `capacity` of the tokens it sees
(measured on a calibration batch of random tokens, block by block in predictor mode, since a
block's input depends on the routing of the blocks before it). The routed fraction actually
reached while decoding is reported per routed block (it cannot exceed k/S: overflow drops).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from tqdm import tqdm

from modxla.config import ConfigError, load_config
from modxla.model import build_model, capacity_k
from modxla.model.decode import KVCache, decode_step
from modxla.model.mod import MoDBlock


def decode_flops(cfg, seq_len: int, routed: list[float] | None = None) -> float:
    """Mean forward FLOPs to decode one token of an S-token sequence (matmuls, 2*m*n*p).

    routed: per routed block, the share of tokens it takes (default: its capacity k/S)."""
    d, f, s = cfg.d_model, cfg.ffn_dim, seq_len
    proj = 2 * 4 * d * d + 2 * d * f * (3 if cfg.mlp == "swiglu" else 2)
    k = capacity_k(cfg.mod.capacity, s)
    share = dict(zip(cfg.routed_layers, routed or [k / s] * len(cfg.routed_layers), strict=True))
    total = 2 * d * cfg.vocab_size  # head
    for i in range(cfg.num_layers):
        if i not in share:
            total += proj + 4 * d * (s + 1) / 2  # scores and values over t+1 keys, t < S
            continue
        total += 2 * d if cfg.mod.router == "learned" else 0
        if cfg.mod.predictor:
            total += 2 * (d * cfg.mod.predictor_hidden + cfg.mod.predictor_hidden)
        n = share[i] * s  # tokens taken, the j-th attending over j keys
        total += share[i] * (proj + 4 * d * (n + 1) / 2)
    return total


@torch.no_grad()
def calibrate_predictors(model, seq_len: int, seed: int = 0) -> None:
    """Shift each predictor's output bias so that it routes a `capacity` share of tokens."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.cfg.vocab_size, (8, seq_len), generator=gen)
    for block in model.blocks:
        if not isinstance(block, MoDBlock):
            continue
        seen = {}

        def keep_input(module, args, seen=seen):
            seen["x"] = args[0]  # returns None: the block's inputs are left as they are

        hook = block.register_forward_pre_hook(keep_input)
        model(tokens, routing="predictor")
        hook.remove()
        logits = block.predictor(seen["x"]).flatten()  # (B*T,): one output
        block.predictor.fc2.bias -= torch.quantile(logits, 1 - block.capacity)


def _quartiles(xs: list[float]) -> list[float]:
    if len(xs) < 2:
        return [xs[0]] * 3
    q = statistics.quantiles(xs, n=4)
    return [q[0], statistics.median(xs), q[2]]


def steppers(models, device, modes: list[str]) -> dict:
    """Per variant: (model name, step(cache, tokens, pos) -> logits)."""
    if device is None or device.type != "xla":
        return {n: (n, _eager(m)) for n, m in models.items()}
    from modxla.xla.decode import Decoder

    out = {}
    for mode in modes:  # replayed: traced once, cond; traced: every token, where (as before)
        replay = mode == "replayed"
        for n, m in models.items():
            dec = Decoder(m, "predictor", skip="cond" if replay else "where", replay=replay)
            out[n if replay else f"{n}_traced"] = (n, dec)
    return out


def _eager(model):
    return lambda cache, tok, pos: decode_step(model, cache, tok, pos, "predictor")


def bench(
    models, batch: int, seq_len: int, reps: int, device, desc: str, modes=(), interleave="sequence"
) -> dict:
    """Interleaved decoding of `reps` sequences; per-variant ms/token and cache bytes."""
    steps = steppers(models, device, list(modes))
    gen = torch.Generator().manual_seed(1)
    per_rep = {name: [] for name in steps}
    caches = {}
    routed = [i for i, b in enumerate(models["mod"].blocks) if isinstance(b, MoDBlock)]
    routed_count = []  # per timed repetition: slots filled per routed block (mean over rows)
    for rep in tqdm(range(reps + 1), desc=desc, file=sys.stderr):  # rep 0 warms up/compiles
        vocab = models["baseline"].cfg.vocab_size
        tokens = torch.randint(0, vocab, (batch, seq_len), generator=gen)
        caches = {
            v: KVCache.empty(models[n], batch, seq_len, device, seq_len=seq_len)
            for v, (n, _) in steps.items()
        }
        total = dict.fromkeys(steps, 0.0)
        inputs = [  # host-made: device data, not a traced op
            (tokens[:, t].to(device), torch.full((batch,), t).to(device))
            for t in range(seq_len if rep else 3)
        ]
        names = list(steps)
        if interleave == "token":  # token by token: baseline, MoD, baseline, ...
            order = [(v, t) for t in range(len(inputs)) for v in names]
        else:  # sequence by sequence, who goes first alternating between repetitions
            names = names[rep % len(names) :] + names[: rep % len(names)]
            order = [(v, t) for v in names for t in range(len(inputs))]
        for v, t in order:
            t0 = time.perf_counter()
            logits = steps[v][1](caches[v], *inputs[t])
            logits.cpu()  # sampling needs the logits on the host
            total[v] += time.perf_counter() - t0
        if rep:
            for v in steps:
                per_rep[v].append(1e3 * total[v] / seq_len)
            routed_count.append([caches["mod"].count[i].float().mean().item() for i in routed])
    out = {}
    for name, times in per_rep.items():
        q1, med, q3 = _quartiles(times)
        out[name] = {"ms": med, "quartiles": [round(q1, 3), round(med, 3), round(q3, 3)]}
    mod, base = caches["mod"], caches["baseline"]
    dense = [i for i in range(len(base.k)) if i not in routed]
    out["kv_bytes_baseline"] = base.nbytes()
    out["kv_bytes_mod"] = mod.nbytes()
    out["routed_block_kv_over_dense"] = round(mod.nbytes(routed[0]) / base.nbytes(dense[0]), 4)
    # the share of tokens each routed block took, over every timed sequence
    out["routed_frac"] = [
        round(statistics.mean(c) / seq_len, 4) for c in zip(*routed_count, strict=True)
    ]
    if "mod_traced" in out:  # the same decoding traced at every token, interleaved
        bt, mt = out.pop("baseline_traced"), out.pop("mod_traced")
        out["traced_every_token"] = {
            "decode_ms_baseline": round(bt["ms"], 3),
            "decode_ms_mod": round(mt["ms"], 3),
            "quartiles_ms_baseline": bt["quartiles"],
            "quartiles_ms_mod": mt["quartiles"],
            "speedup": round(bt["ms"] / mt["ms"], 3),
            "replay_speedup_baseline": round(bt["ms"] / out["baseline"]["ms"], 3),
            "replay_speedup_mod": round(mt["ms"] / out["mod"]["ms"], 3),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--baseline", default="configs/baseline.yaml")
    ap.add_argument("--mod", default="configs/mod_c12_every2.yaml")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    ap.add_argument(
        "--backends",
        default="eager,xla",
        help="eager (CPU PyTorch), xla and/or cuda (eager on a GPU)",
    )
    ap.add_argument(
        "--xla-modes",
        default="replayed,traced",
        help="xla: replayed (traced once, routed blocks in conditionals: what\n"
        "modxla-generate runs) and/or traced (traced every token, every row computed)",
    )
    ap.add_argument("--reps", type=int, default=3, help="timed sequences per (backend, batch)")
    ap.add_argument(
        "--interleave",
        choices=("sequence", "token"),
        default="sequence",
        help="take turns a whole sequence at a time (as a sampler decodes) or token by\n"
        "token (each step after the other model's: both with caches the other evicted)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; decode matmuls are too small to gain from more, and on a\n"
        "shared machine extra threads only add spin-wait noise (0 = torch's default)",
    )
    ap.add_argument("overrides", nargs="*", help="applied to both configs")
    args = ap.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
        backends = args.backends.split(",")
        modes = args.xla_modes.split(",")
        if "replayed" not in modes or not set(modes) <= {"replayed", "traced"}:
            raise ValueError("--xla-modes: replayed[,traced]")
        if (
            any(b < 1 for b in batches)
            or not set(backends) <= {"eager", "xla", "cuda"}
            or args.reps < 1
        ):
            raise ValueError("batches must be >= 1, backends eager|xla|cuda, reps >= 1")
        if "cuda" in backends and not torch.cuda.is_available():
            raise ValueError("backend cuda: no CUDA device is available")
        cfgs = {
            "baseline": load_config(args.baseline, args.overrides),
            "mod": load_config(args.mod, args.overrides),
        }
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not cfgs["mod"].model.routed_layers or not cfgs["mod"].model.mod.predictor:
        print("error: --mod needs routed blocks with predictors", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    seq_len = cfgs["mod"].data.seq_len  # the trained length, which sets the routed blocks' k
    models = {n: build_model(c.model, seed=0).eval() for n, c in cfgs.items()}
    calibrate_predictors(models["mod"], seq_len)
    m = cfgs["baseline"].model
    flops = {n: decode_flops(c.model, seq_len) for n, c in cfgs.items()}
    result = {
        "size": f"{m.num_layers} layers x d{m.d_model}, S{seq_len}, V{m.vocab_size}",
        "mod": f"capacity {cfgs['mod'].model.mod.capacity}, every {cfgs['mod'].model.mod.every}",
        "threads": torch.get_num_threads(),
        "reps": args.reps,
        "interleave": args.interleave,
        "decode_flops_per_token": {n: round(v) for n, v in flops.items()},
        "flop_ratio": round(flops["baseline"] / flops["mod"], 3),
        "results": {},
    }
    for backend in backends:
        device, run_models = None, models
        if backend != "eager":
            if backend == "xla":
                import torch_xla

                device = torch_xla.device()
            else:
                device = torch.device("cuda")
                result["cuda_device"] = torch.cuda.get_device_name()
            run_models = {n: build_model(c.model, seed=0).eval() for n, c in cfgs.items()}
            for n in run_models:
                run_models[n].load_state_dict(models[n].state_dict())
                run_models[n].to(device)
        for batch in batches:
            desc = f"{backend} B{batch}"
            r = bench(run_models, batch, seq_len, args.reps, device, desc, modes, args.interleave)
            base, mod = r.pop("baseline"), r.pop("mod")
            result["results"][f"{backend}/B{batch}"] = {
                "decode_ms_baseline": round(base["ms"], 3),
                "decode_ms_mod": round(mod["ms"], 3),
                "speedup": round(base["ms"] / mod["ms"], 3),
                "share_of_flop_ratio": round(base["ms"] / mod["ms"] / result["flop_ratio"], 3),
                # the FLOP ratio had each routed block taken the share it took, not k/S
                "flop_ratio_at_routed_frac": round(
                    flops["baseline"] / decode_flops(cfgs["mod"].model, seq_len, r["routed_frac"]),
                    3,
                ),
                "quartiles_ms_baseline": base["quartiles"],
                "quartiles_ms_mod": mod["quartiles"],
                **r,
            }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
