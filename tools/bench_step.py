"""Step time of dense, MoE, MoD and both MoDE variants at one size, interleaved; prints JSON.

    PJRT_DEVICE=CPU CPU_NUM_DEVICES=1 python tools/bench_step.py [--steps 24] [key=value ...]
    python tools/bench_step.py --variants dense,moe,mod,staged,integrated train.batch_size=8
    python tools/bench_step.py train.device=cpu      # the eager PyTorch path, same models

--variants (default dense,mod) picks from:

    dense       --baseline (configs/baseline.yaml): the size every variant shares
    moe         --moe (configs/moe.yaml): Switch top-1 MoE MLPs
    mod         --mod (configs/mod_c12_every2.yaml): MoD routing
    staged      --staged (configs/mode_staged.yaml): MoD routing around MoE blocks
    integrated  --integrated (configs/mode_integrated.yaml): MoE with no-op experts

The size (model dimensions, data, train, optimizer) is the dense config's; another variant
takes only its routing from its config, the `model.mod` and `model.moe` sections, so the tiny
MoE configs run at the benchmark size. The overrides apply to every variant, after that.

All models live in one process on the same devices; each step runs every variant once, the
order rotating from step to step, and each variant's median speedup over dense is compared
with its analytic FLOP ratio (modxla.analysis.flops.flops_per_step). Batches are random
tokens, so the figure is the model's compute alone (modxla-bench-data measures the input
pipeline). Quartiles are reported beside the medians, and process CPU time per step too: on
a machine shared with other work, CPU time is disturbed less than wall time.

On XLA the step runs as the trainer runs it: traced once, then replayed (modxla/replay.py),
so no per-step Python trace is timed; `--no-replay` traces every step again, as lazy-tensor
code does by default (tools/profile_step.py splits that trace from the execution).
tools/profile_ops.py shows where the execution's time goes, op by op.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
from tqdm import tqdm

from modxla.analysis.flops import flops_per_step
from modxla.config import from_dict, read_config_file
from modxla.errors import UserError, report
from modxla.model import build_model
from modxla.train.optim import build_optimizer, step_state
from modxla.train.step import train_step
from modxla.xla.runtime import compile_count, setup_runtime

# variant -> (option naming its config, default config)
VARIANTS = {
    "dense": ("baseline", "configs/baseline.yaml"),
    "moe": ("moe", "configs/moe.yaml"),
    "mod": ("mod", "configs/mod_c12_every2.yaml"),
    "staged": ("staged", "configs/mode_staged.yaml"),
    "integrated": ("integrated", "configs/mode_integrated.yaml"),
}
ROUTING = ("mod", "moe")  # the model sections a variant takes from its own config


def _quartiles(xs: list[float]) -> list[float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return [round(q[0], 4), round(statistics.median(xs), 4), round(q[2], 4)]


def variant_configs(args) -> dict:
    """Each variant's config: the dense one with the variant's routing sections."""
    dense = read_config_file(getattr(args, VARIANTS["dense"][0]))
    over = ["train.compile_cache=", *args.overrides]
    cfgs = {}
    for name in args.variants:
        raw = copy.deepcopy(dense)
        if name != "dense":
            own = read_config_file(getattr(args, VARIANTS[name][0])).get("model") or {}
            model = raw.setdefault("model", {})
            for section in ROUTING:
                model.pop(section, None)
                if section in own:
                    model[section] = own[section]
        cfgs[name] = from_dict(raw, over)
    return cfgs


def _variant_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or "dense" not in names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"{text!r}: a comma list of distinct names from {', '.join(VARIANTS)}, with dense"
        )
    return ["dense", *(n for n in names if n != "dense")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--variants",
        type=_variant_list,
        default=["dense", "mod"],
        help="comma list (default dense,mod); dense is the reference",
    )
    for name, (option, default) in VARIANTS.items():
        ap.add_argument(f"--{option}", default=default, help=f"the {name} config")
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
    ap.add_argument("overrides", nargs="*", help="applied to every variant's config")
    args = ap.parse_intermixed_args(argv)  # options may follow the overrides
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    try:
        return bench(args)
    except UserError as e:
        return report(e)


def bench(args) -> int:
    cfgs = variant_configs(args)
    rt = setup_runtime(cfgs["dense"])
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
    order = list(variants.values())
    for i in tqdm(range(args.steps), desc="steps", file=sys.stderr):
        for v in order[i % len(order) :] + order[: i % len(order)]:  # rotate: no fixed slot
            wall, cpu = one_step(v)
            v["times"].append(wall)
            v["cpu"].append(cpu)

    dense = variants["dense"]
    dense_flops = flops_per_step(dense["cfg"])
    dense_wall, dense_cpu = statistics.median(dense["times"]), statistics.median(dense["cpu"])
    table = {}
    for name, v in variants.items():
        wall, cpu = statistics.median(v["times"]), statistics.median(v["cpu"])
        flops = flops_per_step(v["cfg"])
        ratio = dense_flops / flops
        table[name] = {
            "step_s": round(wall, 4),
            "quartiles_s": _quartiles(v["times"]),
            "flops_per_step": flops,
            "flop_ratio": round(ratio, 3),
            "speedup": round(dense_wall / wall, 3),
            "speedup_over_flop_ratio": round(dense_wall / wall / ratio, 3),
            "cpu_step_s": round(cpu, 4),
            "cpu_quartiles_s": _quartiles(v["cpu"]),
            "cpu_speedup_over_flop_ratio": round(dense_cpu / cpu / ratio, 3),
            "compile_s": round(v["compile_s"], 1),
            "compiles": v["compiles"],
        }
    c = cfgs["dense"]
    m = c.model
    device = f"{xm.xla_device_hw(rt.device)} x{rt.num_devices}" if rt.xla else str(rt.device)
    if rt.device.type == "cuda":
        device = torch.cuda.get_device_name(rt.device)
    result = {
        "device": device,
        "backend": ("xla" if args.replay else "xla, traced every step")
        if rt.xla
        else ("eager+torch.compile" if args.compile else "eager"),
        "threads": torch.get_num_threads(),
        "size": f"{m.num_layers} layers x d{m.d_model}, T{c.data.seq_len}, "
        f"B{c.train.batch_size}, V{m.vocab_size}",
        "steps": args.steps,
        "configs": {n: getattr(args, VARIANTS[n][0]) for n in variants},
        "variants": table,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
