"""Launch modxla on Cloud TPU VMs (v4 / v5e / v5p / v6e; single host, multi-host, multislice).

    python launch/tpu.py up --name mod1 --accelerator v5p-64 --spot \\
        --config configs/mod_c12_every2.yaml --run-dir gs://bucket/runs/mod1 [key=value ...]

Subcommands:
  up      create the queued resource, set up every worker, start training detached on every
          host and watch it: a preemption deletes, recreates and resumes (--retries, with
          backoff); a crashed host stops all hosts and exits 1 with its log; the slice is
          deleted at the end unless --keep. Re-running `up` after the launching machine went
          away attaches to the training still running.
  create  the queued resource only        setup   the project at --commit on every worker
  run     cleanup + detached start        status  each host's training state
  stop    stop training on every host     delete  the queued resource (and its slices)
  jobset  a GKE JobSet manifest (needs --image, see Dockerfile)
  local   the same run simulated on this machine's CPU devices

The workers get the code at --commit by cloning --repo (they need anonymous read access to
it), or, with --upload, as this checkout's `git archive` of --commit copied to every worker
(no git credentials on the workers: a private repository). Every host logs to
~/modxla-train.log on its VM, copied to <run-dir>/logs/. --project and --zone default to
`gcloud config get-value`. --dry-run prints the commands instead.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launch import worker  # noqa: E402
from launch.gcloud import Gcloud, resolve_project_zone  # noqa: E402
from launch.jobset import jobset  # noqa: E402
from launch.pod import Pod, PodError, plan  # noqa: E402
from launch.slices import (  # noqa: E402
    LaunchError,
    local_overrides,
    parse_accelerator,
    validate,
)
from modxla.config import ConfigError, load_config  # noqa: E402
from modxla.parallel.mesh import MeshError, resolve_mesh_shape  # noqa: E402

COMMANDS = ("create", "setup", "run", "status", "stop", "up", "delete", "jobset", "local")


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("command", choices=COMMANDS)
    ap.add_argument("--name", default="modxla", help="queued resource / node name")
    ap.add_argument("--zone", default="", help="default: gcloud config get-value compute/zone")
    ap.add_argument("--project", default="", help="default: gcloud config get-value project")
    ap.add_argument("--accelerator", default="v5litepod-8", help="e.g. v5e-8, v5p-64, v6e-16")
    ap.add_argument("--slices", type=int, default=1, help="multislice: slices over DCN")
    tier = ap.add_mutually_exclusive_group()
    tier.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
    tier.add_argument("--reserved", action="store_true", help="capacity from a reservation")
    ap.add_argument("--config", default="configs/baseline.yaml")
    ap.add_argument("--run-dir", default="runs/tpu", help="gs://... for any multi-host job")
    ap.add_argument(
        "--repo", default="", help="https git URL the workers clone (default: origin, as https)"
    )
    ap.add_argument("--commit", default="", help="default: this checkout's HEAD (pushed)")
    ap.add_argument(
        "--upload",
        action="store_true",
        help="copy `git archive` of --commit from this checkout to every worker (tpu-vm scp)\n"
        "instead of cloning --repo there: no git or credentials on the workers, for a\n"
        "private repository; --commit need not be pushed",
    )
    ap.add_argument(
        "--allow-dirty",
        action="store_true",
        help="launch HEAD even with uncommitted changes or unpushed (the workers won't see them)",
    )
    ap.add_argument("--image", default="", help="jobset: the training image (see Dockerfile)")
    ap.add_argument(
        "--grace", type=int, default=600, help="jobset: seconds a SIGTERMed pod has to checkpoint"
    )
    ap.add_argument("--retries", type=int, default=3, help="recreate+resume after preemption")
    ap.add_argument("--retry-wait", type=float, default=60.0, help="first backoff (doubles), s")
    ap.add_argument("--poll", type=float, default=60.0, help="seconds between state checks")
    ap.add_argument("--wait-timeout", type=float, default=6 * 3600, help="for ACTIVE, s")
    ap.add_argument("--host-timeout", type=float, default=900, help="hosts unreachable, s")
    ap.add_argument(
        "--crash-grace",
        type=float,
        default=60,
        help="after a host exits non-zero, s to wait before a still-ACTIVE slice is a crash",
    )
    ap.add_argument(
        "--valid-until-duration",
        default="",
        help="queued-resources create: drop the request if not ACTIVE by then (e.g. 6h)",
    )
    ap.add_argument("--gcloud-timeout", type=float, default=300, help="per gcloud call, s")
    ap.add_argument("--keep", action="store_true", help="keep the slice after the run")
    ap.add_argument("--local-devices", type=int, default=8, help="for `local`")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("overrides", nargs="*", help="training config overrides, key=value")
    return ap.parse_intermixed_args(argv)


def https_url(url: str) -> str:
    """The https form of a git remote: a TPU VM has no ssh key for `git@host:owner/repo`."""
    m = re.fullmatch(r"(?:ssh://)?git@([^:/]+)[:/](.+)", url)
    if m:
        return f"https://{m[1]}/{m[2]}"
    if url.startswith(("https://", "http://")) or Path(url).is_absolute():
        return url  # a local path: the fake VMs of the tests
    raise LaunchError(f"--repo {url}: the workers clone over https; pass an https URL")


def _git(*args: str) -> tuple[int, str]:
    p = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    return p.returncode, p.stdout.strip()


def resolve_checkout(a) -> None:
    """--repo from origin; --commit = HEAD, refused if the tree is dirty or HEAD unpushed.
    With --upload no --repo, and HEAD need not be pushed: nothing is fetched."""
    if not a.upload:  # with it, the workers clone nothing
        if not a.repo:
            code, url = _git("remote", "get-url", "origin")
            if code or not url:
                raise LaunchError("--repo is required: this checkout has no `origin` remote")
            a.repo = url
        a.repo = https_url(a.repo)
    if a.commit:
        return  # named explicitly: the user vouches that the workers can fetch it (or
        # --upload: `archive` checks that this checkout has it)
    code, a.commit = _git("rev-parse", "HEAD")
    if code or not a.commit:
        raise LaunchError("--commit is required: not in a git checkout")
    if a.allow_dirty:
        return
    if _git("status", "--porcelain", "--untracked-files=no")[1]:
        raise LaunchError(
            "the checkout has uncommitted changes the workers would not run: commit and push "
            "them, or pass --allow-dirty"
        )
    if not a.upload and not _git("branch", "-r", "--contains", a.commit)[1]:
        raise LaunchError(
            f"commit {a.commit[:12]} is on no remote branch, so the workers cannot fetch it: "
            "push it, pass --upload (copies the commit to the workers), or --allow-dirty "
            "(or --commit)"
        )


@contextmanager
def archive(a, out=print):
    """--upload: the `git archive` of --commit, made here in a temporary folder and removed
    afterwards (--dry-run: only printed, as a file of the current directory); else None.
    a.commit becomes the full hash it names (what the workers' ~/modxla/COMMIT records)."""
    if not a.upload:
        yield None
        return
    if a.dry_run:
        name = worker.archive_name(a)
        out(shlex.join(["git", "archive", "--format=tar.gz", "-o", name, a.commit]))
        yield Path(name)
        return
    code, full = _git("rev-parse", "--verify", "--quiet", f"{a.commit}^{{commit}}")
    if code or not full:
        raise LaunchError(f"--upload: {a.commit} is not a commit of this checkout ({ROOT})")
    a.commit = full
    with tempfile.TemporaryDirectory(prefix="modxla-upload-") as tmp:
        path = Path(tmp) / worker.archive_name(a)
        p = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar.gz", "-o", str(path), a.commit],
            capture_output=True,
            text=True,
        )
        if p.returncode:
            raise LaunchError(f"git archive {a.commit} failed: {p.stderr.strip()[-1000:]}")
        yield path


def local(a, sl) -> int:
    cfg = load_config(a.config, a.overrides)
    shape = resolve_mesh_shape(cfg.mesh, sl.chips * a.slices)
    over = local_overrides(shape, a.local_devices)
    cmd = [sys.executable, *worker.train_args(a), *over]
    print(f"# {a.slices} x {sl.accelerator} mesh {shape} -> {a.local_devices} CPU devices")
    if a.dry_run:
        print(" ".join(cmd))
        return 0
    env = ["env", "PJRT_DEVICE=CPU", f"CPU_NUM_DEVICES={a.local_devices}"]
    return subprocess.call([*env, *cmd], cwd=ROOT)


def dispatch(a, out=print) -> int:
    sl = parse_accelerator(a.accelerator)
    if a.command == "local":
        return local(a, sl)
    cfg = load_config(a.config, a.overrides)
    validate(cfg, sl, a.slices, a.run_dir)
    if a.command in ("setup", "up", "jobset"):
        resolve_checkout(a)
    if a.command == "jobset":
        out(jobset(a, sl))
        return 0
    resolve_project_zone(a)
    g = Gcloud(a, a.dry_run, out, a.gcloud_timeout)
    if a.command in ("setup", "up") and a.upload:
        with archive(a, out) as path:  # before the slice: a bad --commit fails first
            return on_pod(a, sl, g, Pod(a, sl, g, archive=path), out)
    return on_pod(a, sl, g, Pod(a, sl, g), out)


def on_pod(a, sl, g: Gcloud, pod: Pod, out=print) -> int:
    if a.command == "create":
        return g.create(sl).code
    if a.command == "delete":
        return g.delete().code
    if a.command == "setup":
        pod.setup()
        return 0
    if a.command == "run":
        pod.start()
        return 0
    if a.command == "stop":
        pod.on_every_node(worker.stop_command(), "stop")
        return 0
    if a.command == "status":
        st = pod.statuses() or {}
        for _, _, host in pod.hosts:
            out(f"{host}: {st.get(host, 'unreachable')}")
        return 0
    return plan(a, sl, g, pod.archive) if a.dry_run else pod.up()


def main(argv: list[str] | None = None, out=print) -> int:
    a = parse(argv)
    try:
        return dispatch(a, out)
    except (LaunchError, ConfigError, MeshError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PodError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # `up` has deleted the slice (unless --keep)
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
