"""Launch modxla on Cloud TPU VMs (v4 / v5e / v5p / v6e; single host, multi-host, multislice).

    python launch/tpu.py up --name mod1 --zone us-east5-a --accelerator v5p-64 \\
        --config configs/mod_c12_every2.yaml --run-dir gs://bucket/runs/mod1 [key=value ...]

Subcommands: create (queued resource), setup (pinned deps + the project at the launching
commit on every worker), run (the training command on every host, one log per host), up
(create, setup, run; re-runs with resume after a preemption, bounded), delete, jobset (a GKE
JobSet manifest), local (the same run simulated on this machine's CPU devices). Every
subcommand takes --dry-run and then prints the exact commands instead of running them.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from modxla.config import Config, ConfigError, load_config  # noqa: E402
from modxla.parallel.mesh import MeshError, check_batch, resolve_mesh_shape  # noqa: E402

RUNTIME = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
GKE_ACCEL = {
    "v4": "tpu-v4-podslice",
    "v5litepod": "tpu-v5-lite-podslice",
    "v5p": "tpu-v5p-slice",
    "v6e": "tpu-v6e-slice",
}
XLA_ENV = {
    "PJRT_DEVICE": "TPU",
    "LIBTPU_INIT_ARGS": "--xla_enable_async_collective_permute=true",
}
REPO_DIR = "modxla"
DEPS = "pip install -q 'torch==2.9.0' 'torch_xla[tpu]==2.9.0' -e ."


class LaunchError(ValueError):
    """The launch cannot work: bad accelerator, mesh, batch or run directory."""


@dataclass(frozen=True)
class Slice:
    """One TPU slice's shape: accelerator type, chips and hosts."""

    accelerator: str  # gcloud's name, e.g. v5litepod-8, v5p-64
    family: str
    chips: int
    hosts: int

    @property
    def topology(self) -> str:
        if self.family in ("v5litepod", "v6e"):
            side = 2 ** (int(math.log2(self.chips)) // 2)
            return f"{side}x{self.chips // side}"
        dims = [1, 1, 1]
        for i in range(int(math.log2(self.chips))):
            dims[i % 3 if self.chips >= 8 else i % 2] *= 2
        return "x".join(map(str, sorted(dims)))


def parse_accelerator(name: str) -> Slice:
    m = re.fullmatch(r"(v4|v5e|v5litepod|v5p|v6e)-(\d+)", name)
    if not m or int(m.group(2)) & (int(m.group(2)) - 1):
        raise LaunchError(f"--accelerator {name!r}: expected v4-N, v5e-N, v5p-N or v6e-N")
    family, n = m.group(1), int(m.group(2))
    family = "v5litepod" if family == "v5e" else family
    chips = n // 2 if family in ("v4", "v5p") else n  # v4/v5p count TensorCores, 2 per chip
    per_host = 4 if family in ("v4", "v5p") or chips > 8 else chips
    return Slice(f"{family}-{n}", family, chips, max(1, chips // per_host))


def validate(cfg: Config, sl: Slice, slices: int, run_dir: str) -> tuple[int, int, int]:
    """Fail before anything is created: mesh vs chips, batch vs data axes, run dir."""
    devices = sl.chips * slices
    try:
        shape = resolve_mesh_shape(cfg.mesh, devices)
        check_batch(cfg.train.batch_size, shape, sl.hosts * slices)
    except MeshError as e:
        raise LaunchError(f"{e} ({slices} x {sl.accelerator} = {devices} chips)") from None
    if slices > 1 and cfg.mesh.dcn_data != slices:
        raise LaunchError(f"mesh.dcn_data is {cfg.mesh.dcn_data} but the job has {slices} slices")
    if sl.hosts * slices > 1 and not run_dir.startswith("gs://"):
        raise LaunchError(
            f"--run-dir {run_dir}: a multi-host job ({sl.hosts * slices} hosts) needs a shared "
            "gs:// run directory that every host can write"
        )
    return shape


class Runner:
    """Runs commands, or with dry_run only prints them; returns exit codes."""

    def __init__(self, dry_run: bool = False, out=print) -> None:
        self.dry_run, self.out = dry_run, out

    def __call__(self, cmd: list[str], log: str | None = None) -> int:
        line = shlex.join(cmd) + (f" > {shlex.quote(log)} 2>&1" if log else "")
        self.out(line)
        if self.dry_run:
            return 0
        if log:
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as f:
                return subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
        return subprocess.call(cmd)

    def parallel(self, cmds: list[tuple[list[str], str]]) -> int:
        """All commands at once (one per host), each to its own log; worst exit code."""
        for cmd, log in cmds:
            self.out(shlex.join(cmd) + f" > {shlex.quote(log)} 2>&1 &")
        if self.dry_run:
            return 0
        procs = []
        for cmd, log in cmds:
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            procs.append(subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT))  # noqa: SIM115
        return max(p.wait() for p in procs)


def node_names(a) -> list[str]:
    return [a.name] if a.slices == 1 else [f"{a.name}-{i}" for i in range(a.slices)]


def gcloud_tpu(a, *args: str) -> list[str]:
    return ["gcloud", "compute", "tpus", *args, f"--zone={a.zone}", f"--project={a.project}"]


def create_cmd(a, sl: Slice) -> list[str]:
    cmd = gcloud_tpu(a, "queued-resources", "create", a.name)
    cmd += [f"--accelerator-type={sl.accelerator}", f"--runtime-version={RUNTIME[sl.family]}"]
    cmd += (
        [f"--node-id={a.name}"]
        if a.slices == 1
        else [f"--node-count={a.slices}", f"--node-prefix={a.name}"]
    )
    return cmd + (["--spot"] if a.spot else [])


def ssh_cmd(a, node: str, worker: str, command: str) -> list[str]:
    return gcloud_tpu(a, "tpu-vm", "ssh", node, f"--worker={worker}", f"--command={command}")


def setup_command(a) -> str:
    return (
        f"set -e; test -d {REPO_DIR} || git clone {shlex.quote(a.repo)} {REPO_DIR}; "
        f"cd {REPO_DIR} && git fetch -q origin && git checkout -q {a.commit} && {DEPS}"
    )


def train_args(a) -> list[str]:
    return ["-m", "modxla.train", "--config", a.config, "--run-dir", a.run_dir, *a.overrides]


def train_command(a, slice_id: int, coordinator: str) -> str:
    """The command each host runs; a re-run resumes by itself (checkpoint.resume=auto)."""
    env = dict(XLA_ENV)
    if a.slices > 1:
        env.update(
            MEGASCALE_NUM_SLICES=str(a.slices),
            MEGASCALE_SLICE_ID=str(slice_id),
            MEGASCALE_COORDINATOR_ADDRESS=coordinator,
            MEGASCALE_PORT="8081",
        )
    args = ["python", *train_args(a)]
    # the coordinator's address is looked up on the worker, when the slices exist
    envs = " ".join(f"{k}={v if v.startswith('$(') else shlex.quote(v)}" for k, v in env.items())
    return f"cd {REPO_DIR} && {envs} {shlex.join(args)}"


def run_cmds(a, sl: Slice) -> list[tuple[list[str], str]]:
    """One ssh per host per slice, each with its own local log file."""
    first = node_names(a)[0]
    describe = shlex.join(gcloud_tpu(a, "tpu-vm", "describe", first))
    coordinator = f"$({describe} --format='value(networkEndpoints[0].ipAddress)')"
    out = []
    for s, node in enumerate(node_names(a)):
        command = train_command(a, s, coordinator)
        for w in range(sl.hosts):
            out.append((ssh_cmd(a, node, str(w), command), f"{a.logs}/{node}-w{w}.log"))
    return out


def up(a, sl: Slice, run: Runner, sleep=time.sleep) -> int:
    """Create, set up, train; after a failure (preemption) recreate and resume, bounded."""
    for attempt in range(a.retries + 1):
        if run(create_cmd(a, sl)) or run(wait_cmd(a)):
            return 1
        for node in node_names(a):
            if run(ssh_cmd(a, node, "all", setup_command(a))):
                return 1
        code = run.parallel(run_cmds(a, sl))
        if code == 0:
            return 0
        run.out(f"# attempt {attempt + 1} failed (exit {code}); recreating and resuming")
        run(delete_cmd(a))
        sleep(a.retry_wait)
    return 1


def wait_cmd(a) -> list[str]:
    return [
        "bash",
        "-c",
        f"until {shlex.join(gcloud_tpu(a, 'queued-resources', 'describe', a.name))}"
        " --format='value(state.state)' | grep -q ACTIVE; do sleep 30; done",
    ]


def delete_cmd(a) -> list[str]:
    return gcloud_tpu(a, "queued-resources", "delete", a.name, "--force", "--quiet")


def jobset(a, sl: Slice) -> str:
    """A GKE JobSet: one replicated job per slice, one pod per host.

    Restarted pods resume by themselves (checkpoint.resume=auto). Multislice variables come
    from the JobSet: slice id = job index, coordinator = the first pod of the first slice.
    """
    cmd = train_command(a, 0, "")
    cmd = re.sub(r"MEGASCALE_\w+=\S* ", "", cmd)
    env = ""
    if a.slices > 1:
        env = f"""
              env:
              - name: MEGASCALE_NUM_SLICES
                value: "{a.slices}"
              - name: MEGASCALE_SLICE_ID
                valueFrom:
                  fieldRef:
                    fieldPath: metadata.annotations['jobset.sigs.k8s.io/job-index']
              - name: MEGASCALE_COORDINATOR_ADDRESS
                value: "{a.name}-slice-0-0.{a.name}"
              - name: MEGASCALE_PORT
                value: "8081\""""
    return f"""apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata:
  name: {a.name}
  annotations:
    alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool
spec:
  failurePolicy:
    maxRestarts: {a.retries}
  replicatedJobs:
  - name: slice
    replicas: {a.slices}
    template:
      spec:
        parallelism: {sl.hosts}
        completions: {sl.hosts}
        backoffLimit: 0
        template:
          spec:
            restartPolicy: Never
            nodeSelector:
              cloud.google.com/gke-tpu-accelerator: {GKE_ACCEL[sl.family]}
              cloud.google.com/gke-tpu-topology: {sl.topology}
            containers:
            - name: train
              image: {a.image}
              command: ["bash", "-c", {json.dumps(cmd)}]{env}
              resources:
                limits:
                  google.com/tpu: {sl.chips // sl.hosts}
"""


def local_overrides(shape: tuple[int, int, int], devices: int) -> list[str]:
    """The pod's (data, fsdp, tensor) scaled down to `devices`: data first, then fsdp."""
    d, f, t = shape
    while d * f * t > devices and d > 1:
        d //= 2
    while d * f * t > devices and f > 1:
        f //= 2
    while d * f * t > devices and t > 1:
        t //= 2
    return [f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}", "mesh.dcn_data=1"]


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "command", choices=("create", "setup", "run", "up", "delete", "jobset", "local")
    )
    ap.add_argument("--name", default="modxla", help="queued resource / node name")
    ap.add_argument("--zone", default="us-east5-a")
    ap.add_argument("--project", default="my-project")
    ap.add_argument("--accelerator", default="v5litepod-8", help="e.g. v5e-8, v5p-64, v6e-16")
    ap.add_argument("--slices", type=int, default=1, help="multislice: slices over DCN")
    ap.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
    ap.add_argument("--config", default="configs/baseline.yaml")
    ap.add_argument("--run-dir", default="runs/tpu")
    ap.add_argument("--repo", default="https://github.com/modxla/modxla.git")
    ap.add_argument("--commit", default="", help="default: this checkout's HEAD")
    ap.add_argument("--image", default="us-docker.pkg.dev/my-project/modxla:latest")
    ap.add_argument("--logs", default="launch_logs", help="local folder, one log per host")
    ap.add_argument("--retries", type=int, default=3, help="resumes after preemption")
    ap.add_argument("--retry-wait", type=float, default=60.0)
    ap.add_argument("--local-devices", type=int, default=8, help="for `local`")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("overrides", nargs="*", help="training config overrides, key=value")
    a = ap.parse_intermixed_args(argv)
    if not a.commit:
        a.commit = (
            subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
            ).stdout.strip()
            or "HEAD"
        )
    return a


def main(argv: list[str] | None = None, runner: Runner | None = None) -> int:
    a = parse(argv)
    run = runner or Runner(a.dry_run)
    try:
        sl = parse_accelerator(a.accelerator)
        cfg = load_config(a.config, a.overrides)
        if a.command == "local":
            shape = resolve_mesh_shape(cfg.mesh, sl.chips * a.slices)
            over = local_overrides(shape, a.local_devices)
            cmd = [sys.executable, *train_args(a), *over]
            run.out(
                f"# {a.slices} x {sl.accelerator} mesh {shape} -> {a.local_devices} CPU devices"
            )
            return run(["env", "PJRT_DEVICE=CPU", f"CPU_NUM_DEVICES={a.local_devices}", *cmd])
        validate(cfg, sl, a.slices, a.run_dir)
    except (LaunchError, ConfigError, MeshError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.command == "create":
        return run(create_cmd(a, sl))
    if a.command == "setup":
        return max(run(ssh_cmd(a, n, "all", setup_command(a))) for n in node_names(a))
    if a.command == "run":
        return run.parallel(run_cmds(a, sl))
    if a.command == "delete":
        return run(delete_cmd(a))
    if a.command == "jobset":
        run.out(jobset(a, sl))
        return 0
    return up(a, sl, run)


if __name__ == "__main__":
    sys.exit(main())
