"""The `make demo` pipeline: train a small MoD model with XLA SPMD, checkpoint, train the
causal predictor, sample text with causal routing, and plot. Every step is a command a user
can run alone; they are printed as they run.

    python tools/demo.py [--run-dir runs/demo] [--devices 4] [key=value ...]

Run it again and the training resumes from its checkpoints (a finished run is not redone).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from modxla.config import load_config, resolve_config_path
from modxla.errors import UserError, report

ROOT = Path(__file__).resolve().parent.parent


class StepFailed(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


# XLA logs this once per compiled graph (some 40 times in a demo): shown once here.
DEPRECATION = b"GSPMD sharding propagation is going to be deprecated"
_shown = {"deprecation": False}


def _pump(pipe, out) -> None:
    """Copy a child's stderr to `out` as it comes (progress bars included), the XLA
    deprecation line once per demo."""
    buf = b""
    while chunk := pipe.read1(65536):
        *lines, buf = re.split(rb"(?<=[\r\n])", buf + chunk)
        for line in lines:
            if DEPRECATION in line:
                if _shown["deprecation"]:
                    continue
                _shown["deprecation"] = True
            out.write(line)
        out.flush()
    out.write(buf)
    out.flush()


def sh(args: list[str], devices: int) -> None:
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(devices)}
    print(f"\n$ CPU_NUM_DEVICES={devices} python {shlex.join(args)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, stderr=subprocess.PIPE)
    _pump(proc.stderr, sys.stderr.buffer)
    code = proc.wait()
    if code:
        print(f"demo: the step above failed with exit code {code}", file=sys.stderr)
        raise StepFailed(code)
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run-dir", default="runs/demo")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--devices", type=int, default=4, help="virtual XLA CPU devices")
    ap.add_argument("--predictor-steps", type=int, default=300)
    ap.add_argument("overrides", nargs="*", help="training config overrides")
    args = ap.parse_args(argv)
    if args.devices < 1 or args.predictor_steps < 1:
        ap.error("--devices and --predictor-steps must be >= 1")
    try:  # bad input is refused here, before minutes of training
        load_config(args.config, args.overrides)
    except UserError as e:
        return report(e)
    try:
        run_demo(args)
    except StepFailed as e:
        return e.code
    return 0


def run_demo(args) -> None:
    run = (
        args.run_dir if "://" in args.run_dir else os.path.abspath(args.run_dir)
    )  # steps run in ROOT
    args.config = str(resolve_config_path(args.config).resolve())
    t0 = time.perf_counter()
    sh(
        ["-m", "modxla.train", "--config", args.config, "--run-dir", run, *args.overrides],
        args.devices,
    )
    sh(
        [
            "-m",
            "modxla.cli.train_predictor",
            "--run-dir",
            run,
            "--steps",
            str(args.predictor_steps),
        ],
        args.devices,
    )
    for routing in ("predictor", "router"):
        sh(
            [
                "tools/generate.py",
                "--run-dir",
                run,
                "--prompt",
                "def read_config(path):\n",
                "--max-tokens",
                "96",
                "--routing",
                routing,
            ],
            1,
        )
    sh(["tools/plot.py", "--out", f"{run}/plots", run], 1)
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    print(f"  run directory:   {run}  (config.yaml, metrics.jsonl, checkpoints/, predictor/)")
    print(f"  TensorBoard:     tensorboard --logdir {run}")
    print(f"  plots:           {run}/plots/*.png")
    print(f"  routing eval:    {run}/predictor/eval.json")


if __name__ == "__main__":
    sys.exit(main())
