"""Where the compiled step's execution time goes on XLA: time per HLO op, baseline vs MoD.

    pip install xprof six      # reads the profiler's trace (not a modxla dependency)
    PJRT_DEVICE=CPU CPU_NUM_DEVICES=1 python tools/profile_ops.py [--top 25] [key=value ...]

Runs the replayed training step (as the trainer does) of the dense baseline and of MoD,
captures a torch_xla profiler trace of a few steps of each, and sums the time of every
executed HLO op per step. Each op is named by the shape it produces and the PyTorch op and
source line behind it (from the optimized HLO, dumped with XLA_HLO_DEBUG metadata). Prints
JSON: each variant's total, and the ops by how much more time MoD spends on them than the
baseline (ms/step; MoD-only work first, the dense work MoD saves last).
Ops are the leaf events of XLA:CPU's thunk executor; waits between them are not counted.
"""

from __future__ import annotations

import os
import sys
import tempfile

DUMP = tempfile.mkdtemp(prefix="modxla_hlo_")
if "torch_xla" not in sys.modules:  # both must be set before XLA starts
    os.environ["XLA_HLO_DEBUG"] = "1"
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={DUMP} --xla_dump_hlo_as_text "
        "--xla_dump_hlo_pass_re=NONE"
    ).strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from modxla.config import load_config  # noqa: E402
from modxla.errors import UserError, report  # noqa: E402
from modxla.model import build_model  # noqa: E402
from modxla.train.optim import build_optimizer, step_state  # noqa: E402
from modxla.train.step import train_step  # noqa: E402
from modxla.xla.runtime import setup_runtime  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--baseline", default="configs/baseline.yaml")
    ap.add_argument("--mod", default="configs/mod_c12_every2.yaml")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps per variant")
    ap.add_argument("--top", type=int, default=25, help="ops listed")
    ap.add_argument("overrides", nargs="*", help="applied to both configs")
    args = ap.parse_intermixed_args(argv)
    if args.steps < 1 or args.top < 1:
        ap.error("--steps and --top must be >= 1")
    try:
        return profile(args)
    except UserError as e:
        return report(e)


def profile(args) -> int:
    cfgs = {
        n: load_config(path, ["train.compile_cache=", *args.overrides])
        for n, path in (("baseline", args.baseline), ("mod", args.mod))
    }
    try:
        import xprof.convert.raw_to_tool_data  # noqa: F401
    except ImportError as e:
        raise UserError(f"profile_ops reads traces with xprof: pip install xprof six ({e})") from e
    rt = setup_runtime(cfgs["baseline"])
    if not rt.xla:
        raise UserError("profile_ops profiles XLA: set PJRT_DEVICE (e.g. CPU)")
    with _stdout_to_stderr():
        result = _profile_variants(cfgs, rt, args.steps)
    return _print(result, args.top)


def _profile_variants(cfgs: dict, rt, steps: int) -> dict:
    import torch_xla.core.xla_model as xm
    import torch_xla.debug.profiler as xp
    from xprof.convert import raw_to_tool_data

    port = 9012
    server = xp.start_server(port)  # noqa: F841 (serves until the process ends)
    result = {}
    for name, cfg in cfgs.items():
        model = build_model(cfg.model, seed=0).to(rt.device)
        rt.shard_model(model)
        opt = build_optimizer(model, cfg.optimizer)
        step = rt.compile(train_step, f"step_{name}", state=lambda m=model, o=opt: step_state(m, o))

        def run(n, cfg=cfg, model=model, opt=opt, step=step):
            for _ in range(n):
                shape = (1, cfg.train.batch_size, cfg.data.seq_len + 1)
                batch = torch.randint(0, cfg.model.vocab_size, shape).to(rt.device)
                step(model, opt, batch, cfg.optimizer.grad_clip, cfg.train.dtype)
                xm.wait_device_ops()

        run(4)  # compile, capture, check, one replay
        logdir = tempfile.mkdtemp(prefix=f"modxla_prof_{name}_")
        t0 = time.perf_counter()
        run(1)
        duration = int((time.perf_counter() - t0) * 1000 * (steps + 2)) + 1000
        tracer = threading.Thread(target=xp.trace, args=(f"localhost:{port}", logdir, duration))
        tracer.start()
        time.sleep(0.5)
        run(steps)
        tracer.join()
        ops, module = _ops(raw_to_tool_data, logdir)
        result[name] = {"ops": {k: v / steps for k, v in ops.items()}, "module": module}
    return result


@contextlib.contextmanager
def _stdout_to_stderr():
    """The profiler prints to file descriptor 1 (from C++ too); stdout is for the JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _ops(raw_to_tool_data, logdir: str) -> tuple[collections.Counter, str]:
    """ms per HLO op (summed over the trace) of the most frequent module, and its name."""
    (path,) = glob.glob(f"{logdir}/plugins/profile/*/*.xplane.pb")
    data, _ = raw_to_tool_data.xspace_to_tool_data([path], "trace_viewer", {})
    events = [
        e
        for e in json.loads(data)["traceEvents"]
        if e.get("ph") == "X" and "hlo_op" in e.get("args", {})
    ]
    module = collections.Counter(e["args"]["hlo_module"] for e in events).most_common(1)[0][0]
    ops = collections.Counter()
    for e in events:
        op = e["args"]["hlo_op"]
        if e["args"]["hlo_module"] == module and not op.startswith("call."):  # call wraps one op
            ops[op.removesuffix(".clone")] += e["dur"] / 1000
    return ops, module


def _describe(module: str) -> dict[str, str]:
    """HLO op name -> 'shape op_type source:line' from the optimized HLO dump."""
    (path,) = glob.glob(f"{DUMP}/*.{module}.cpu_after_optimizations.txt") or [None]
    out = {}
    if path is None:
        return out
    for line in open(path):
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+?)(?:\.clone)? = (\S+) ", line)
        if not m:
            continue
        op_type = re.search(r'op_type="([^"]*)"', line)
        src = re.search(r'source_file="([^"]*)" source_line=(\d+)', line)
        where = f" {os.path.basename(src.group(1))}:{src.group(2)}" if src else ""
        out[m.group(1)] = f"{m.group(2).split('{')[0]} {op_type.group(1) if op_type else ''}{where}"
    return out


def _print(result: dict, top: int) -> int:
    by_kind = {}
    for name, r in result.items():
        names = _describe(r["module"])
        kinds = collections.Counter()
        for op, ms in r["ops"].items():  # fusions of one kind and shape, summed
            kinds[f"{re.sub(r'[.][0-9]+$', '', op)}: {names.get(op, '?')}"] += ms
        by_kind[name] = kinds
    keys = set(by_kind["baseline"]) | set(by_kind["mod"])
    rows = sorted(keys, key=lambda k: by_kind["baseline"][k] - by_kind["mod"][k])  # MoD extra 1st
    out = {
        "ms_per_step": {n: round(sum(r["ops"].values()), 1) for n, r in result.items()},
        "ops": [
            {"op": k, **{n: round(by_kind[n][k], 2) for n in ("baseline", "mod")}}
            for k in rows[:top]
        ],
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
