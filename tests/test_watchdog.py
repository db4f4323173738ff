"""A hung step: the watchdog dumps every thread's stack, exits 124 (restart and resume), and the
resumed run ends with the uninterrupted losses."""

import subprocess
import sys
import textwrap
import time

import pytest

from modxla.errors import EXIT_HUNG, RESTART
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
