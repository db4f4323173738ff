"""gs:// run directories against a local GCS emulator: resume, SIGTERM, tools, no ./gs: folder."""

import json
import os
import signal

import pytest

from modxla.errors import EXIT_STOPPED
from modxla.io import rundir
from modxla.io.checkpoint import list_checkpoints, load, read_metadata
from tests.conftest import ROOT, train_args
from tests.gcs_emulator import RESUME_STEPS, gcs, signal_on

STEPS = RESUME_STEPS


def bucket_losses(url):
    text = gcs().cat_file(url.removeprefix("gs://") + "/metrics.jsonl").decode()
    return {r["step"]: r["loss"] for r in map(json.loads, text.splitlines()) if "loss" in r}


def complete(url, step):
    return gcs().exists(f"{url.removeprefix('gs://')}/checkpoints/step_{step:08d}/COMPLETE")


def no_local_url_folder():
    """A URL taken for a path becomes a local folder `gs:` (pathlib collapses `//`)."""
    return not (ROOT / "gs:").exists()


def test_rundir_joins_urls_without_pathlib():
    assert (
        rundir.join("gs://b/runs/x/", "checkpoints", "step_1") == "gs://b/runs/x/checkpoints/step_1"
    )
    assert rundir.join("runs/x", rundir.PREDICTOR, rundir.EVAL) == "runs/x/predictor/eval.json"
    assert rundir.basename("gs://b/runs/x/") == "x"
    assert rundir.is_url("gs://b/x") and rundir.is_url("memory://x")
    assert not rundir.is_url("runs/x") and not rundir.is_url("file:///tmp/x")


def test_staged_metrics_reach_a_url_only_at_sync_and_a_local_dir_at_once(tmp_path):
    url = "memory://modxla-rundir/run"
    rundir.write_text(rundir.join(url, rundir.METRICS), '{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    stage = rundir.Staging(url, keep_until=2)  # resumed from step 2: step 3 is logged again
    with open(stage.metrics, "a") as f:
        f.write('{"step": 3, "new": 1}\n')
    remote = rundir.join(url, rundir.METRICS)
    assert [r["step"] for r in rundir.read_jsonl(remote)] == [1, 2, 3]  # the old file, whole
    stage.sync()
    assert rundir.read_jsonl(remote) == [{"step": 1}, {"step": 2}, {"step": 3, "new": 1}]
    stage.close()
    assert not os.path.exists(stage.root)  # the staging folder is gone

    local = str(tmp_path / "run")
    stage = rundir.Staging(local, keep_until=0)  # a fresh run: nothing kept
    assert stage.metrics == os.path.join(local, rundir.METRICS)  # written in place
    assert rundir.read_jsonl(stage.metrics) == []


# kill -9 and resume into a bucket, the predictor tool, sampling and plots on a gs:// run:
# tests/test_faults.py runs them through injected store faults


@pytest.mark.slow
def test_sigterm_leaves_a_loadable_checkpoint_in_the_bucket(gcs_emulator, data_cache):
    url = "gs://modxla-test/runs/sigterm"
    every_step = ["train.log_every=1", "train.device=cpu"]
    args = train_args(url, data_cache, "train.steps=100000", *every_step)
    code, err, sent = signal_on(args, r"\| ([3-9]|\d\d+)/100000", signal.SIGTERM)
    assert sent and code == EXIT_STOPPED, err[-3000:]
    assert "saving a checkpoint" in err
    found = list_checkpoints(f"{url}/checkpoints")
    assert len(found) == 1
    step, path = found[0]
    assert 3 <= step < 100000 and path.startswith("gs://")
    assert max(bucket_losses(url)) == step  # uploaded with the checkpoint
    meta = load(path, {"meta": {"step": 0}})["meta"]
    assert meta["step"] == step
    assert "model.embed.weight" in read_metadata(path)
    assert no_local_url_folder()
