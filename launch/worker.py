"""The shell commands run on every TPU VM: setup, cleanup/stop, detached start, status, log.

Training runs detached (`nohup setsid`), so it outlives the ssh session and the launching
machine. Each worker keeps `~/modxla-train.log`, `~/modxla-train.pid` (the process group) and,
when training has ended, `~/modxla-train.exit`; the log is uploaded to <run-dir>/logs/ every
few minutes and at exit.
"""

from __future__ import annotations

import re
import shlex

REPO_DIR = "modxla"
LOG, PID, EXIT, WHO = (f"$HOME/modxla-train.{x}" for x in ("log", "pid", "exit", "who"))
LOCKFILE = "/tmp/libtpu_lockfile"  # left by a killed TPU process; blocks the next one
# The TPU VM images' python3 is Ubuntu 22.04's 3.10, below what the pins need (jax 0.7.1 and
# flax 0.12: Requires-Python >=3.11). uv makes a 3.11 venv without sudo or apt (a fresh VM's
# unattended-upgrades holds the apt lock) and downloads that Python when the image lacks it.
PYTHON = "3.11"
VENV = "$HOME/modxla-venv"
PY = f"{VENV}/bin/python"
UV = "python3 -m uv"
DEPS = (
    f"python3 -m pip install -q --user 'uv>=0.5' && "
    f"{{ test -x {PY} || {UV} venv -q --python {PYTHON} {VENV}; }} && "
    f"{UV} pip install -q --python {PY} 'torch==2.9.0' 'torch_xla[tpu]==2.9.0' -e ."
)
SETUP_TIMEOUT_S = 1800  # several GB of wheels per host: more than one ssh call's timeout
XLA_ENV = {
    "PJRT_DEVICE": "TPU",
    "LIBTPU_INIT_ARGS": "--xla_enable_async_collective_permute=true",
}
LOG_UPLOAD_EVERY_S = 300
UPLOAD_TIMEOUT_S = 120  # a stuck upload must not hide the exit code
STATUS = "modxla-status"


def archive_name(a) -> str:
    """The uploaded tree's file name (--upload), locally and in every worker's home."""
    return f"modxla-{a.commit}.tar.gz"


def setup_command(a) -> str:
    """The project at the launch commit and its pinned dependencies in a Python 3.11 venv;
    bounded by its own timeout (exit 124), not the launcher's ssh timeout.

    Clone mode: `git clone --repo` (the workers need read access to it) and check out
    --commit. Upload mode (--upload): no git on the worker; the `git archive` of --commit,
    copied into the home beforehand (`archive_name`), replaces ~/modxla, which records the
    commit in ~/modxla/COMMIT."""
    if a.upload:
        tgz, new = shlex.quote(archive_name(a)), f"{REPO_DIR}.new"
        script = (
            f"set -e; rm -rf {new} && mkdir {new} && tar -xzf {tgz} -C {new} && "
            f"echo {shlex.quote(a.commit)} > {new}/COMMIT && "
            f"rm -rf {REPO_DIR} && mv {new} {REPO_DIR} && rm -f {tgz} && cd {REPO_DIR} && {DEPS}"
        )
    else:
        script = (
            f"set -e; test -d {REPO_DIR} || git clone -q {shlex.quote(a.repo)} {REPO_DIR}; "
            f"cd {REPO_DIR} && git fetch -q origin && git checkout -q {a.commit} && {DEPS}"
        )
    return f"timeout {SETUP_TIMEOUT_S} bash -c {shlex.quote(script)}"


def stop_command(grace_s: int = 30) -> str:
    """Stop training started earlier (SIGTERM: it saves; SIGKILL after `grace_s`) and remove
    the libtpu lockfile. Run before every (re)start and to stop all hosts after a crash."""
    return (
        f"if [ -f {PID} ]; then g=$(cat {PID}); kill -TERM -- -$g 2>/dev/null; "
        f"for i in $(seq {grace_s}); do kill -0 -- -$g 2>/dev/null || break; sleep 1; done; "
        f"kill -KILL -- -$g 2>/dev/null; fi; rm -f {PID} {EXIT} {LOCKFILE}; echo modxla-clean"
    )


def train_args(a) -> list[str]:
    return ["-m", "modxla.train", "--config", a.config, "--run-dir", a.run_dir, *a.overrides]


def train_command(a, python: str = PY) -> str:
    """The training command of every host; a re-run resumes by itself (checkpoint.resume=auto).

    `env` sets the variables, so the command also runs after `exec` (bash's exec takes
    `NAME=value` as the program). No MEGASCALE_* here: queued resources with --node-count set
    them up on every worker.
    """
    envs = " ".join(f"{k}={shlex.quote(v)}" for k, v in XLA_ENV.items())
    return f"env {envs} {python} {shlex.join(train_args(a))}"  # python unquoted: $HOME


def start_command(a, host: str) -> str:
    """Start training detached on one worker; `host` names its log under <run-dir>/logs/."""
    from modxla.io.rundir import LOGS, join

    dest = shlex.quote(join(a.run_dir, LOGS, f"{host}.log"))
    upload = (
        f"timeout {UPLOAD_TIMEOUT_S} {PY} -c 'import sys; from modxla.io import rundir; "
        f"rundir.put_file(sys.argv[1], sys.argv[2])' {LOG} {dest} >/dev/null 2>&1"
    )
    script = (
        f"echo $$ > {PID}; echo {host} > {WHO}; up() {{ {upload}; }}; "
        # TERM reaches the whole group: training saves and exits 143 (modxla.errors); bash
        # runs the trap after its child ends, so the exit file still records that code
        "trap : TERM; "
        f"( while sleep {LOG_UPLOAD_EVERY_S}; do up; done ) & loop=$!; "
        f"{train_command(a)} > {LOG} 2>&1; code=$?; "
        f"kill $loop 2>/dev/null; up; echo $code > {EXIT}"
    )
    return (
        f"cd {REPO_DIR} && rm -f {EXIT} && "
        f"(nohup setsid bash -c {shlex.quote(script)} > /dev/null 2>&1 < /dev/null &)"
    )


def status_command() -> str:
    """One line per worker: `modxla-status HOST running|exit CODE|none`."""
    return (
        f"h=$(cat {WHO} 2>/dev/null || hostname); "
        f"if [ -f {EXIT} ]; then echo {STATUS} $h exit $(cat {EXIT}); "
        f"elif [ -f {PID} ] && kill -0 -- -$(cat {PID}) 2>/dev/null; "
        f"then echo {STATUS} $h running; else echo {STATUS} $h none; fi"
    )


def parse_status(text: str) -> dict[str, str]:
    """{host: 'running' | 'exit N' | 'none'} from status_command's output."""
    found = re.findall(rf"{STATUS} (\S+) (running|none|exit -?\d+)", text)  # gcloud may prefix
    return dict(found)


def tail_command(lines: int = 40) -> str:
    return f"tail -n {lines} {LOG}"


def host_names(nodes: list[str], hosts: int) -> list[tuple[str, int, str]]:
    """(node, worker index, host name) for every TPU VM of the job."""
    return [(n, w, f"{n}-w{w}") for n in nodes for w in range(hosts)]
