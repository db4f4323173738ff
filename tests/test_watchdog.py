"""Faults of a long run: a hung step (the watchdog dumps every stack, exits 124, the run resumes
to the uninterrupted losses) and a disk that fills up during a save (exit 4, the previous
checkpoint intact)."""

import subprocess
import sys
import textwrap
import time

import pytest

from modxla.errors import EXIT_DISK_FULL, EXIT_HUNG, RESTART
from modxla.io.checkpoint import latest_checkpoint
from tests.conftest import ROOT, read_metrics, run, train_args

# the trainer's CLI with a data source that blocks forever at its 6th batch (step 6)
HANG = textwrap.dedent(
    """
    import sys, time
    import modxla.data.loader as loader
    real = loader.BatchLoader.__next__
    def next_or_hang(self):
        if self.batch == 5:
            time.sleep(10**6)
        return real(self)
    loader.BatchLoader.__next__ = next_or_hang
    from modxla.cli.train import main
    sys.exit(main(sys.argv[1:]))
    """
)


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.mark.slow
def test_a_hung_step_dumps_every_stack_exits_124_and_the_run_resumes(tmp_path, data_cache):
    over = ["train.device=cpu", "train.steps=8", "checkpoint.every=2", "train.log_every=1"]
    run(train_args(tmp_path / "straight", data_cache, *over), 1)
    straight = _losses(tmp_path / "straight")
    hung = tmp_path / "hung"
    args = train_args(hung, data_cache, *over, "train.hang_timeout_s=3")[2:]  # no -m
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", HANG, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    took = time.monotonic() - t0
    assert proc.returncode == EXIT_HUNG and EXIT_HUNG in RESTART, proc.stderr[-3000:]
    assert "hung: no step completed for" in proc.stderr and took < 120
    assert "in next_or_hang" in proc.stderr  # the dump names the blocking frame
    dumps = list((hung / "hangs").glob("host0-*.txt"))
    assert len(dumps) == 1 and "in next_or_hang" in dumps[0].read_text()
    assert max(_losses(hung)) == 5  # step 6 never completed
    run(train_args(hung, data_cache, *over), 1)  # the restart: resumes from step 4
    got = _losses(hung)
    assert sorted(got) == sorted(straight)
    for step, loss in straight.items():
        assert got[step] == pytest.approx(loss, rel=0, abs=1e-6), step


# the trainer's CLI on a disk that fills up during the step-4 save, where DCP opens its files
FULL = textwrap.dedent(
    """
    import errno, sys
    from torch.distributed.checkpoint import filesystem
    real = filesystem.FileSystem.create_stream
    def create_or_full(self, path, mode):
        if "step_00000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(self, path, mode)
    filesystem.FileSystem.create_stream = create_or_full
    from modxla.cli.train import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_a_full_disk_keeps_the_previous_checkpoint_and_exits_4(tmp_path, data_cache):
    over = ["train.device=cpu", "train.steps=6", "checkpoint.every=2", "train.log_every=1"]
    full = tmp_path / "full"
    args = train_args(full, data_cache, *over)[2:]
    proc = subprocess.run(
        [sys.executable, "-c", FULL, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == EXIT_DISK_FULL and EXIT_DISK_FULL not in RESTART, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no space left" in errors[0] and "step 4" in errors[0]
    assert "Traceback" not in proc.stderr
    ckpts = full / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002"]  # no step_4(.partial)
    assert latest_checkpoint(str(ckpts)).endswith("step_00000002")  # loadable, verified
    proc = run(train_args(full, data_cache, *over), 1)  # space freed: it resumes
    assert "resuming from" in proc.stderr and "(step 2)" in proc.stderr
    assert max(_losses(full)) == 6


def test_the_bound_covers_a_first_save_like_a_first_step():
    """A set hang_timeout_s bounds steady steps only: until the first step completes and
    during the first save (imports, first writes) the bound is hang_first_step_s."""
    from modxla.train.watchdog import MIN_BOUND_S, Watchdog

    dog = Watchdog("unused", 0, timeout_s=3, first_step_s=100)
    assert dog.bound() == 100  # compiling
    dog.beat()
    assert dog.bound() == 3
    dog.first("save")
    assert dog.bound() == 100
    dog.beat()
    assert dog.bound() == 3 and len(dog.times) == 1  # the save's time is no step time
    dog.first("save")  # the second save: the steady bound
    assert dog.bound() == 3
    measured = Watchdog("unused", 0, timeout_s=0, first_step_s=100)
    measured.beat()
    assert measured.bound() == MIN_BOUND_S  # a fast step: the 10-minute floor
