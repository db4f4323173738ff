"""Several hosts as real processes: torchrun starts them with a gloo group over env://, each
running its own single-host XLA program. A SIGTERM to one host, at any moment of a step,
stops every host after the same step, with one loadable checkpoint of it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modxla.errors import EXIT_STOPPED
from modxla.io.checkpoint import latest_checkpoint, list_checkpoints, read_metadata
from tests.conftest import ROOT, TINY, read_metrics

HOSTS = 2


def _start(run_dir: Path, data_cache: str, exits: Path, tag: str, log) -> subprocess.Popen:
    train = [
        sys.executable,
        *("-m", "modxla.train", "--config", "configs/tiny.yaml", "--run-dir", str(run_dir)),
        *TINY,
        f"data.cache_dir={data_cache}",
        "train.steps=100000",
        "train.log_every=1",
        "checkpoint.every=0",  # the only checkpoint: the stop's
    ]
    # each host's exit status, as the launcher's wrapper records it
    record = 'cd "$ROOT" && "$@"; echo $? > "$EXITS/$RANK"'
    cmd = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
        *(f"--nproc-per-node={HOSTS}", "--no-python", "bash", "-c", record, "host", *train),
    ]
    env = {
        **os.environ,
        "PJRT_DEVICE": "CPU",
        "CPU_NUM_DEVICES": "2",
        "ROOT": str(ROOT),
        "EXITS": str(exits),
        "HOSTS_TEST": tag,  # finds this test's processes
    }
    # a file, not a pipe: no host blocks on a full pipe while the test waits
    return subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _trainer_pid(tag: str, rank: int) -> int | None:
    """The python process of host `rank` (torchrun -> bash -> python), from /proc."""
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"HOSTS_TEST={tag}".encode() in env and f"RANK={rank}".encode() in env:
            if cmd[0] != b"bash" and b"modxla.train" in cmd:
                return int(proc.name)
    return None


def _steps_logged(run_dir: Path) -> int:
    try:
        return max((r["step"] for r in read_metrics(run_dir) if "loss" in r), default=0)
    except (OSError, ValueError):  # not written yet, or a line being written
        return 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "signals",
    [
        [(0, 0.0)],  # the writer
        # a host other than the writer (steps take a few ms: the stop is agreed long before
        # the writer's own signal), then the writer's, arriving during the stop
        [(1, 0.0), (0, 0.4)],
    ],
    ids=["writer", "host1-then-writer"],
)
def test_a_sigterm_to_any_host_stops_every_host_after_the_same_step(tmp_path, data_cache, signals):
    # data_cache is built (hosts must not race to write it)
    run_dir, exits, tag = tmp_path / "run", tmp_path / "exits", tmp_path.name
    exits.mkdir()
    log_path = tmp_path / "hosts.log"
    with open(log_path, "w") as log:
        proc = _start(run_dir, data_cache, exits, tag, log)
    try:
        deadline = time.monotonic() + 240
        while _steps_logged(run_dir) < 3:  # mid-run: steps of a few ms, so any phase of one
            assert proc.poll() is None, log_path.read_text()[-5000:]
            assert time.monotonic() < deadline, f"no step:\n{log_path.read_text()[-5000:]}"
            time.sleep(0.05)
        start = time.monotonic()
        for rank, after in signals:
            while time.monotonic() < start + after:
                time.sleep(0.01)
            pid = _trainer_pid(tag, rank)
            assert pid is not None, f"no trainer process for host {rank}"
            os.kill(pid, signal.SIGTERM)
        try:
            proc.wait(timeout=90)  # a split stop would hang here
        except subprocess.TimeoutExpired:
            pytest.fail(f"the hosts did not stop:\n{log_path.read_text()[-5000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every host
    err = log_path.read_text()
    codes = {p.name: int(p.read_text()) for p in exits.iterdir()}
    assert codes == {str(r): EXIT_STOPPED for r in range(HOSTS)}, err[-3000:]
    left = [
        line.split("left at step ")[1].split(",")[0]
        for line in err.splitlines()
        if "stop requested: left at step" in line
    ]
    assert len(left) == HOSTS and len(set(left)) == 1, left  # every host, the same step
    step = int(left[0])
    found = list_checkpoints(str(run_dir / "checkpoints"))
    assert [s for s, _ in found] == [step]  # one checkpoint, of that step
    path = latest_checkpoint(str(run_dir / "checkpoints"))  # checksums verified
    assert path == found[0][1] and "model.embed.weight" in read_metadata(path)
    assert _steps_logged(run_dir) == step  # metrics never run ahead of the checkpoint
