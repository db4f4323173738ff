"""`up` (launch/pod.py) against the fake gcloud on a virtual clock: its states take time, its
VMs run nothing (fake_vms) and report scripted statuses, so each case runs in seconds."""

import fcntl
import json
import os
import shutil
import sys

import pytest

from launch import tpu
from launch.gcloud import Gcloud
from launch.pod import GcloudDown, Pod, PodError
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
        return Pod(a, tpu.parse_accelerator(a.accelerator), g, clock.sleep, clock.now)

    make.state = lambda: json.loads((state / "state.json").read_text())
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
