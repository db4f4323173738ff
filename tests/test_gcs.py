"""gs:// run directories against a local GCS emulator: resume, SIGTERM, tools, no ./gs: folder."""

import json
import os
import re
import signal

import pytest

from modxla.errors import EXIT_STOPPED
from modxla.io import rundir
from modxla.io.checkpoint import list_checkpoints, load, read_metadata
from tests.conftest import ROOT, run, train_args
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


@pytest.fixture(scope="module")
def resumed_gcs_run(gcs_emulator, data_cache):
    """A tiny run trained into gs://, killed by SIGKILL after its first checkpoint, resumed."""
    url = "gs://modxla-test/runs/killed"
    args = train_args(url, data_cache, *STEPS)
    code, err, killed = signal_on(args, r"checkpoint step 4 ->", signal.SIGKILL)
    assert killed and code == -signal.SIGKILL, err[-3000:]
    assert not complete(url, 12)
    resumed = run(train_args(url, data_cache, *STEPS, "--resume"), 1)
    return url, resumed.stderr


@pytest.mark.slow
def test_kill_9_in_a_bucket_then_resume_gives_the_uninterrupted_losses(
    resumed_gcs_run, uninterrupted_losses
):
    url, stderr = resumed_gcs_run
    assert re.search(
        r"resuming from gs://modxla-test/runs/killed/checkpoints/step_0000000[48]", stderr
    )
    expected = uninterrupted_losses
    got = bucket_losses(url)
    assert sorted(got) == list(range(1, 13))  # each step once: nothing lost, nothing twice
    for step in range(1, 13):
        assert got[step] == pytest.approx(expected[step], rel=0, abs=1e-6), step
    fs, root = gcs(), url.removeprefix("gs://")
    assert {"config.yaml", "metrics.jsonl", "tokenizer.model", "tb", "checkpoints"} <= {
        p.rsplit("/", 1)[-1] for p in fs.ls(root)
    }
    assert fs.ls(f"{root}/tb") and all(fs.size(p) > 0 for p in fs.find(f"{root}/tb"))
    assert no_local_url_folder()


@pytest.mark.slow
def test_predictor_sampling_and_plots_on_a_gcs_run(resumed_gcs_run, tmp_path):
    url, _ = resumed_gcs_run
    fs, root = gcs(), url.removeprefix("gs://")
    run(
        [
            "tools/train_predictor.py",
            "--run-dir",
            url,
            "--steps",
            "4",
            "--log-every",
            "2",
            "--eval-batches",
            "1",
        ],
        1,
    )
    ev = json.loads(fs.cat_file(f"{root}/predictor/eval.json"))
    assert ev["base_checkpoint"] == f"{url}/checkpoints/step_00000012"
    assert 0.0 <= ev["predictor"]["topk_accuracy"] <= 1.0 and ev["topk"]["nll"] > 0
    assert [s for s, _ in list_checkpoints(f"{url}/predictor/checkpoints")] == [4]
    pre = [json.loads(x) for x in fs.cat_file(f"{root}/predictor/metrics.jsonl").splitlines()]
    assert [r["step"] for r in pre] == [2, 4]

    proc = run(
        [
            "tools/generate.py",
            "--run-dir",
            url,
            "--prompt",
            "def f(",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
        ],
        1,
    )
    assert f"[{url}/predictor/checkpoints/step_00000004, routing=predictor, 8 tokens" in proc.stderr
    assert proc.stdout.strip()

    from tools import plot

    out = f"{url}/plots"
    assert plot.main(["--out", out, url]) == 0
    pngs = [p for p in fs.find(f"{root}/plots") if p.endswith(".png")]
    assert len(pngs) >= 3 and all(fs.size(p) > 5000 for p in pngs)
    assert fs.exists(f"{root}/plots/runs.md") and fs.exists(f"{root}/plots/isoflop_fit.json")
    assert fs.cat_file(pngs[0])[:4] == b"\x89PNG"
    assert no_local_url_folder() and not (tmp_path / "gs:").exists()


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
