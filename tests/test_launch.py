"""TPU launcher: golden commands and validation; behaviour against a fake gcloud whose TPU VMs
are folders on this machine (tests/fake_gcloud.py) training into the GCS emulator."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import slices, tpu
from tests.conftest import ROOT, TINY, read_metrics
from tests.gcs_emulator import RESUME_STEPS, gcs

GOLDEN = Path(__file__).parent / "golden"
# git on a TPU VM asked for a private repository: no credentials, no terminal to ask on
PRIVATE_GIT = (
    "echo \"fatal: could not read Username for 'https://github.com': "
    'No such device or address" >&2; exit 128'
)
COMMON = [
    "--commit",
    "0123abcd",
    "--repo",
    "https://github.com/modxla/modxla.git",
    "--name",
    "mod",
    "--zone",
    "us-east5-a",
    "--project",
    "proj",
    "--dry-run",
    "--config",
    "configs/mod_c12_every2.yaml",
]
MULTISLICE = [
    "--accelerator",
    "v5e-16",
    "--slices",
    "2",
    "--run-dir",
    "gs://bucket/runs/ms",
    "mesh.dcn_data=2",
    "mesh.fsdp=16",
    "train.batch_size=32",
]
CASES = {
    "v5e_8_run.txt": [
        "run",
        "--accelerator",
        "v5e-8",
        "--run-dir",
        "runs/v5e8",
        "mesh.fsdp=8",
        "mesh.data=1",
    ],
    "v5p_64_up.txt": [
        "up",
        "--spot",
        "--accelerator",
        "v5p-64",
        "--run-dir",
        "gs://bucket/runs/v5p64",
        "mesh.fsdp=8",
        "train.batch_size=32",
    ],
    "multislice_2x_v5e_16_up.txt": ["up", *MULTISLICE],
    "multislice_2x_v5e_16_upload_up.txt": ["up", "--upload", *MULTISLICE],
    "multislice_2x_v5e_16_jobset.yaml": [
        "jobset",
        "--image",
        "us-docker.pkg.dev/p/r/modxla:deps",
        *MULTISLICE,
    ],
}


def dry(args):
    lines = []
    code = tpu.main([*args[:1], *COMMON, *args[1:]], out=lines.append)
    return code, "\n".join(lines) + "\n"


@pytest.mark.parametrize("golden", sorted(CASES))
def test_generated_commands_match_golden(golden):
    code, text = dry(CASES[golden])
    assert code == 0
    assert text == (GOLDEN / golden).read_text()


def test_golden_shapes():
    v5e8, v5p64 = tpu.parse_accelerator("v5e-8"), tpu.parse_accelerator("v5p-64")
    assert (v5e8.chips, v5e8.hosts, v5e8.topology) == (8, 1, "2x4")
    assert (v5p64.chips, v5p64.hosts, v5p64.topology) == (32, 8, "2x4x4")
    assert tpu.parse_accelerator("v6e-16").hosts == 4
    _, text = dry(CASES["v5p_64_up.txt"])
    assert text.count("--worker=all") == 2  # setup, cleanup
    assert len(re.findall(r"--worker=\d", text)) == 8  # one detached start per host
    assert "modxla-venv/bin/python -m modxla.train" in text and "nohup setsid" in text
    assert "rm -f $HOME/modxla-train.pid $HOME/modxla-train.exit /tmp/libtpu_lockfile" in text
    _, text = dry(CASES["multislice_2x_v5e_16_up.txt"])
    assert "--node-count=2 --node-prefix=mod" in text
    assert "MEGASCALE" not in text  # queued resources set multislice up on every worker
    assert "gs://bucket/runs/ms/logs/mod-1-w3.log" in text
    _, text = dry(CASES["multislice_2x_v5e_16_upload_up.txt"])
    lines = text.splitlines()
    assert lines[0] == "git archive --format=tar.gz -o modxla-0123abcd.tar.gz 0123abcd"
    assert [ln.split()[4:7] for ln in lines if " tpu-vm scp " in ln] == [
        ["scp", "modxla-0123abcd.tar.gz", f"mod-{i}:modxla-0123abcd.tar.gz"] for i in (0, 1)
    ]
    assert "git " not in text.split("\n", 1)[1]  # nothing cloned or fetched on the workers
    assert text.index(" tpu-vm scp ") < text.index("tar -xzf modxla-0123abcd.tar.gz")


def test_gke_topologies_match_the_table():
    for name, topology in slices.GKE_TOPOLOGY.items():
        assert tpu.parse_accelerator(name).gke_topology() == topology, name
        assert tpu.parse_accelerator(name).topology == topology, name
    assert tpu.parse_accelerator("v5p-8").gke_topology() == "2x2x1"
    assert tpu.parse_accelerator("v4-8").gke_topology() == "2x2x1"


def test_jobset_uses_the_host_network_and_the_commit():
    _, text = dry(CASES["multislice_2x_v5e_16_jobset.yaml"])
    assert "hostNetwork: true" in text and "dnsPolicy: ClusterFirstWithHostNet" in text
    assert (
        "holds commit $got, not 0123abcd" in text
        and "image: us-docker.pkg.dev/p/r/modxla:deps" in text
    )
    assert "cloud.google.com/gke-tpu-topology: 4x4" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["run", "--accelerator", "v5e-8", "--run-dir", "r", "mesh.data=3"],
            "data x fsdp x expert x tensor = 3 x 1 x 1 x 1 = 3 but there are 8 devices",
        ),
        (
            ["run", "--accelerator", "v5p-64", "--run-dir", "runs/local", "train.batch_size=32"],
            "a multi-host job (8 hosts) needs a shared gs:// run directory",
        ),
        (
            ["run", "--accelerator", "v5e-8", "--run-dir", "r", "train.batch_size=12"],
            "batch_size 12 is not divisible by the batch shards data x fsdp x expert = 8",
        ),
        (
            ["up", *MULTISLICE[:-3], "mesh.fsdp=16", "train.batch_size=32"],
            "mesh.dcn_data is 1 but the job has 2 slices",
        ),
        (["run", "--accelerator", "v5e-6", "--run-dir", "r"], "expected v4-N, v5e-N"),
        (["jobset", *MULTISLICE], "jobset: --image is required"),
        (
            ["jobset", "--image", "i", "--accelerator", "v5p-8", "--slices", "2",
             "--run-dir", "gs://b/r", "mesh.dcn_data=2", "train.batch_size=8"],
            "GKE supports multislice on multi-host TPU slice node pools only",
        ),
    ],
)  # fmt: skip
def test_bad_launches_fail_fast(args, message, capsys):
    lines = []
    code = tpu.main([*args[:1], *COMMON, *args[1:]], out=lines.append)
    assert code == 2 and lines == []  # nothing was run or printed as a command
    assert message in capsys.readouterr().err


def test_checkout_must_be_clean_and_pushed(monkeypatch, capsys):
    base = ["up", "--accelerator", "v5e-8", "--run-dir", "gs://b/r", "--zone", "z",
            "--project", "p", "--dry-run", "--config", "configs/tiny.yaml"]  # fmt: skip
    answers = {"remote": (0, "git@example:x.git"), "rev-parse": (0, "abc123"),
               "status": (0, " M modxla/train.py"), "branch": (0, "")}  # fmt: skip
    monkeypatch.setattr(tpu, "_git", lambda *a: answers[a[0]])
    assert tpu.main(base, out=lambda _: None) == 2
    assert "uncommitted changes" in capsys.readouterr().err
    answers["status"] = (0, "")
    assert tpu.main(base, out=lambda _: None) == 2
    assert "commit abc123 is on no remote branch" in capsys.readouterr().err
    lines = []
    assert tpu.main([*base, "--allow-dirty"], out=lines.append) == 0
    assert (
        "git clone -q https://example/x.git modxla" in lines[2] and "checkout -q abc123" in lines[2]
    )
    answers["remote"] = (2, "")
    assert tpu.main(base, out=lambda _: None) == 2
    assert "--repo is required" in capsys.readouterr().err
    # --upload: no origin needed and HEAD need not be pushed; a dirty tree is still refused
    lines = []
    assert tpu.main([*base, "--upload"], out=lines.append) == 0
    assert lines[0] == "git archive --format=tar.gz -o modxla-abc123.tar.gz abc123"
    assert lines[3].startswith(
        "gcloud compute tpus tpu-vm scp modxla-abc123.tar.gz modxla:modxla-abc123.tar.gz "
    )
    answers["status"] = (0, " M modxla/train.py")
    assert tpu.main([*base, "--upload"], out=lambda _: None) == 2
    assert "uncommitted changes" in capsys.readouterr().err


# --- behaviour, against the fake gcloud -----------------------------------------------------


@pytest.fixture
def fake_gcloud(tmp_path, gcs_emulator):
    """`gcloud` first on PATH: tests/fake_gcloud.py with its state under tmp_path."""
    state = tmp_path / "gcloud"
    (state / "shims").mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for path, script in (
        (bin_dir / "gcloud", ROOT / "tests" / "fake_gcloud.py"),
        (state / "shims" / "python3", ROOT / "tests" / "fake_python3.py"),
    ):
        path.write_text(f'#!/bin/sh\nexec {sys.executable} {script} "$@"\n')
        path.chmod(0o755)
    (state / "shims" / "git").write_text("#!/bin/sh\nexit 0\n")
    (state / "shims" / "git").chmod(0o755)
    (state / "state.json").write_text(json.dumps({"config": {"project": "fake-proj"}}))
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_GCLOUD_STATE": str(state)}
    probe = subprocess.run(["bash", "-c", "command -v gcloud"], env=env, capture_output=True)
    assert probe.stdout.decode().strip() == str(bin_dir / "gcloud")  # never the real SDK

    def launch(script: dict, *args, timeout=300):
        st = json.loads((state / "state.json").read_text())
        (state / "state.json").write_text(json.dumps({**st, "script": script}))
        return subprocess.run(
            [sys.executable, "launch/tpu.py", *args],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def popen(script: dict, *args):
        st = json.loads((state / "state.json").read_text())
        (state / "state.json").write_text(json.dumps({**st, "script": script}))
        return subprocess.Popen(
            [sys.executable, "launch/tpu.py", *args], cwd=ROOT, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    launch.popen = popen
    launch.shims = state / "shims"
    launch.state = lambda: json.loads((state / "state.json").read_text())
    launch.homes = lambda: sorted((state / "vms").glob("*/w*"))
    yield launch
    for pid_file in (state / "vms").glob("*/w*/*.pid"):  # nothing left running
        try:
            os.killpg(int(pid_file.read_text()), 9)
        except (ProcessLookupError, ValueError):
            pass


def fake_args(name, accelerator, run_dir, *extra):
    return [
        "up", "--name", name, "--zone", "fake-zone", "--accelerator", accelerator,
        "--config", "configs/tiny.yaml", "--run-dir", run_dir, "--repo", str(ROOT),
        "--commit", "0123abcd", "--poll", "1", "--retry-wait", "0", "--wait-timeout", "120",
        "--host-timeout", "60", *TINY, *extra,
    ]  # fmt: skip


def calls(state, verb):
    return [c for c in state["calls"] if c[:4] == ["compute", "tpus", "queued-resources", verb]]


@pytest.mark.slow
def test_preemption_recreates_and_resumes_to_the_uninterrupted_losses(
    fake_gcloud, uninterrupted_losses, data_cache
):
    url = "gs://modxla-test/runs/launch-preempted"
    script = {"waiting_polls": 2, "preempt_on_log": "checkpoint step 4 ->"}
    args = fake_args("pre", "v5e-8", url, f"data.cache_dir={data_cache}", *RESUME_STEPS)
    launched = time.time()
    proc = fake_gcloud(script, *args)
    returned = time.time()
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "SUSPENDED (preempted)" in proc.stderr and "retry 1/3" in proc.stderr
    state = fake_gcloud.state()
    assert state["preemptions"] == 1
    assert len(calls(state, "create")) == 2  # recreated once
    assert len(calls(state, "delete")) == 2  # the preempted slice, then the finished one
    assert state["qr"] == {}  # nothing left billing
    text = gcs().cat_file(url.removeprefix("gs://") + "/metrics.jsonl").decode()
    got = {r["step"]: r["loss"] for r in map(json.loads, text.splitlines()) if "loss" in r}
    assert sorted(got) == sorted(uninterrupted_losses)
    for step, loss in uninterrupted_losses.items():
        assert got[step] == pytest.approx(loss, rel=0, abs=1e-6), step
    log = gcs().cat_file(url.removeprefix("gs://") + "/logs/pre-w0.log").decode()
    assert "resuming from gs://modxla-test/runs/launch-preempted/checkpoints/step_0000000" in log
    # every VM came with a leftover process and a libtpu lockfile: both gone at each start
    starts = [json.loads(x) for h in fake_gcloud.homes() for x in (h / "starts.jsonl").open()]
    assert len(starts) == 2
    assert all(not s["leftover_alive"] and not s["lockfile"] for s in starts)
    goodput_adds_up(url + "/goodput.jsonl", launched, returned)


def goodput_adds_up(path, launched, returned):
    """Goodput of a preempted and recreated run: both attempts' records, within the launch,
    and every second of each attempt's wall-clock given to productive steps or one cause."""
    from modxla.analysis.goodput import read_records, summarize

    records = read_records(path)
    s = summarize(records)
    first, second = s["attempts"]
    assert first["cause"].startswith("unknown") and second["cause"] == "finished"
    assert second["resumed_at"] in (4, 8) and second["last_step"] == 12
    # the records are the trainers' clocks, within the launcher's call (same machine)
    times = [r["time"] for r in records]
    assert launched <= min(times) and max(times) <= returned
    assert s["wall_s"] + s["between_attempts_s"] == pytest.approx(max(times) - min(times))
    for row in (first, second, s):
        assert row["wall_s"] > 0 and row["productive_s"] > 0
        parts = row["productive_s"] + sum(row["badput_s"].values())
        assert parts == pytest.approx(row["wall_s"], rel=0, abs=1e-6)  # floats of time.time()
    # steps: each of the 12 counted productive once; those redone after the resume are lost
    assert s["productive_steps"] == 12
    assert s["lost_steps"] == max(0, first["last_step"] - second["resumed_at"])


@pytest.mark.slow
def test_a_crashed_host_stops_the_others_without_a_recreate(fake_gcloud, data_cache):
    script = {"workers": {"crash-w0": "hang", "crash-w1": "crash"}}
    # --crash-grace: the slice stays ACTIVE, so the launcher would wait its default 60 s
    # before calling it a crash (test_launch_pod checks that wait on a virtual clock)
    args = fake_args("crash", "v5p-16", "gs://modxla-test/runs/launch-crash", "--crash-grace", "3")
    t0 = time.time()
    proc = fake_gcloud(script, *args)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "host crash-w1 crashed; stopped every host (no recreate)" in proc.stderr
    assert "RuntimeError: simulated crash on crash-w1" in proc.stderr  # its log tail
    state = fake_gcloud.state()
    assert len(calls(state, "create")) == 1 and len(calls(state, "delete")) == 1
    hung = next(
        json.loads(x) for h in fake_gcloud.homes() for x in (h / "starts.jsonl").open()
        if json.loads(x)["host"] == "crash-w0"
    )  # fmt: skip
    stat = Path(f"/proc/{hung['pid']}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    assert time.time() - t0 < 120


@pytest.mark.slow
def test_training_outlives_the_launcher_and_up_reattaches(fake_gcloud):
    script = {"workers": {"dis-w0": "succeed"}}
    args = fake_args("dis", "v5e-8", "gs://modxla-test/runs/launch-disconnect")
    first = fake_gcloud.popen(script, *args)
    t0 = time.time()
    while not list(fake_gcloud.homes()) or not (fake_gcloud.homes()[0] / "starts.jsonl").exists():
        assert first.poll() is None and time.time() - t0 < 120
        time.sleep(0.2)
    first.kill()  # the launching machine goes away mid-run
    first.wait()
    (home,) = fake_gcloud.homes()
    (start,) = [json.loads(x) for x in (home / "starts.jsonl").open()]
    assert Path(f"/proc/{start['pid']}").exists()  # still training, detached
    proc = fake_gcloud(script, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training is already running on the slice: watching it" in proc.stderr
    assert len((home / "starts.jsonl").read_text().splitlines()) == 1  # not restarted
    state = fake_gcloud.state()
    assert len(calls(state, "create")) == 1 and state["qr"] == {}


@pytest.mark.slow
def test_upload_sets_up_and_trains_with_no_git_on_the_workers(fake_gcloud):
    # the workers' git fails as for a private repository; --upload copies the tree instead
    shims = fake_gcloud.shims
    (shims / "git").write_text(f'#!/bin/sh\necho "git $*" >> {shims}/git-calls\n{PRIVATE_GIT}\n')
    script = {"workers": {"upl-w0": "succeed"}}
    args = fake_args("upl", "v5e-8", "gs://modxla-test/runs/launch-upload", "--upload")
    proc = fake_gcloud(script, *args, "--commit", "HEAD")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training finished" in proc.stderr
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    (home,) = fake_gcloud.homes()
    tree = home / "modxla"  # was a link to this checkout: replaced by the uploaded tree
    assert not tree.is_symlink() and (tree / "COMMIT").read_text() == f"{head}\n"
    committed = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{head}:launch/worker.py"], capture_output=True
    ).stdout
    assert (tree / "launch" / "worker.py").read_bytes() == committed
    assert not list(home.glob("modxla-*.tar.gz"))  # extracted, then removed
    assert not (shims / "git-calls").exists()  # no git ran on the worker
    (start,) = [json.loads(x) for x in (home / "starts.jsonl").open()]
    assert start["host"] == "upl-w0"
    state = fake_gcloud.state()
    assert [c[3] for c in state["calls"] if c[2:4] == ["tpu-vm", "scp"]] == ["scp"]
    assert state["qr"] == {}


def test_failed_while_waiting_is_a_clear_error(fake_gcloud):
    t0 = time.time()
    proc = fake_gcloud({"fail_while_waiting": True}, *fake_args("fail", "v5e-8", "gs://b/r"))
    assert proc.returncode == 1
    assert "error: queued resource fail FAILED while waiting for capacity" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.time() - t0 < 30  # not the 120 s --wait-timeout
    state = fake_gcloud.state()
    assert not [c for c in state["calls"] if "ssh" in c]  # nothing ran on a failed slice
    assert ["config", "get-value", "project"] in state["calls"]  # --project from gcloud config
    assert all("--project=fake-proj" in c for c in state["calls"] if c[0] == "compute")


def test_a_refused_create_is_a_clear_error(fake_gcloud):
    script = {"create_error": "RESOURCE_EXHAUSTED: Quota 'TPUV5P' exceeded"}
    proc = fake_gcloud(script, *fake_args("quota", "v5e-8", "gs://b/r"))
    assert proc.returncode == 1
    assert "error: could not create quota" in proc.stderr and "exceeded" in proc.stderr
    assert len(calls(fake_gcloud.state(), "create")) == 1  # no retry loop on a refusal


def test_local_simulation_trains_with_a_scaled_pod_mesh(tmp_path, data_cache):
    run_dir = tmp_path / "sim"
    proc = subprocess.run(
        [
            "launch/local.sh",
            "--accelerator",
            "v5p-64",
            "--config",
            "configs/tiny.yaml",
            "--run-dir",
            str(run_dir),
            "--local-devices",
            "8",
            *TINY,
            f"data.cache_dir={data_cache}",
            "mesh.fsdp=4",
            "mesh.tensor=2",
            "train.steps=3",
            "train.log_every=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mesh (4, 4, 1, 2) -> 8 CPU devices" in proc.stdout
    cfg = (run_dir / "config.yaml").read_text()
    assert "data: 1\n  fsdp: 4\n  expert: 1\n  tensor: 2" in cfg
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 3]


def test_local_overrides_halve_the_pod_mesh_axis_by_axis():
    from launch.slices import local_overrides

    # v5p-64 (32 chips) as data 2 x fsdp 4 x expert 2 x tensor 2, on 8 CPU devices
    assert local_overrides((2, 4, 2, 2), 8) == [
        "mesh.data=1",
        "mesh.fsdp=2",
        "mesh.expert=2",
        "mesh.tensor=2",
        "mesh.dcn_data=1",
    ]
    assert local_overrides((1, 1, 16, 2), 4)[:4] == [
        "mesh.data=1",
        "mesh.fsdp=1",
        "mesh.expert=2",
        "mesh.tensor=2",
    ]
