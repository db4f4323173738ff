"""Object-store faults: the retry policy (modxla.io.retry) on its own, then run directories in
the GCS emulator behind a fault-injecting proxy (tests/fault_proxy.py), through the CLIs."""

import json
import os
import random
import re
import signal

import pytest

from modxla.io import retry, rundir
from modxla.io.checkpoint import Checkpointer, list_checkpoints
from tests.conftest import ROOT, run, train_args
from tests.fault_proxy import Fault, FaultProxy
from tests.gcs_emulator import RESUME_STEPS, gcs, signal_on


class HttpError(Exception):  # the shape of gcsfs's: a status in .code
    def __init__(self, code):
        super().__init__(f"injected, {code}")
        self.code = code


# --- the policy ----------------------------------------------------------------------------


def test_backoff_doubles_up_to_its_cap_with_jitter():
    rng = random.Random(0)
    for attempt in range(12):
        d = min(retry.CAP_S, retry.BASE_S * 2**attempt)
        waits = [retry.backoff(attempt, rng) for _ in range(50)]
        assert all(d / 2 <= w <= d for w in waits), attempt
        assert len(set(waits)) == 50  # jittered: hosts that failed together spread out
    assert max(retry.backoff(a) for a in range(40)) <= retry.CAP_S


@pytest.mark.parametrize(
    "error, transient",
    [
        (HttpError(503), True),
        (HttpError(500), True),
        (HttpError("502"), True),  # gcsfs keeps some codes as strings
        (HttpError(429), True),
        (HttpError(408), True),
        (ConnectionResetError(104, "reset by peer"), True),
        (TimeoutError(), True),
        (type("ServerDisconnectedError", (Exception,), {})("Server disconnected"), True),
        (HttpError(400), False),
        (HttpError(401), False),
        (OSError("Forbidden: b/o\nno access"), False),
        (FileNotFoundError("b/o"), False),
        (ValueError("Bad Request"), False),
    ],
)
def test_what_is_transient(error, transient):
    assert retry.is_transient(error) is transient


def flaky(*errors, result="done"):
    """A callable that raises `errors` one per call, then returns `result`; .calls counts."""
    pending = list(errors)

    def fn():
        fn.calls += 1
        if pending:
            raise pending.pop(0)
        return result

    fn.calls = 0
    return fn


def test_transient_errors_are_retried_with_backoff_and_counted():
    slept = []
    fn = flaky(HttpError(503), HttpError(429), ConnectionResetError(104, "reset"))
    before = retry.count()
    assert retry.retrying(fn, what="write x", sleep=slept.append) == "done"
    assert fn.calls == 4 and retry.count() - before == 3
    assert all(retry.BASE_S * 2**a / 2 <= w <= retry.BASE_S * 2**a for a, w in enumerate(slept))


def test_retries_are_bounded_and_the_last_error_is_raised():
    slept = []
    fn = flaky(*[HttpError(503)] * 10)
    with pytest.raises(HttpError, match="503"):
        retry.retrying(fn, what="write x", attempts=4, sleep=slept.append)
    assert fn.calls == 4 and len(slept) == 3


def test_denied_and_missing_fail_fast():
    slept = []
    fn = flaky(OSError("Forbidden: modxla-test/r/config.yaml\nno storage.objects.get"))
    with pytest.raises(retry.StoreError, match=r"^access denied to read gs://b/r .*Forbidden"):
        retry.retrying(fn, what="read gs://b/r", sleep=slept.append)
    fn = flaky(FileNotFoundError("b/r/x"))
    with pytest.raises(FileNotFoundError):
        retry.retrying(fn, what="read gs://b/r/x", sleep=slept.append)
    assert fn.calls == 1 and slept == []


# --- the emulator behind the proxy ---------------------------------------------------------


@pytest.fixture(scope="module")
def proxy(gcs_emulator):
    """The emulator behind a FaultProxy; this process and its children talk to the proxy."""
    import gcsfs

    with FaultProxy(gcs_emulator) as p:
        os.environ["STORAGE_EMULATOR_HOST"] = p.url
        gcsfs.GCSFileSystem.clear_instance_cache()  # a cached instance knows the old host
        try:
            yield p
        finally:
            os.environ["STORAGE_EMULATOR_HOST"] = gcs_emulator
            gcsfs.GCSFileSystem.clear_instance_cache()


def faults(proxy, *rules):
    proxy.faults = list(rules)
    proxy.injected = {}
    proxy.log = []


def retries_due(proxy) -> range:
    """How many retries the injected faults call for (a delay only slows a reply down).
    aiohttp itself may resend a request once when a reused connection drops, unseen by
    gcsfs (seen in CI for an upload too): a drop may not be counted."""
    hits = [(m, a) for m, _, a in proxy.log if a not in ("ok", "delay")]
    unseen = sum(a == "drop" for m, a in hits)
    return range(len(hits) - unseen, len(hits) + 1)


@pytest.mark.slow  # gcsfs sleeps 1-2 s before each retry
def test_run_dir_files_survive_503_429_and_dropped_replies(proxy):
    url = "gs://modxla-test/faults/files"
    faults(
        proxy,
        Fault("POST", r"^/upload/", "503", times=1),
        Fault("POST", r"^/upload/", "drop", every=2, times=1),  # the upload landed
        Fault("GET", r"/o/", "429", every=2, times=2),
    )
    before = retry.count()
    rundir.write_text(rundir.join(url, "a.txt"), "alpha\n")
    stage = rundir.Staging(url, keep_until=0)
    with open(stage.metrics, "a") as f:
        f.write('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.25}\n')
    stage.close()
    assert rundir.read_text(rundir.join(url, "a.txt")) == "alpha\n"
    assert rundir.read_jsonl(rundir.join(url, rundir.METRICS)) == [
        {"step": 1, "loss": 2.5},
        {"step": 2, "loss": 2.25},
    ]
    assert proxy.injected == {"503": 1, "drop": 1, "429": 2}
    assert retry.count() - before == 4  # each fault retried once, none hidden
    assert [p.rsplit("/", 1)[-1] for p in gcs().find(url.removeprefix("gs://"))] == [
        "a.txt",
        "metrics.jsonl",
    ]


def test_a_denied_read_fails_at_once_with_one_line(proxy):
    url = "gs://modxla-test/faults/denied/config.yaml"
    rundir.write_text(url, "x: 1\n")
    faults(proxy, Fault("GET", r"config\.yaml", "403"))
    with pytest.raises(retry.StoreError, match=r"^access denied to read gs://\S+config\.yaml"):
        rundir.read_text(url)
    assert proxy.injected == {"403": 1}  # no second try
    faults(proxy)
    with pytest.raises(retry.MissingError, match=r"^gs://\S+/nothing\.yaml does not exist$"):
        rundir.read_text(url.replace("config.yaml", "nothing.yaml"))


def test_a_checkpoint_survives_its_rename_reply_being_dropped(proxy):
    """DCP writes .metadata.tmp and renames it; on GCS that is a copy and a DELETE. The DELETE
    takes effect, its reply is lost, gcsfs tries again and hears 404: the save is done."""
    import torch

    base = "gs://modxla-test/faults/ckpt"
    faults(proxy, Fault("DELETE", r"\.metadata\.tmp", "drop", times=1))
    state = {"w": torch.arange(6.0).reshape(2, 3), "meta": {"step": 1}}
    Checkpointer(base, keep=1).save(1, state)
    assert proxy.injected == {"drop": 1}
    assert [s for s, _ in list_checkpoints(base)] == [1]
    names = {p.rsplit("/", 1)[-1] for p in gcs().ls(f"{base.removeprefix('gs://')}/step_00000001")}
    assert ".metadata" in names and ".metadata.tmp" not in names and "COMPLETE" in names


# --- through the CLIs ------------------------------------------------------------------------


# A schedule that hits every kind of request a run makes, once each per process: gcsfs
# sleeps 1-2 s before each retry, so a fault costs its process seconds.
def run_faults():
    return [
        Fault("DELETE", r"\.metadata\.tmp", "drop", times=1),  # the rename's reply lost
        Fault("POST", r"^/upload/", "503", every=4, times=1),
        Fault("POST", r"^/upload/", "drop", every=5, times=1),  # shards, metrics, marker
        Fault("GET", r"/o/", "429", every=7, times=1),
        Fault("GET", r"/o\?", "delay", every=5, times=2, delay_s=0.5),  # slow listings
    ]


def io_retries(stderr: str) -> int:
    return len(re.findall(r"\[modxla\] io retry \d+: ", stderr))


@pytest.fixture(scope="module")
def faulty_run(proxy, data_cache):
    """RESUME_STEPS into the bucket through the faults, killed by SIGKILL after its first
    checkpoint, resumed through the faults: (url, resumed stderr, the retries its faults
    call for)."""
    url = "gs://modxla-test/runs/faulty"
    faults(proxy, *run_faults())
    args = train_args(url, data_cache, *RESUME_STEPS)
    code, err, killed = signal_on(args, r"checkpoint step 4 ->", signal.SIGKILL)
    assert killed and code == -signal.SIGKILL, err[-3000:]
    assert proxy.injected.get("drop", 0) >= 1 and io_retries(err) >= 1, proxy.injected
    faults(proxy, *run_faults())
    resumed = run(train_args(url, data_cache, *RESUME_STEPS, "--resume"), 1)
    return url, resumed.stderr, retries_due(proxy)


@pytest.mark.slow
def test_kill_9_and_resume_through_faults_gives_the_fault_free_losses(
    faulty_run, uninterrupted_losses
):
    url, stderr, due = faulty_run
    assert "resuming from gs://modxla-test/runs/faulty/checkpoints/step_0000000" in stderr
    assert due.stop - 1 >= 4  # a 503, a 429, a dropped upload and rename were injected
    assert io_retries(stderr) in due  # each fault was retried once, and said so
    text = gcs().cat_file(url.removeprefix("gs://") + "/metrics.jsonl").decode()
    records = [r for r in map(json.loads, text.splitlines()) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 13))  # nothing lost or twice
    for r in records:
        assert r["loss"] == pytest.approx(uninterrupted_losses[r["step"]], rel=0, abs=1e-6)
    assert [s for s, _ in list_checkpoints(f"{url}/checkpoints")] == [4, 8, 12]
    fs, root = gcs(), url.removeprefix("gs://")
    assert {"config.yaml", "metrics.jsonl", "tokenizer.model", "tb", "checkpoints"} <= {
        p.rsplit("/", 1)[-1] for p in fs.ls(root)
    }
    assert fs.ls(f"{root}/tb") and all(fs.size(p) > 0 for p in fs.find(f"{root}/tb"))
    assert not (ROOT / "gs:").exists()  # a URL taken for a path becomes a local folder `gs:`


@pytest.mark.slow
def test_predictor_sampling_and_plots_through_faults(faulty_run, proxy):
    url, _, _ = faulty_run
    root = url.removeprefix("gs://")
    generate = [
        "tools/generate.py", "--run-dir", url, "--prompt", "def f(",
        "--max-tokens", "8", "--temperature", "0",
    ]  # fmt: skip
    faults(proxy, *run_faults())
    pred = run(["tools/train_predictor.py", "--run-dir", url, "--steps", "4", "--log-every", "2",
                "--eval-batches", "1"], 1)  # fmt: skip
    sampled = run(generate, 1)
    due = retries_due(proxy)
    assert due.stop - 1 >= 3 and io_retries(pred.stderr) + io_retries(sampled.stderr) in due
    ev = json.loads(gcs().cat_file(f"{root}/predictor/eval.json"))
    assert ev["base_checkpoint"] == f"{url}/checkpoints/step_00000012"
    assert 0.0 <= ev["predictor"]["topk_accuracy"] <= 1.0 and ev["topk"]["nll"] > 0
    assert f"[{url}/predictor/checkpoints/step_00000004, routing=predictor, 8 tokens" in (
        sampled.stderr
    )
    pre = [json.loads(x) for x in gcs().cat_file(f"{root}/predictor/metrics.jsonl").splitlines()]
    assert [r["step"] for r in pre] == [2, 4]
    assert [s for s, _ in list_checkpoints(f"{url}/predictor/checkpoints")] == [4]

    faults(proxy)  # the same prompt without faults: the same tokens
    assert run(generate, 1).stdout == sampled.stdout and sampled.stdout.strip()

    from tools import plot

    faults(proxy, Fault("POST", r"^/upload/", "503", every=2, times=2))
    before = retry.count()
    assert plot.main(["--out", f"{url}/plots", url]) == 0
    assert proxy.injected == {"503": 2} and retry.count() - before == 2
    pngs = [p for p in gcs().find(f"{root}/plots") if p.endswith(".png")]
    assert len(pngs) >= 3 and all(gcs().cat_file(p)[:4] == b"\x89PNG" for p in pngs)
    assert all(gcs().size(p) > 5000 for p in pngs)
    assert gcs().exists(f"{root}/plots/runs.md") and gcs().exists(f"{root}/plots/isoflop_fit.json")
    assert not (ROOT / "gs:").exists()
