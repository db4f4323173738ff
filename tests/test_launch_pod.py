"""`up` (launch/pod.py) against the fake gcloud on a virtual clock: its states take time, its
VMs run nothing (fake_vms) and report scripted statuses, so each case runs in seconds."""

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from launch import tpu, worker
from launch.gcloud import Gcloud
from launch.pod import GcloudDown, Pod, PodError
from launch.slices import LaunchError
from tests.conftest import ROOT


def set_now(t):
    """The virtual time, in the fake's state (under its lock)."""
    state = os.environ["FAKE_GCLOUD_STATE"]
    with open(f"{state}/lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(f"{state}/state.json") as f:
            st = json.load(f)
        st["now"] = t
        with open(f"{state}/state.json.tmp", "w") as f:
            json.dump(st, f)
        os.replace(f"{state}/state.json.tmp", f"{state}/state.json")


class Clock:
    """Virtual time: sleep advances it and tells the fake gcloud; past `interrupt_at` it is
    Ctrl-C, past `limit` the launcher is stuck (the test fails instead of hanging)."""

    def __init__(self, interrupt_at=None, limit=2000):
        self.t, self.interrupt_at, self.limit = 0.0, interrupt_at, limit

    def now(self):
        return self.t

    def sleep(self, s):
        self.t += s
        set_now(self.t)
        if self.interrupt_at is not None and self.t >= self.interrupt_at:
            raise KeyboardInterrupt
        assert self.t < self.limit, "the launcher never ended"


@pytest.fixture
def pod(tmp_path, monkeypatch):
    state = tmp_path / "gcloud"
    state.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(
        f'#!/bin/sh\nexec {sys.executable} {ROOT / "tests" / "fake_gcloud.py"} "$@"\n'
    )
    (bin_dir / "gcloud").chmod(0o755)
    (state / "state.json").write_text("{}")
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_GCLOUD_STATE", str(state))

    def make(script, *extra, accelerator="v5e-8", clock=None):
        shutil.rmtree(state / "vms", ignore_errors=True)  # a fresh fake for each launch
        (state / "state.json").write_text(json.dumps({"script": {"fake_vms": True, **script}}))
        a = tpu.parse([
            "up", "--name", "p", "--zone", "z", "--project", "proj", "--accelerator",
            accelerator, "--run-dir", "gs://b/r", "--repo", "r", "--commit", "c", "--poll", "1",
            "--retry-wait", "0", "--wait-timeout", "100", "--host-timeout", "20",
            "--crash-grace", "30", *extra,
        ])  # fmt: skip
        clock = clock or Clock()
        g = Gcloud(a, out=lambda _: None, timeout=60)
        archive = None
        if a.upload:  # what tpu.archive makes: any bytes do, the fake VMs extract nothing
            archive = tmp_path / worker.archive_name(a)
            archive.write_bytes(b"the tree at c")
        sl = tpu.parse_accelerator(a.accelerator)
        return Pod(a, sl, g, clock.sleep, clock.now, archive=archive)

    make.state = lambda: json.loads((state / "state.json").read_text())
    make.homes = lambda: sorted((state / "vms").glob("*/w*"))
    return make


def qr_calls(state, verb):
    return [c for c in state["calls"] if c[:4] == ["compute", "tpus", "queued-resources", verb]]


def starts(state):
    return sum(len(v) for v in state.get("starts", {}).values())


# --- 1. cleanup on every exit path ---------------------------------------------------------


def test_setup_failure_deletes_the_slice(pod):
    p = pod({"active_after": 3, "ssh_fail": "git checkout"})
    with pytest.raises(PodError, match="setup failed"):
        p.up()
    st = pod.state()
    assert len(qr_calls(st, "delete")) == 1 and st["qr"] == {}


def test_wait_timeout_deletes_the_queued_request(pod):
    p = pod({"active_after": 10_000}, "--valid-until-duration", "6h")
    with pytest.raises(PodError, match="not ACTIVE after 100 s"):
        p.up()
    st = pod.state()
    assert st["qr"] == {}
    (create,) = qr_calls(st, "create")
    assert "--valid-until-duration=6h" in create


def test_failed_while_waiting_deletes_it(pod):
    with pytest.raises(PodError, match="FAILED while waiting"):
        pod({"fail_while_waiting": True}).up()
    assert pod.state()["qr"] == {}


def test_ctrl_c_deletes_the_slice_unless_keep(pod):
    with pytest.raises(KeyboardInterrupt):
        pod({"runs": {"p-w0": ["running"]}}, clock=Clock(interrupt_at=10)).up()
    assert pod.state()["qr"] == {}
    with pytest.raises(KeyboardInterrupt):
        pod({"runs": {"p-w0": ["running"]}}, "--keep", clock=Clock(interrupt_at=10)).up()
    assert list(pod.state()["qr"]) == ["p"]


# --- 2. our own gcloud failing is not a preemption ----------------------------------------


def test_gcloud_failing_leaves_the_slice_and_says_how_to_reattach(pod):
    p = pod({"runs": {"p-w0": ["running"]}, "describe_fails_after": 8})
    with pytest.raises(GcloudDown, match="re-attach, or delete it: gcloud compute tpus"):
        p.up()
    st = pod.state()
    assert not qr_calls(st, "delete") and len(qr_calls(st, "create")) == 1
    assert list(st["qr"]) == ["p"]


# --- 3. each host's reachability on its own ------------------------------------------------


def test_one_slice_silent_while_the_other_runs_is_lost(pod):
    runs = {"p-0-w0": ["running", "exit 0"], "p-1-w0": ["silent", "exit 0"]}
    p = pod({"runs": runs}, "--slices", "2", "mesh.dcn_data=2")
    assert p.up() == 0
    st = pod.state()
    assert len(qr_calls(st, "create")) == 2  # lost after --host-timeout, recreated
    assert st["qr"] == {}


# --- 4. exit codes -------------------------------------------------------------------------


def test_a_restart_exit_code_restarts_in_place(pod):
    p = pod({"runs": {"p-w0": ["exit 143", "exit 124", "exit 0"]}})
    assert p.up() == 0
    st = pod.state()
    assert len(qr_calls(st, "create")) == 1 and starts(st) == 3  # no recreate
    assert len(qr_calls(st, "delete")) == 1  # at the end


def test_restarts_count_against_retries(pod):
    with pytest.raises(PodError, match="out of retries"):
        pod({"runs": {"p-w0": ["exit 143"]}}, "--retries", "2").up()
    st = pod.state()
    assert starts(st) == 3 and st["qr"] == {}


def test_a_crash_is_rechecked_after_the_grace_and_may_be_a_preemption(pod):
    # training dies at t=5; the queued resource says SUSPENDED only at t=20
    p = pod({"runs": {"p-w0": ["exit 1", "exit 0"]}, "states": [[20, "SUSPENDED"]]})
    assert p.up() == 0
    st = pod.state()
    assert len(qr_calls(st, "create")) == 2 and st["qr"] == {}


def test_a_crash_on_an_active_slice_stops_without_a_recreate(pod, capsys):
    assert pod({"runs": {"p-w0": ["exit 1"]}}).up() == 1
    st = pod.state()
    assert len(qr_calls(st, "create")) == 1 and st["qr"] == {}
    assert "fake log of p-w0" in capsys.readouterr().err


# --- 5. a VM restarted by maintenance ------------------------------------------------------


def test_training_gone_on_an_active_slice_restarts_in_place(pod):
    p = pod({"runs": {"p-w0": ["none", "exit 0"]}})
    assert p.up() == 0
    st = pod.state()
    assert len(qr_calls(st, "create")) == 1 and starts(st) == 2


# --- 6. the pods issue: gcloud faults the launcher must read right -------------------------


def ssh_calls(state, text):
    """(index in state["calls"], virtual time) of every ssh whose command contains text."""
    return [
        (i, state["times"][i])
        for i, c in enumerate(state["calls"])
        if c[2:4] == ["tpu-vm", "ssh"] and text in next(a for a in c if a.startswith("--command="))
    ]


def qr_verbs(state, start=0):
    """The queued-resources verbs from call `start` on, in order, with their virtual times."""
    return [
        (c[3], state["times"][i])
        for i, c in enumerate(state["calls"])
        if i >= start and c[:3] == ["compute", "tpus", "queued-resources"]
    ]


def test_a_recreate_waits_until_the_delete_has_finished(pod, capsys):
    # preempted at t=10; the delete then takes 15 s (DELETING), a create meanwhile would
    # answer ALREADY_EXISTS: the recreate must come only once describe says NOT_FOUND
    script = {"run_s": 30, "states": [[10, "SUSPENDED"]], "delete_s": 15}
    assert pod(script).up() == 0
    st = pod.state()
    verbs = qr_verbs(st)
    (t0, t1), deletes = ([t for v, t in verbs if v == x] for x in ("create", "delete"))
    assert t0 == 0 and deletes[0] == 10  # deleted as soon as it read SUSPENDED
    assert t1 >= 10 + 15  # not while DELETING: that create would answer ALREADY_EXISTS
    between = [v for v, t in verbs if 10 < t < t1]
    assert between and set(between) == {"describe"}  # polled until NOT_FOUND, one delete
    (_, s0), (_, s1) = ssh_calls(st, "nohup setsid")
    assert s0 < 10 and s1 > t1  # trained on the new slice, not on the one going away
    assert st["qr"]["p"]["state"] == "DELETING"  # and deleted at the end
    err = capsys.readouterr().err
    assert "SUSPENDED (preempted)" in err and "DELETING, waiting for the delete" in err


@pytest.mark.parametrize(
    "fault, runs",
    [
        (["git checkout", 1], ["exit 0"]),  # preempted during the setup
        (["nohup setsid", 2], ["exit 143", "exit 0"]),  # during a restart in place
    ],
)
def test_ssh_to_a_preempted_node_is_a_lost_slice_not_a_failure(pod, capsys, fault, runs):
    # the n-th ssh running fault[0] finds the slice preempted (SUSPENDED): it exits 1
    assert pod({"runs": {"p-w0": runs}, "preempt_on_ssh": fault}).up() == 0
    st = pod.state()
    assert st["preemptions"] == 1
    failed, _ = ssh_calls(st, fault[0])[fault[1] - 1]
    # the failed ssh is read from the queued resource's state: describe, delete, recreate
    after = [v for v, _ in qr_verbs(st, failed + 1)]
    assert after[:4] == ["describe", "delete", "describe", "create"]
    assert len(qr_calls(st, "create")) == 2 and st["qr"] == {}
    assert len(ssh_calls(st, "git checkout")) == 2  # set up again on the new slice
    err = capsys.readouterr().err
    assert "SUSPENDED (preempted)" in err and "retry 1/3" in err
    assert "failed on" not in err and "could not start" not in err


def test_one_worker_of_worker_all_failing(pod, capsys):
    # during setup: named by its host, no training started, the slice deleted unless --keep
    for keep in ([], ["--keep"]):
        p = pod({"worker_fail": {"p-w1": ["git checkout", None]}}, *keep, accelerator="v5p-16")
        with pytest.raises(PodError) as e:
            p.up()
        assert str(e.value).startswith("setup failed on p-w1 (exit 1):")
        st = pod.state()
        assert not ssh_calls(st, "nohup setsid")
        verbs = [v for v, _ in qr_verbs(st, ssh_calls(st, "git checkout")[0][0])]
        assert verbs == (["describe"] if keep else ["describe", "delete"])
        assert list(st["qr"]) == (["p"] if keep else [])
    assert "--keep: slice p left running" in capsys.readouterr().err
    # while polling: only p-w1 fails to answer (until t=30); p-w0 answering does not hide it
    script = {"run_s": 25, "worker_fail": {"p-w1": ["modxla-status", 30]}}
    assert pod(script, "--poll", "2", accelerator="v5p-16").up() == 0
    st = pod.state()
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if "unreachable" in ln] == [
        "[launch] p-w1 unreachable for 20 s: lost"
    ]
    (_, t0), (_, t1) = [(v, t) for v, t in qr_verbs(st) if v == "create"]
    assert t0 == 0 and 20 < t1 < 30  # lost 20 s after its first silence; missed again once
    assert len(ssh_calls(st, "nohup setsid")) == 4  # 2 hosts x 2 slices, no restart


def test_a_multislice_peer_exiting_after_the_other_slice_is_preempted(pod, capsys):
    # slice p-1 is preempted at t=8 (its ssh fails); p-0's hosts exit 1 at t=11 (their peers
    # vanished) while the queued resource reads ACTIVE until t=20 (SUSPENDING lags)
    script = {
        "run_s": 10,
        "preempt_node": [[8, "p-1"]],
        "states": [[20, "SUSPENDING"]],
        "runs": {"p-0-w0": ["exit 1", "exit 0"], "p-0-w1": ["exit 1", "exit 0"]},
    }
    p = pod(script, "--slices", "2", "mesh.dcn_data=2", accelerator="v5p-16")
    assert p.up() == 0
    st = pod.state()
    err = capsys.readouterr().err
    assert "host p-0-w0 exited non-zero: checking the slice in 30 s" in err
    assert "SUSPENDING (preempted)" in err and "crashed" not in err
    assert "unreachable" not in err  # p-1's silence was not what found it: the state was
    assert not ssh_calls(st, "tail -n") and not ssh_calls(st, "seq 10")  # no fail-fast stop
    creates = [t for v, t in qr_verbs(st) if v == "create"]
    deletes = [t for v, t in qr_verbs(st) if v == "delete"]
    assert creates[0] == 0 and 20 <= deletes[0] <= 11 + 30 and creates[1] >= deletes[0]
    assert len(ssh_calls(st, "nohup setsid")) == 8 and st["qr"] == {}  # resumed, finished


# --- 7. --upload: the tree copied to the workers, no git there ----------------------------


def events(state):
    """The launch's creates, uploads (scp NODE), setups (setup NODE) and starts, in order."""
    out = []
    for c in state["calls"]:
        if c[:4] == ["compute", "tpus", "queued-resources", "create"]:
            out.append("create")
        elif c[2:4] == ["tpu-vm", "scp"]:
            out.append(f"scp {c[5].split(':')[0]}")
        elif c[2:4] == ["tpu-vm", "ssh"]:
            command = next(a for a in c if a.startswith("--command="))
            if "bash -c" in command and "uv pip install" in command:
                out.append(f"setup {c[4]}")
            elif "nohup setsid" in command:
                out.append("start")
    return out


def test_upload_copies_the_tree_to_every_node_before_each_setup(pod):
    # two slices, preempted at t=10 and recreated: fresh VMs get the archive again
    script = {"run_s": 30, "states": [[10, "SUSPENDED"]]}
    p = pod(script, "--upload", "--slices", "2", "mesh.dcn_data=2", accelerator="v5p-16")
    assert p.up() == 0
    st = pod.state()
    one = ["create", "scp p-0", "scp p-1", "setup p-0", "setup p-1", *["start"] * 4]
    assert events(st) == one + one
    scps = [c for c in st["calls"] if c[2:4] == ["tpu-vm", "scp"]]
    assert all(
        c[4:7] == [str(p.archive), f"{c[5].split(':')[0]}:modxla-c.tar.gz", "--worker=all"]
        for c in scps
    )
    homes = pod.homes()  # 2 generations x 2 nodes x 2 workers, each with its copy
    assert len(homes) == 8
    assert all((h / "modxla-c.tar.gz").read_bytes() == b"the tree at c" for h in homes)
    ssh = [a for c in st["calls"] if c[2:4] == ["tpu-vm", "ssh"] for a in c]
    assert not [a for a in ssh if "git " in a]  # never a clone, fetch or checkout
    assert st["qr"] == {}


def test_an_upload_to_a_preempted_slice_is_a_lost_slice(pod, capsys):
    # the first scp finds the slice preempted (exit 1): recreate and upload again
    p = pod({"preempt_on_ssh": ["scp", 1]}, "--upload")
    assert p.up() == 0
    st = pod.state()
    assert st["preemptions"] == 1
    assert events(st) == ["create", "scp p", "create", "scp p", "setup p", "start"]
    err = capsys.readouterr().err
    assert "SUSPENDED (preempted)" in err and "retry 1/3" in err and "failed on" not in err


@pytest.mark.parametrize(
    "fault, where",
    [
        ({"ssh_fail": "scp"}, "p (exit 1)"),  # the whole call failed: the node is named
        ({"worker_fail": {"p-w1": ["scp", None]}}, "p-w1 (exit 1)"),  # one worker of all
    ],
)
def test_a_failed_upload_on_an_active_slice_is_an_error(pod, capsys, fault, where):
    for keep in ([], ["--keep"]):
        p = pod(fault, "--upload", *keep, accelerator="v5p-16")
        with pytest.raises(PodError) as e:
            p.up()
        assert str(e.value).startswith(f"upload of modxla-c.tar.gz failed on {where}:")
        st = pod.state()
        assert events(st) == ["create", "scp p"]  # no setup, no training
        (i,) = [i for i, c in enumerate(st["calls"]) if c[2:4] == ["tpu-vm", "scp"]]
        verbs = [v for v, _ in qr_verbs(st, i + 1)]
        assert verbs == (["describe"] if keep else ["describe", "delete"])  # not lost: ACTIVE
        assert list(st["qr"]) == (["p"] if keep else [])
    assert "--keep: slice p left running" in capsys.readouterr().err


def test_the_archive_is_the_commit_of_this_checkout(tmp_path):
    a = tpu.parse(["up", "--upload", "--commit", "HEAD"])
    with tpu.archive(a, out=lambda _: None) as path:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        assert a.commit == head and path.name == f"modxla-{head}.tar.gz"  # the full hash
        with tarfile.open(path) as tar:
            names = set(tar.getnames())
        assert {"setup.cfg", "launch/tpu.py", "launch/worker.py"} <= names
        assert not any(n.startswith(".git/") for n in names)
    assert not path.exists() and not path.parent.exists()  # removed after the launch
    a = tpu.parse(["up", "--upload", "--commit", "no-such-commit"])
    with pytest.raises(LaunchError, match="no-such-commit is not a commit of this checkout"):
        with tpu.archive(a):
            pass
    a = tpu.parse(["up", "--upload", "--commit", "0123abcd", "--dry-run"])
    lines = []
    with tpu.archive(a, out=lines.append) as path:
        assert path == Path("modxla-0123abcd.tar.gz")  # printed, not made
    assert lines == ["git archive --format=tar.gz -o modxla-0123abcd.tar.gz 0123abcd"]
