"""A fake `gcloud` for the launcher tests: queued resources whose state advances over time,
and TPU VMs that are folders on this machine, whose `ssh --command` really runs and to whose
homes `scp FILE NODE:DEST` really copies.

State lives in $FAKE_GCLOUD_STATE/state.json (written whole, under a lock): every call's
argv in state["calls"] and its virtual time (below) in state["times"]. Each TPU VM worker
is a folder (its $HOME, with its own tmp/ standing in for the VM's /tmp) holding a link to
this checkout as ~/modxla. Its PATH starts with shims: `python3` (this interpreter on 1 CPU
device, `-m pip` skipped, test behaviours per host: crash/hang) and a no-op `git`.

Behaviours (state["script"]): create_error, waiting_polls (describes before ACTIVE),
fail_while_waiting, preempt_on_log (once a worker's training prints this, the slice is
preempted once: state SUSPENDED, the VM's processes killed; see fake_python3.py), workers
({host: "crash" | "hang" | "succeed"}).

Timed behaviours, on the virtual clock state["now"] (seconds, written by the test's sleep):
active_after (s from create to ACTIVE), states ([[t, STATE], ...]: the queued resource
created before t goes STATE at t), describe_fails_after (t: every queued-resources
call fails, as when this machine's network is down), fake_vms (ssh runs nothing: each
host's n-th start runs for run_s, default 5, then reports runs[host][n], the last one
repeating: "exit N", "none", "running" or "silent" (missing from the status output)),
ssh_fail (a command containing it exits 1), delete_s (a deleted queued resource answers
DELETING for this long, then NOT_FOUND; a create meanwhile answers ALREADY_EXISTS, as the real
gcloud's), preempt_node ([[t, NODE], ...]: at t that node of the queued resource created
before t is preempted, its ssh failing as below, while the queued resource reads whatever
`states` says: SUSPENDING lags).

Scripted ssh faults: ssh to any worker of a queued resource in SUSPENDING, SUSPENDED or
PREEMPTED (or of a preempted node) exits 1 with an error; ssh to one that is not ACTIVE
otherwise exits 255 (NOT_FOUND). preempt_on_ssh ([TEXT, N]: the N-th ssh whose command
contains TEXT finds the slice preempted: state SUSPENDED, the VMs' processes killed, that
ssh failing). worker_fail ({HOST: [TEXT, UNTIL]}: a command containing TEXT fails on that
worker alone until virtual time UNTIL, for ever when UNTIL is null; the other workers of
--worker=all run it, and the call exits 1 after gcloud's "##### Command execution on worker
N failed with exit status 1. Continuing.").

`tpu-vm scp SRC... NODE:DEST [--worker=all|N]` copies the local files to DEST (relative to
the home) of each targeted worker (worker 0 by default, as gcloud's). It meets the faults
of ssh, its "command" being `scp SRC... NODE:DEST`: a preempted slice or node exits 1, one
not ACTIVE 255; ssh_fail, preempt_on_ssh and worker_fail match that text (e.g. "scp", or
the archive's name), a failing worker getting no copy.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

STATE = Path(os.environ["FAKE_GCLOUD_STATE"])
ROOT = Path(__file__).resolve().parent.parent
PREEMPTED = {"SUSPENDING", "SUSPENDED", "PREEMPTED"}  # ssh to such a slice's workers exits 1


@contextmanager
def locked():
    with open(STATE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = json.loads((STATE / "state.json").read_text())
        yield state
        tmp = STATE / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, STATE / "state.json")


def flag(args, name, default=None):
    for a in args:
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return default


def homes(qr: dict) -> list[Path]:
    return [Path(h) for node in qr["nodes"].values() for h in node]


def kill_vm_processes(qr: dict) -> None:
    """A deleted or preempted VM takes its processes with it."""
    for home in homes(qr):
        for name in ("modxla-train.pid", "leftover.pid"):
            f = home / name
            if f.exists() and f.read_text().strip():
                try:
                    os.killpg(int(f.read_text().strip()), signal.SIGKILL)
                except (ProcessLookupError, PermissionError, ValueError):
                    pass


def make_vms(state: dict, name: str, qr: dict) -> None:
    """Fresh VM folders, each with a leftover 'training' process and a libtpu lockfile."""
    state["vm_gen"] = qr["gen"] = state.get("vm_gen", 0) + 1  # a recreated VM is a new one
    for node in qr["node_names"]:
        qr["nodes"][node] = []
        for w in range(qr["hosts"]):
            home = STATE / "vms" / f"{node}-gen{qr['gen']}" / f"w{w}"
            (home / "tmp").mkdir(parents=True)
            (home / "modxla").symlink_to(ROOT)
            (home / "tmp" / "libtpu_lockfile").write_text("")
            p = subprocess.Popen(
                ["sleep", "300"],
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            (home / "leftover.pid").write_text(str(p.pid))
            (home / "modxla-train.pid").write_text(str(p.pid))  # as a lost launcher left it
            qr["nodes"][node].append(str(home))


def queued(args: list[str]) -> int:
    verb, name = args[0], args[1]
    with locked() as state:
        qrs = state.setdefault("qr", {})
        script, now = state.get("script", {}), state.get("now", 0)
        if now >= script.get("describe_fails_after", float("inf")):
            print(
                "ERROR: (gcloud) There was a problem refreshing your credentials", file=sys.stderr
            )
            return 1
        deleting = qrs.get(name, {})
        if (
            deleting.get("state") == "DELETING"
            and now - deleting["deleted_at"] >= script["delete_s"]
        ):
            del qrs[name]  # the delete has finished
        if verb == "create":
            if state.get("script", {}).get("create_error"):
                print(f"ERROR: (gcloud) {state['script']['create_error']}", file=sys.stderr)
                return 1
            if name in qrs:  # a delete in flight too: DELETING until it is gone
                print(f"ERROR: ALREADY_EXISTS: {name}", file=sys.stderr)
                return 1
            count = int(flag(args, "node-count", "1"))
            prefix = flag(args, "node-prefix")
            nodes = (
                [flag(args, "node-id")] if count == 1 else [f"{prefix}-{i}" for i in range(count)]
            )
            hosts = {"v5litepod-8": 1, "v5p-16": 2, "v5p-8": 1}[flag(args, "accelerator-type")]
            qrs[name] = {
                "state": "ACCEPTED",
                "describes": 0,
                "node_names": nodes,
                "nodes": {},
                "hosts": hosts,
                "created_at": now,
            }
            print(f"Create request issued for: [{name}]")
            return 0
        if name not in qrs:
            print(f"ERROR: (gcloud) NOT_FOUND: queued resource {name}", file=sys.stderr)
            return 1
        qr = qrs[name]
        if verb == "delete":
            kill_vm_processes(qr)
            if script.get("delete_s") and qr["state"] != "DELETING":
                qr["state"], qr["deleted_at"] = "DELETING", now  # goes on without the caller
            elif not script.get("delete_s"):
                del qrs[name]
            return 0
        qr["describes"] += 1
        if qr["state"] == "DELETING":
            print("DELETING")
            return 0
        for t, forced in script.get("states", []):
            if qr["created_at"] < t <= now:
                qr["state"] = forced
        if qr["state"] in ("ACCEPTED", "WAITING_FOR_RESOURCES"):
            if script.get("fail_while_waiting") and qr["describes"] >= 2:
                qr["state"] = "FAILED"
            elif "active_after" in script:
                if now - qr["created_at"] >= script["active_after"]:
                    qr["state"] = "ACTIVE"
                    make_vms(state, name, qr)
                else:
                    qr["state"] = "WAITING_FOR_RESOURCES"
            elif qr["describes"] > script.get("waiting_polls", 1):
                qr["state"] = "ACTIVE"
                make_vms(state, name, qr)
            else:
                qr["state"] = "WAITING_FOR_RESOURCES"
        print(qr["state"])
        return 0


def reach(state: dict, node: str, which: str, command: str, verb: str):
    """(exit code, workers [(index, home)] to run `command` on, queued resource) of an ssh
    or scp (`verb`) to `node`: the scripted faults, then the workers that do not fail; a
    code > 0 with no workers left is the call's exit code."""
    qr = next((q for q in state.get("qr", {}).values() if node in q["nodes"]), None)
    script, now = state.get("script", {}), state.get("now", 0)
    if qr is not None and qr["state"] == "ACTIVE" and script.get("preempt_on_ssh"):
        text, nth = script["preempt_on_ssh"]
        if text in command:
            state["preempt_ssh_seen"] = seen = state.get("preempt_ssh_seen", 0) + 1
            if seen == nth:
                qr["state"] = "SUSPENDED"
                state["preemptions"] = state.get("preemptions", 0) + 1
                kill_vm_processes(qr)
    preempted = qr is not None and any(
        n == node and qr["created_at"] < t <= now for t, n in script.get("preempt_node", [])
    )
    if qr is not None and (preempted or qr["state"] in PREEMPTED):
        print(
            f"ERROR: (gcloud.compute.tpus.tpu-vm.{verb}) FAILED_PRECONDITION: TPU node {node} "
            f"is not READY (PREEMPTED); its queued resource is {qr['state']}",
            file=sys.stderr,
        )
        return 1, [], qr
    if qr is None or qr["state"] != "ACTIVE":
        print(f"ERROR: (gcloud.compute.tpus.tpu-vm.{verb}) NOT_FOUND: {node}", file=sys.stderr)
        return 255, [], qr
    targets = list(enumerate(qr["nodes"][node]))
    if which != "all":
        targets = [targets[int(which)]]
    if script.get("ssh_fail") and script["ssh_fail"] in command:
        print(f"fake: {script['ssh_fail']} failed", file=sys.stderr)
        return 1, [], qr
    failing = []
    for w, _ in targets:
        text, until = script.get("worker_fail", {}).get(f"{node}-w{w}", [None, None])
        if text and text in command and (until is None or now < until):
            failing.append(w)
    targets = [t for t in targets if t[0] not in failing]
    return worker_failures(failing, multiple=which == "all"), targets, qr


def scp(args: list[str]) -> int:
    """Copy local files into the home of the node's workers (`NODE:DEST`, DEST relative)."""
    paths = [x for x in args if not x.startswith("--")]
    (*sources, target), which = paths, flag(args, "worker", "0")
    node, dest = target.split(":", 1)
    with locked() as state:
        code, targets, _ = reach(state, node, which, shlex.join(["scp", *paths]), "scp")
    for src in sources:
        if not Path(src).is_file():
            print(f"ERROR: (gcloud.compute.tpus.tpu-vm.scp) {src}: no such file", file=sys.stderr)
            return 1
        for _, home in targets:
            shutil.copyfile(src, Path(home) / dest)
    return code


def ssh(args: list[str]) -> int:
    node, which, command = args[0], flag(args, "worker"), flag(args, "command")
    with locked() as state:
        script = state.get("script", {})
        code, targets, _ = reach(state, node, which, command, "ssh")
        if not targets and code:
            return code
        if script.get("fake_vms"):
            return max(code, fake_vm(state, script, node, targets, command))
    shims = STATE / "shims"
    procs = []
    for w, home in targets:
        env = {
            **os.environ,
            "HOME": home,
            "PATH": f"{shims}:/usr/bin:/bin",
            "PYTHONPATH": str(ROOT),
            "FAKE_WORKER": f"{node}-w{w}",
            "FAKE_QR": next(n for n, q in state["qr"].items() if node in q["nodes"]),
        }
        cmd = command.replace("/tmp/libtpu_lockfile", f"{home}/tmp/libtpu_lockfile")
        procs.append(
            subprocess.Popen(
                ["bash", "-c", cmd],
                cwd=home,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    for p in procs:
        out, _ = p.communicate()
        sys.stdout.write(out)
        code = max(code, p.returncode)
    return code


def worker_failures(workers: list[int], multiple: bool) -> int:
    """gcloud's report of the workers whose command failed (exit 1); the exit code."""
    for w in workers:
        print(f"fake: worker {w} failed", file=sys.stderr)
        if multiple:
            print(
                f"##### Command execution on worker {w} failed with exit status 1. Continuing.",
                file=sys.stderr,
            )
    return 1 if workers else 0


def fake_vm(state: dict, script: dict, node: str, targets: list, command: str) -> int:
    """ssh to VMs that run nothing: starts are recorded, statuses follow script["runs"]."""
    now, starts = state.get("now", 0), state.setdefault("starts", {})
    for w, _ in targets:
        host = f"{node}-w{w}"
        if "nohup setsid" in command:
            starts.setdefault(host, []).append(now)
        elif "modxla-status" in command:
            mine = starts.get(host, [])
            outcomes = script.get("runs", {}).get(host, ["exit 0"])
            if not mine:
                status = "none"
            elif now - mine[-1] < script.get("run_s", 5):
                status = "running"
            else:
                status = outcomes[min(len(mine), len(outcomes)) - 1]
            if status != "silent":
                print(f"modxla-status {host} {status}")
        elif "modxla-clean" in command:
            print("modxla-clean")
        elif "tail -n" in command:
            print(f"fake log of {host}")
    return 0


def main(argv: list[str]) -> int:
    with locked() as state:
        state.setdefault("calls", []).append(argv)
        state.setdefault("times", []).append(state.get("now", 0))  # each call's virtual time
    if argv[:2] == ["config", "get-value"]:
        print(json.loads((STATE / "state.json").read_text()).get("config", {}).get(argv[2], ""))
        return 0
    if argv[:3] == ["compute", "tpus", "queued-resources"]:
        return queued(argv[3:])
    if argv[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
        return ssh(argv[4:])
    if argv[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
        return scp(argv[4:])
    print(f"fake gcloud: unsupported {argv}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
