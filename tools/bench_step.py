"""Step time of the dense baseline vs MoD at the same size, interleaved; prints JSON.

    PJRT_DEVICE=CPU CPU_NUM_DEVICES=1 python tools/bench_step.py [--steps 12] [key=value ...]

Both models live in one process on the same devices; steps alternate baseline, MoD, ...
and the medians are compared with the analytic FLOP ratio. Batches are random tokens, so
the figure is the model's compute alone (tools/bench_data.py measures the input pipeline).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from modxla.config import load_config
from modxla.errors import UserError, report
from modxla.metrics import flops_per_step
from modxla.model import build_model
from modxla.optim import build_optimizer
from modxla.runtime import compile_count, setup_runtime
from modxla.step import train_step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--baseline", default="configs/baseline.yaml")
    ap.add_argument("--mod", default="configs/mod_c12_every2.yaml")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    ap.add_argument("overrides", nargs="*", help="applied to both configs")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    try:
        return bench(args)
    except UserError as e:
        return report(e)


def bench(args) -> int:
    import torch_xla
    import torch_xla.core.xla_model as xm

    from modxla.parallel import shard_model

    cfgs = {
        "baseline": load_config(args.baseline, ["train.compile_cache=", *args.overrides]),
        "mod": load_config(args.mod, ["train.compile_cache=", *args.overrides]),
    }
    rt = setup_runtime(cfgs["baseline"])
    variants = {}
    for name, cfg in cfgs.items():
        model = build_model(cfg.model, seed=0).to(rt.device)
        shard_model(model, rt.mesh)
        variants[name] = {
            "cfg": cfg,
            "model": model,
            "opt": build_optimizer(model, cfg.optimizer),
            "step": torch_xla.compile(train_step, full_graph=True, name=f"step_{name}"),
            "times": [],
        }

    def one_step(v) -> float:
        cfg = v["cfg"]
        shape = (1, cfg.train.batch_size, cfg.data.seq_len + 1)
        batch = torch.randint(0, cfg.model.vocab_size, shape).to(rt.device)
        xm.wait_device_ops()
        t0 = time.perf_counter()
        v["step"](v["model"], v["opt"], batch, cfg.optimizer.grad_clip, cfg.train.dtype)
        torch_xla.sync()
        xm.wait_device_ops()
        return time.perf_counter() - t0

    for v in variants.values():  # compile: the first step builds AdamW state, the second reuses it
        before = compile_count()
        v["compile_s"] = one_step(v) + one_step(v)
        v["compiles"] = compile_count() - before
    for _ in range(args.steps):
        for v in variants.values():
            v["times"].append(one_step(v))

    med = {n: statistics.median(v["times"]) for n, v in variants.items()}
    flops = {n: flops_per_step(v["cfg"]) for n, v in variants.items()}
    speedup = med["baseline"] / med["mod"]
    flop_ratio = flops["baseline"] / flops["mod"]
    m = cfgs["baseline"].model
    print(
        json.dumps(
            {
                "device": f"{xm.xla_device_hw(rt.device)} x{rt.num_devices}",
                "size": f"{m.num_layers} layers x d{m.d_model}, T{cfgs['baseline'].data.seq_len}, "
                f"B{cfgs['baseline'].train.batch_size}",
                "steps": args.steps,
                "baseline_step_s": round(med["baseline"], 4),
                "mod_step_s": round(med["mod"], 4),
                "speedup": round(speedup, 3),
                "flops_per_step": flops,
                "flop_ratio": round(flop_ratio, 3),
                "speedup_over_flop_ratio": round(speedup / flop_ratio, 3),
                "compile_s": {n: round(v["compile_s"], 1) for n, v in variants.items()},
                "compiles": {n: v["compiles"] for n, v in variants.items()},
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
