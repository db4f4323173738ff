"""Compile time and memory of the train step vs depth: unrolled vs scan, remat on/off; JSON.

    PJRT_DEVICE=CPU python tools/bench_scale.py [--layers 4 8 16 32] [--repeats 1] [key=value ...]

Every (layers, layout, remat) runs in a fresh subprocess on one XLA device (clean compile
caches), in interleaved rounds. compile_s is the wall time of the first two steps (AdamW's
state makes the second step a second graph). peak_bytes is XLA's buffer assignment of the
steady-state step (parameters, optimizer state, outputs and temp buffers: the compiled
step's memory analysis); activation_bytes is peak minus parameters, gradients and optimizer
state; xla_compile_s is XLA's own compile time within those steps (torch_xla's CompileTime
metric, without tracing and execution). step_s compares scan with unrolled at --step-layers,
the two models interleaved step by step in one process: wall seconds and process CPU seconds
(all XLA threads; steadier than wall time on a shared machine). Tables are keyed
"<layers>/<scan|unrolled>/<remat>"; medians over the repeats, with quartiles when there are
several. Without --layers only the configurations the issue's goals need are run, and
"goals" gives each goal's ratio, its limit and whether it holds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

BASE = [  # the measurement: MoD 12.5% every 2nd block, d256, T256, B8
    "model.vocab_size=4096",
    "model.d_model=256",
    "model.num_heads=4",
    "model.max_seq_len=256",
    "model.mod.capacity=0.125",
    "model.mod.every=2",
    "model.mod.aux_loss_weight=0.01",
    "data.seq_len=256",
    "train.batch_size=8",
    "train.compile_cache=",
    "mesh.data=1",
]


def _setup(overrides: list[str]):
    import torch
    import torch_xla

    from modxla.config import load_config
    from modxla.model import build_model
    from modxla.train.optim import build_optimizer
    from modxla.train.step import train_step
    from modxla.xla.runtime import setup_runtime

    cfg = load_config(None, [*BASE, *overrides])
    rt = setup_runtime(cfg)
    model = build_model(cfg.model, seed=0).to(rt.device)
    model.remat = cfg.train.remat
    opt = build_optimizer(model, cfg.optimizer)
    step = torch_xla.compile(train_step, full_graph=True, name="train_step")
    shape = (1, cfg.train.batch_size, cfg.data.seq_len + 1)
    batch = torch.randint(0, cfg.model.vocab_size, shape)

    def one() -> tuple[float, float]:
        """(wall s, process CPU s) of one step."""
        import torch_xla.core.xla_model as xm

        b = batch.to(rt.device)
        xm.wait_device_ops()
        t0, c0 = time.perf_counter(), time.process_time()
        step(model, opt, b, cfg.optimizer.grad_clip, cfg.train.dtype)
        torch_xla.sync()
        xm.wait_device_ops()
        return time.perf_counter() - t0, time.process_time() - c0

    return cfg, model, one


def worker(overrides: list[str], dump_dir: str) -> dict:
    """One configuration: compile time of steps 1-2 and the step's compiled memory."""
    from modxla.train.optim import MOMENT_DTYPES
    from modxla.xla.memory import compiled_memory, reports

    cfg, model, one = _setup(overrides)
    t1 = one()[0]
    before = reports(dump_dir)
    t2 = one()[0]
    mem = compiled_memory(dump_dir, before)
    n = sum(p.numel() for p in model.parameters())
    state = n * 4 * 2 + n * 2 * MOMENT_DTYPES[cfg.optimizer.moment_dtype].itemsize
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")  # (count, total ns, samples): XLA's compiles alone
    return {
        "compile_s": t1 + t2,
        "xla_compile_s": data[1] / 1e9 if data else 0.0,
        "peak_bytes": mem["total"],
        "activation_bytes": mem["total"] - state,
    }


def step_worker(overrides: list[str], steps: int) -> dict:
    """Unrolled and scan models in one process, their steps interleaved: seconds per step."""
    runs = {
        name: _setup([*overrides, f"model.scan={name == 'scan'}"])[2]
        for name in ("unrolled", "scan")
    }
    for one in runs.values():
        one(), one()  # compile both graphs
    times = {f"{name}/{kind}": [] for name in runs for kind in ("wall", "cpu")}
    for _ in range(steps):
        for name, one in runs.items():
            wall, cpu = one()
            times[f"{name}/wall"].append(wall)
            times[f"{name}/cpu"].append(cpu)
    return times


def _summary(values: list[float]) -> float | dict:
    if len(values) == 1:
        return values[0]
    q = statistics.quantiles(values, n=4) if len(values) > 2 else [min(values), 0, max(values)]
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2]}


def _spawn(args: list[str], env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise SystemExit(f"bench_scale worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# The goals: (what, limit). Each ratio must be at most its limit.
GOALS = {
    "scan_compile_32_over_4": 1.5,  # compile_s 32/scan/none over 4/scan/none
    "remat_activation_16/scan": 1 / 3,  # activation_bytes 16/scan/block over 16/scan/none
    "remat_activation_16/unrolled": 1 / 3,
    "scan_step_over_unrolled_8": 1.1,  # step_s at 8 layers, interleaved in one process
}
# What the goals need (the default run): (layers, layout, remat).
GOAL_KEYS = [
    (4, "scan", "none"),
    (32, "scan", "none"),
    (16, "scan", "none"),
    (16, "scan", "block"),
    (16, "unrolled", "none"),
    (16, "unrolled", "block"),
]


def _median(v) -> float:
    return v["median"] if isinstance(v, dict) else v


def goals(report: dict, step_layers: int) -> dict:
    """Each goal whose inputs were measured: its ratio, limit and whether it holds."""
    comp, act, out = report["compile_s"], report["activation_bytes"], {}

    def put(name: str, num, den, **extra) -> None:
        if num is not None and den is not None:
            ratio = _median(num) / _median(den)
            limit = GOALS[name]
            out[name] = {"ratio": ratio, "limit": round(limit, 4), "holds": ratio <= limit, **extra}

    put("scan_compile_32_over_4", comp.get("32/scan/none"), comp.get("4/scan/none"))
    for lay in ("scan", "unrolled"):
        put(f"remat_activation_16/{lay}", act.get(f"16/{lay}/block"), act.get(f"16/{lay}/none"))
    steps = report.get("step_s", {})
    if step_layers == 8 and "8/scan/none" in steps:
        s, u = steps["8/scan/none"], steps["8/unrolled/none"]
        cpu = _median(s["cpu"]) / _median(u["cpu"])
        put("scan_step_over_unrolled_8", s["wall"], u["wall"], cpu_ratio=cpu)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--layers",
        type=int,
        nargs="+",
        help="depths of the full grid (x --layouts x --remat); default: only the configurations "
        "the goals need (4, 32 scan; 16 scan and unrolled, remat none and block)",
    )
    ap.add_argument("--remat", nargs="+", default=["none", "block"], choices=["none", "block"])
    ap.add_argument(
        "--layouts", nargs="+", default=["unrolled", "scan"], choices=["unrolled", "scan"]
    )
    ap.add_argument("--repeats", type=int, default=1, help="rounds over all configurations")
    ap.add_argument("--step-layers", type=int, default=8, help="depth of the step-time check")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per layout (0 = skip)")
    ap.add_argument("--worker", choices=["compile", "step"], help=argparse.SUPPRESS)
    ap.add_argument("--dump-dir", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.steps < 0 or args.step_layers < 1:
        ap.error("--repeats and --step-layers must be >= 1, --steps >= 0")
    if args.worker == "compile":
        print(json.dumps(worker(args.overrides, args.dump_dir)))
        return 0
    if args.worker == "step":
        print(json.dumps(step_worker(args.overrides, args.steps)))
        return 0
    from tqdm import tqdm

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "1"}
    env["PYTHONPATH"] = os.pathsep.join([repo, env.get("PYTHONPATH", "")])
    if args.layers is None:
        keys = GOAL_KEYS
    else:
        keys = [(n, lay, r) for n in args.layers for lay in args.layouts for r in args.remat]
    results = {k: [] for k in keys}
    total = len(keys) * args.repeats + (1 if args.steps else 0)
    with tqdm(total=total, desc="configs", file=sys.stderr) as bar:
        for _ in range(args.repeats):
            for n, lay, r in keys:
                with tempfile.TemporaryDirectory() as dump:
                    flags = f"{env.get('XLA_FLAGS', '')} --xla_dump_to={dump}"
                    run_env = {**env, "XLA_FLAGS": f"{flags} --xla_dump_hlo_as_text"}
                    over = [f"model.num_layers={n}", f"model.scan={lay == 'scan'}"]
                    over.append(f"train.remat={r}")
                    cmd = ["--worker", "compile", "--dump-dir", dump, *over, *args.overrides]
                    results[(n, lay, r)].append(_spawn(cmd, run_env))
                bar.write(f"{n}/{lay}/{r}: {json.dumps(results[(n, lay, r)][-1])}", sys.stderr)
                bar.update()
        report = {"config": BASE + args.overrides, "note": "XLA:CPU, 1 device"}
        for metric in ("compile_s", "xla_compile_s", "peak_bytes", "activation_bytes"):
            report[metric] = {
                f"{n}/{lay}/{r}": _summary([x[metric] for x in results[(n, lay, r)]])
                for n, lay, r in keys
            }
        if args.steps:
            over = [f"model.num_layers={args.step_layers}", *args.overrides]
            times = _spawn(["--worker", "step", "--steps", str(args.steps), *over], env)
            report["step_s"] = {
                f"{args.step_layers}/{lay}/none": {
                    kind: _summary(times[f"{lay}/{kind}"]) for kind in ("wall", "cpu")
                }
                for lay in ("unrolled", "scan")
            }
            bar.update()
    report["goals"] = goals(report, args.step_layers)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
