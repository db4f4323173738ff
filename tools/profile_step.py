"""Where a training step's time goes on XLA: Python tracing per phase vs compiled execution.

    PJRT_DEVICE=CPU CPU_NUM_DEVICES=1 python tools/profile_step.py [--steps 6] [key=value ...]

On XLA (lazy tensors) every step is traced again in Python before the cached executable runs,
so a step costs trace + execution; the trainer avoids that by replaying the step
(modxla/replay.py), and this tool measures what the replay saves. This runs the dense
baseline, MoD, and MoD without its joint predictor, interleaved, the phases of
modxla.train.step.train_step one by one, and prints JSON with medians in ms: CPU time of tracing
the forward (incl. losses and block stats), backward, grad clipping and AdamW, then the CPU
and wall time of executing the graph. CPU time is reported because a shared machine
disturbs it less than wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from tqdm import tqdm

from modxla.config import load_config
from modxla.errors import UserError, report
from modxla.model import build_model, lm_loss
from modxla.train.optim import build_optimizer
from modxla.xla.runtime import setup_runtime

PHASES = ("trace_fwd", "trace_bwd", "trace_clip", "trace_opt", "exec_cpu", "exec_wall")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--baseline", default="configs/baseline.yaml")
    ap.add_argument("--mod", default="configs/mod_c12_every2.yaml")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    ap.add_argument("overrides", nargs="*", help="applied to every variant")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    try:
        return profile(args)
    except UserError as e:
        return report(e)


def profile(args) -> int:
    base = ["train.compile_cache=", *args.overrides]
    cfgs = {
        "baseline": load_config(args.baseline, base),
        "mod": load_config(args.mod, base),
        "mod_no_predictor": load_config(args.mod, [*base, "model.mod.predictor=false"]),
    }
    rt = setup_runtime(cfgs["baseline"])
    if not rt.xla:
        raise UserError("profile_step measures XLA tracing: set PJRT_DEVICE (e.g. CPU)")
    import torch_xla
    import torch_xla.core.xla_model as xm

    from modxla.parallel import shard_model

    variants = {}
    for name, cfg in cfgs.items():
        model = build_model(cfg.model, seed=0).to(rt.device)
        shard_model(model, rt.mesh)
        opt = build_optimizer(model, cfg.optimizer)
        variants[name] = {"cfg": cfg, "model": model, "opt": opt, "t": {p: [] for p in PHASES}}

    def one_step(v) -> dict[str, float]:
        cfg, model, opt = v["cfg"], v["model"], v["opt"]
        shape = (cfg.train.batch_size, cfg.data.seq_len + 1)
        batch = torch.randint(0, cfg.model.vocab_size, shape).to(rt.device)
        torch_xla.sync()
        xm.wait_device_ops()
        c = [time.process_time()]
        out = model(batch[:, :-1])
        loss = lm_loss(out.logits, batch[:, 1:]) + out.aux_loss
        stats = [s.detach().float() for s in out.block_stats.values()]  # as train_step logs
        c.append(time.process_time())
        loss.backward()
        c.append(time.process_time())
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.grad_clip)
        c.append(time.process_time())
        opt.step()
        opt.zero_grad(set_to_none=True)
        c.append(time.process_time())
        w0 = time.perf_counter()
        torch_xla.sync()  # the same graph every step: runs the cached executable
        xm.wait_device_ops()
        c.append(time.process_time())
        del stats, norm
        spans = [b - a for a, b in zip(c, c[1:], strict=False)]
        return dict(zip(PHASES, [*spans, time.perf_counter() - w0], strict=True))

    for v in variants.values():  # compile (AdamW state appears at the first step)
        one_step(v)
        one_step(v)
    for _ in tqdm(range(args.steps), desc="steps", file=sys.stderr):
        for v in variants.values():
            for p, s in one_step(v).items():
                v["t"][p].append(s)
    result = {}
    for name, v in variants.items():
        med = {p: round(statistics.median(xs) * 1000, 1) for p, xs in v["t"].items()}
        med["trace_total"] = round(sum(med[p] for p in PHASES[:4]), 1)
        med["step_cpu"] = round(med["trace_total"] + med["exec_cpu"], 1)
        result[name] = med
    m = cfgs["baseline"]
    result["size"] = (
        f"{m.model.num_layers} layers x d{m.model.d_model}, T{m.data.seq_len}, "
        f"B{m.train.batch_size}, V{m.model.vocab_size}"
    )
    result["steps"] = args.steps
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
