"""`python3` on a fake TPU VM (see fake_gcloud.py): this interpreter on one CPU device."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import fake_pip  # noqa: E402

args = sys.argv[1:]
VERSION = os.environ.get("FAKE_PYTHON_VERSION", "3.10")  # Ubuntu 22.04's, as on the TPU VM images


def install(specs: list[str], python: str) -> None:
    """pip's metadata checks, then nothing installed (the test venv has the dependencies)."""
    specs = [s for s in specs if not s.startswith("-") or s == "-e"]
    errors = fake_pip.check(specs, python)
    for e in errors:
        print(e, file=sys.stderr)
    sys.exit(1 if errors else 0)


if args == ["--version"]:
    print(f"Python {VERSION}.0")
    sys.exit(0)
if args[:3] == ["-m", "pip", "install"]:
    install(args[3:], VERSION)
if args[:3] == ["-m", "uv", "venv"]:  # uv fetches the Python it is asked for
    python, target = args[args.index("--python") + 1], Path(os.path.expandvars(args[-1]))
    (target / "bin").mkdir(parents=True, exist_ok=True)
    (target / "bin" / "python").write_text(
        f'#!/bin/sh\nFAKE_PYTHON_VERSION={python} exec python3 "$@"\n'
    )
    (target / "bin" / "python").chmod(0o755)
    sys.exit(0)
if args[:4] == ["-m", "uv", "pip", "install"]:
    rest = args[4:]
    python = rest.pop(rest.index("--python") + 1)
    out = subprocess.run([python, "--version"], capture_output=True, text=True).stdout
    install(rest, out.split()[1].rsplit(".", 1)[0])
if args[:2] == ["-m", "modxla.train"]:
    home, host = Path(os.environ["HOME"]), os.environ["FAKE_WORKER"]
    leftover = int((home / "leftover.pid").read_text())
    stat = Path(f"/proc/{leftover}/stat")  # a killed, unreaped process is a zombie: dead
    alive = stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    start = {
        "host": host,
        "pid": os.getpid(),
        "leftover_alive": alive,
        "lockfile": (home / "tmp" / "libtpu_lockfile").exists(),
    }
    with open(home / "starts.jsonl", "a") as f:
        f.write(json.dumps(start) + "\n")
    state = json.loads((Path(os.environ["FAKE_GCLOUD_STATE"]) / "state.json").read_text())
    behaviour = state.get("script", {}).get("workers", {}).get(host)
    if behaviour == "crash":
        time.sleep(2)
        print(f"RuntimeError: simulated crash on {host}", file=sys.stderr)
        sys.exit(3)
    if behaviour == "succeed":  # a short 'training' that ends well
        time.sleep(10)
        print(f"finished on {host}", file=sys.stderr)
        sys.exit(0)
    if behaviour == "hang":  # blocked in a collective, as the others are when one host dies
        os.execvp("sleep", ["sleep", "600"])
env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "1"}
is_training = args[:2] == ["-m", "modxla.train"]
trigger = state.get("script", {}).get("preempt_on_log") if is_training else None
if not trigger or state.get("preemptions", 0):
    os.execve(sys.executable, [sys.executable, *args], env)

# Preempt the slice the moment training prints `trigger` (no polling race with the launcher):
# the queued resource goes SUSPENDED and the VM's processes die, the training's wrapper too.
sys.path.insert(0, str(Path(__file__).parent))
from fake_gcloud import locked  # noqa: E402

child = subprocess.Popen([sys.executable, *args], env=env)
log = home / "modxla-train.log"
while child.poll() is None:
    if log.exists() and trigger in log.read_text(errors="replace"):
        with locked() as st:
            st["qr"][os.environ["FAKE_QR"]]["state"] = "SUSPENDED"
            st["preemptions"] = st.get("preemptions", 0) + 1
        os.killpg(os.getpgid(0), signal.SIGKILL)
    time.sleep(0.01)
sys.exit(child.returncode)
