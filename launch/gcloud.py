"""gcloud commands for queued resources and TPU VMs, run with timeouts (or only printed)."""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass

from launch.slices import RUNTIME, LaunchError, Slice


@dataclass
class Result:
    code: int  # 124: timed out
    out: str  # stdout
    err: str = ""

    @property
    def text(self) -> str:
        return (self.out + "\n" + self.err).strip()


class Gcloud:
    """Builds and runs `gcloud compute tpus ...`; with dry_run it prints and returns 0."""

    def __init__(self, a, dry_run: bool = False, out=print, timeout: float = 300.0) -> None:
        self.a, self.dry_run, self.out, self.timeout = a, dry_run, out, timeout
        self.last_error = ""

    def base(self, *args: str) -> list[str]:
        a = self.a
        return ["gcloud", "compute", "tpus", *args, f"--zone={a.zone}", f"--project={a.project}"]

    def run(self, cmd: list[str], quiet: bool = False, timeout: float | None = None) -> Result:
        if not quiet or self.dry_run:
            self.out(shlex.join(cmd))
        if self.dry_run:
            return Result(0, "")
        try:
            p = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=timeout or self.timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return Result(124, "", f"timed out after {timeout or self.timeout:.0f} s: {cmd[:6]}")
        return Result(p.returncode, p.stdout, p.stderr)

    # --- queued resources ---------------------------------------------------------------

    def create_cmd(self, sl: Slice) -> list[str]:
        a = self.a
        cmd = self.base("queued-resources", "create", a.name)
        cmd += [f"--accelerator-type={sl.accelerator}", f"--runtime-version={RUNTIME[sl.family]}"]
        cmd += (
            [f"--node-id={a.name}"]
            if a.slices == 1
            else [f"--node-count={a.slices}", f"--node-prefix={a.name}"]
        )
        if a.valid_until_duration:  # a request still queued by then expires by itself
            cmd.append(f"--valid-until-duration={a.valid_until_duration}")
        return cmd + (["--spot"] if a.spot else []) + (["--reserved"] if a.reserved else [])

    def create(self, sl: Slice) -> Result:
        return self.run(self.create_cmd(sl))

    def state(self) -> str:
        """The queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, ...), or GONE."""
        r = self.run(
            self.base("queued-resources", "describe", self.a.name, "--format=value(state.state)"),
            quiet=True,
        )
        if r.code == 0:
            return r.out.strip().splitlines()[-1] if r.out.strip() else "UNKNOWN"
        if "NOT_FOUND" in r.err or "not found" in r.err.lower():
            return "GONE"
        self.last_error = r.text[-2000:]
        return "UNREACHABLE"  # gcloud itself failed (network, auth): ask again later

    def delete(self) -> Result:
        return self.run(
            self.base("queued-resources", "delete", self.a.name, "--force", "--quiet"),
            timeout=max(self.timeout, 900),
        )

    # --- TPU VMs --------------------------------------------------------------------------

    def nodes(self) -> list[str]:
        a = self.a
        return [a.name] if a.slices == 1 else [f"{a.name}-{i}" for i in range(a.slices)]

    def ssh_cmd(self, node: str, worker: str, command: str) -> list[str]:
        # --quiet: no prompt (e.g. for a new ssh key) may block an unattended launcher
        cmd = ["tpu-vm", "ssh", node, f"--worker={worker}", f"--command={command}", "--quiet"]
        return self.base(*cmd)

    def ssh(
        self, node: str, worker: str, command: str, quiet: bool = False, timeout=None
    ) -> Result:
        return self.run(self.ssh_cmd(node, worker, command), quiet=quiet, timeout=timeout)

    def scp_cmd(self, src: str, node: str, dest: str, worker: str = "all") -> list[str]:
        """Copy the local file `src` to `dest` (relative: in the home) on workers of `node`."""
        return self.base("tpu-vm", "scp", src, f"{node}:{dest}", f"--worker={worker}", "--quiet")

    def scp(
        self, src: str, node: str, dest: str, worker: str = "all", quiet: bool = False, timeout=None
    ) -> Result:
        return self.run(self.scp_cmd(src, node, dest, worker), quiet=quiet, timeout=timeout)


def config_value(key: str) -> str:
    """`gcloud config get-value KEY`, or '' if gcloud is missing or the value unset."""
    try:
        p = subprocess.run(
            ["gcloud", "config", "get-value", key],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    value = p.stdout.strip()
    return value if p.returncode == 0 and value != "(unset)" else ""


def resolve_project_zone(a) -> None:
    """--project/--zone from the command line, else from gcloud's config, else an error."""
    for attr, key in (("project", "project"), ("zone", "compute/zone")):
        if not getattr(a, attr):
            setattr(a, attr, config_value(key))
        if not getattr(a, attr):
            raise LaunchError(
                f"--{attr} is required (or set it once: gcloud config set {key} VALUE)"
            )
