"""Step time of the dense baseline vs MoD at the same size, interleaved; prints JSON.

    PJRT_DEVICE=CPU CPU_NUM_DEVICES=1 python tools/bench_step.py [--steps 24] [key=value ...]
    python tools/bench_step.py train.device=cpu      # the eager PyTorch path, same models

Both models live in one process on the same devices; steps alternate baseline, MoD, ...
and the medians are compared with the analytic FLOP ratio. Batches are random tokens, so
the figure is the model's compute alone (modxla-bench-data measures the input pipeline).
Each variant's quartiles are reported beside its median, and its process CPU time per step
too: on a machine shared with other work, CPU time is disturbed less than wall time.

On XLA the step runs as the trainer runs it: traced once, then replayed (modxla/replay.py),
so no per-step Python trace is timed; `--no-replay` traces every step again, as lazy-tensor
code does by default (tools/profile_step.py splits that trace from the execution).
tools/profile_ops.py shows where the execution's time goes, op by op.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from tqdm import tqdm

from modxla.analysis.flops import flops_per_step
from modxla.config import load_config
from modxla.errors import UserError, report
from modxla.model import build_model
from modxla.train.optim import build_optimizer, step_state
from modxla.train.step import train_step
from modxla.xla.runtime import compile_count, setup_runtime


def _quartiles(xs: list[float]) -> list[float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return [round(q[0], 4), round(statistics.median(xs), 4), round(q[2], 4)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--baseline", default="configs/baseline.yaml")
    ap.add_argument("--mod", default="configs/mod_c12_every2.yaml")
    ap.add_argument("--steps", type=int, default=24, help="timed steps per variant")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="eager devices (cpu, cuda): run each model's forward and backward through\n"
        "torch.compile (TorchInductor), which removes per-op launch overhead",
    )
    ap.add_argument(
        "--no-replay",
        dest="replay",
        action="store_false",
        help="XLA: trace every step again in Python, as before modxla/replay.py",
    )
    ap.add_argument("overrides", nargs="*", help="applied to both configs")
    args = ap.parse_intermixed_args(argv)  # options may follow the overrides
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    try:
        return bench(args)
    except UserError as e:
        return report(e)


def bench(args) -> int:
    cfgs = {
        "baseline": load_config(args.baseline, ["train.compile_cache=", *args.overrides]),
        "mod": load_config(args.mod, ["train.compile_cache=", *args.overrides]),
    }
    rt = setup_runtime(cfgs["baseline"])
    if args.compile and rt.xla:
        raise UserError("--compile is for eager devices (train.device=cpu|cuda); XLA compiles")
    if rt.xla:
        import torch_xla
        import torch_xla.core.xla_model as xm

        from modxla.parallel import shard_model

    def sync() -> None:
        if rt.xla:
            torch_xla.sync()
            xm.wait_device_ops()

    variants = {}
    for name, cfg in cfgs.items():
        model = build_model(cfg.model, seed=0).to(rt.device)
        if rt.xla:
            shard_model(model, rt.mesh)
        opt = build_optimizer(model, cfg.optimizer)
        state = (lambda m=model, o=opt: step_state(m, o)) if args.replay else None
        step = rt.compile(train_step, f"step_{name}", state=state)  # as the trainer does
        if args.compile and not rt.xla:
            model = torch.compile(model)  # same parameters; AdamW stays eager
        variants[name] = {"cfg": cfg, "model": model, "opt": opt, "step": step}
        variants[name] |= {"times": [], "cpu": []}

    def one_step(v) -> tuple[float, float]:
        cfg = v["cfg"]
        shape = (1, cfg.train.batch_size, cfg.data.seq_len + 1)
        batch = torch.randint(0, cfg.model.vocab_size, shape).to(rt.device)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        out = v["step"](v["model"], v["opt"], batch, cfg.optimizer.grad_clip, cfg.train.dtype)
        sync()
        if not rt.xla:
            out["loss"].item()  # eager: the step's work is done by now
        return time.perf_counter() - t0, time.process_time() - c0

    # Compile. The first step builds AdamW's state; on XLA the second captures the graph to
    # replay and the third checks it (modxla/replay.py).
    for v in variants.values():
        before = compile_count() if rt.xla else 0
        v["compile_s"] = sum(one_step(v)[0] for _ in range(3 if rt.xla else 2))
        v["compiles"] = (compile_count() - before) if rt.xla else 0
    for _ in tqdm(range(args.steps), desc="steps", file=sys.stderr):
        for v in variants.values():
            wall, cpu = one_step(v)
            v["times"].append(wall)
            v["cpu"].append(cpu)

    med = {n: statistics.median(v["times"]) for n, v in variants.items()}
    cpu = {n: statistics.median(v["cpu"]) for n, v in variants.items()}
    flops = {n: flops_per_step(v["cfg"]) for n, v in variants.items()}
    speedup = med["baseline"] / med["mod"]
    flop_ratio = flops["baseline"] / flops["mod"]
    m = cfgs["baseline"].model
    device = f"{xm.xla_device_hw(rt.device)} x{rt.num_devices}" if rt.xla else str(rt.device)
    if rt.device.type == "cuda":
        device = torch.cuda.get_device_name(rt.device)
    result = {
        "device": device,
        "backend": ("xla" if args.replay else "xla, traced every step")
        if rt.xla
        else ("eager+torch.compile" if args.compile else "eager"),
        "threads": torch.get_num_threads(),
        "size": f"{m.num_layers} layers x d{m.d_model}, T{cfgs['baseline'].data.seq_len}, "
        f"B{cfgs['baseline'].train.batch_size}, V{m.vocab_size}",
        "steps": args.steps,
        "baseline_step_s": round(med["baseline"], 4),
        "mod_step_s": round(med["mod"], 4),
        "quartiles_s": {n: _quartiles(v["times"]) for n, v in variants.items()},
        "speedup": round(speedup, 3),
        "flops_per_step": flops,
        "flop_ratio": round(flop_ratio, 3),
        "speedup_over_flop_ratio": round(speedup / flop_ratio, 3),
        "cpu_step_s": {n: round(c, 4) for n, c in cpu.items()},
        "cpu_quartiles_s": {n: _quartiles(v["cpu"]) for n, v in variants.items()},
        "cpu_speedup_over_flop_ratio": round(cpu["baseline"] / cpu["mod"] / flop_ratio, 3),
        "compile_s": {n: round(v["compile_s"], 1) for n, v in variants.items()},
        "compiles": {n: v["compiles"] for n, v in variants.items()},
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
