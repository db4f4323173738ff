"""TPU launcher: golden commands, validation, the preemption retry loop, local simulation."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import tpu
from tests.test_train import ROOT, TINY, read_metrics, train_args

GOLDEN = Path(__file__).parent / "golden"
COMMON = [
    "--commit",
    "0123abcd",
    "--name",
    "mod",
    "--zone",
    "us-east5-a",
    "--project",
    "proj",
    "--logs",
    "logs",
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
    "multislice_2x_v5e_16_jobset.yaml": ["jobset", *MULTISLICE],
}


def dry(args):
    lines = []
    code = tpu.main([*args[:1], *COMMON, *args[1:]], runner=tpu.Runner(True, lines.append))
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
    assert text.count("--worker=") == 1 + 8  # setup on all workers, then one ssh per host
    _, text = dry(CASES["multislice_2x_v5e_16_up.txt"])
    assert "--node-count=2 --node-prefix=mod" in text
    for s in (0, 1):
        assert text.count(f"MEGASCALE_SLICE_ID={s} ") == 4  # 4 hosts per v5e-16 slice
    assert len({line.split(" > ")[1] for line in text.splitlines() if " > logs/" in line}) == 8


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["run", "--accelerator", "v5e-8", "--run-dir", "r", "mesh.data=3"],
            "data x fsdp x tensor = 3 x 1 x 1 = 3 but there are 8 devices",
        ),
        (
            ["run", "--accelerator", "v5p-64", "--run-dir", "runs/local", "train.batch_size=32"],
            "a multi-host job (8 hosts) needs a shared gs:// run directory",
        ),
        (
            ["run", "--accelerator", "v5e-8", "--run-dir", "r", "train.batch_size=12"],
            "batch_size 12 is not divisible by the batch shards data x fsdp = 8",
        ),
        (
            ["up", *MULTISLICE[:-3], "mesh.fsdp=16", "train.batch_size=32"],
            "mesh.dcn_data is 1 but the job has 2 slices",
        ),
        (["run", "--accelerator", "v5e-6", "--run-dir", "r"], "expected v4-N, v5e-N"),
    ],
)
def test_bad_launches_fail_fast(args, message, capsys):
    lines = []
    code = tpu.main([*args[:1], *COMMON, *args[1:]], runner=tpu.Runner(True, lines.append))
    assert code == 2 and lines == []  # nothing was run or printed as a command
    assert message in capsys.readouterr().err


class PreemptedOnce(tpu.Runner):
    """Runs the training of each host locally; the first attempt is killed mid-run."""

    def __init__(self, train_args, preempt_after_step):
        super().__init__(dry_run=True, out=lambda _: None)
        self.train_args, self.preempt_at, self.attempts, self.log = (
            train_args,
            preempt_after_step,
            0,
            [],
        )

    def __call__(self, cmd, log=None):
        self.log.append(cmd[:5])
        return 0

    def parallel(self, cmds):
        self.attempts += 1
        env = {"PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "2", "PATH": "/usr/bin:/bin"}
        proc = subprocess.Popen(
            [sys.executable, *self.train_args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if self.attempts == 1:
            marker = Path(self.train_args[5]) / "checkpoints" / f"step_{self.preempt_at:08d}"
            while not (marker / "COMPLETE").exists():
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.2)  # poll, do not spin: the training needs the CPU
            proc.kill()  # the slice went away
        proc.wait()
        self.stderr = proc.stderr.read()  # the last attempt's
        proc.stderr.close()
        return proc.returncode


def test_retry_loop_resumes_after_a_preemption(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    train = train_args(
        run_dir, data_cache, "train.steps=8", "checkpoint.every=4", "train.log_every=1"
    )
    runner = PreemptedOnce(train, preempt_after_step=4)
    args = tpu.parse(
        [
            "up",
            *COMMON[:-3],
            "--accelerator",
            "v5e-8",
            "--retry-wait",
            "0",
            "--run-dir",
            str(run_dir),
        ]
    )
    code = tpu.up(args, tpu.parse_accelerator("v5e-8"), runner, sleep=lambda s: None)
    assert code == 0, runner.stderr[-3000:]
    assert runner.attempts == 2
    assert "resuming from" in runner.stderr and "step_00000004" in runner.stderr
    deletes = [c for c in runner.log if c[3:5] == ["queued-resources", "delete"]]
    assert len(deletes) == 1  # the broken slice was deleted and recreated once
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == list(range(1, 9))


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
    assert "mesh (4, 4, 2) -> 8 CPU devices" in proc.stdout
    cfg = (run_dir / "config.yaml").read_text()
    assert "data: 1\n  fsdp: 4\n  tensor: 2" in cfg
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 3]
