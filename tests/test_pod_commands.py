"""The commands a pod runs, executed by bash: the JobSet's container command and the TPU VM
setup, with `python3` and `git` shims that check what the real tools check
(tests/fake_python3.py, tests/fake_pip.py). No network, no TPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from launch import jobset, worker
from modxla.errors import RESTART
from tests import fake_pip
from tests.conftest import ROOT
from tests.test_launch import CASES, dry


def shims(tmp_path: Path) -> dict:
    """PATH with a recording `python3` (3.10, as the TPU VM images have) and a no-op `git`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(
        f'#!/bin/sh\necho "$PJRT_DEVICE $*" >> {tmp_path}/calls\n'
        'case "$2" in modxla.train) exit 0;; esac\n'  # training itself is not under test
        f'exec {sys.executable} {ROOT}/tests/fake_python3.py "$@"\n'
    )
    (bin_dir / "git").write_text(f'#!/bin/sh\necho "git $*" >> {tmp_path}/calls\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    return {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home)}


def container(tmp_path):
    _, text = dry(CASES["multislice_2x_v5e_16_jobset.yaml"])
    spec = yaml.safe_load(text)["spec"]["replicatedJobs"][0]["template"]["spec"]
    command = spec["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["bash", "-c"]
    image = tmp_path / "workspace"
    image.mkdir()
    return spec, command[2].replace(jobset.IMAGE_CODE, str(image)), image


def test_jobset_container_command_runs(tmp_path):
    env = shims(tmp_path)
    spec, command, image = container(tmp_path)
    (image / "COMMIT").write_text("0123abcd\n")
    proc = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 1 and calls[0].startswith("TPU -m modxla.train --config configs/")
    assert "pip" not in calls[0] and "git" not in calls[0]  # nothing installed at pod start


def test_jobset_refuses_an_image_of_another_commit(tmp_path):
    env = shims(tmp_path)
    _, command, image = container(tmp_path)
    (image / "COMMIT").write_text("fedcba98\n")
    proc = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and not (tmp_path / "calls").exists()
    assert "holds commit fedcba98, not 0123abcd" in proc.stderr


def test_exec_with_assignments_cannot_start():
    # what the container command used to be: bash's exec takes NAME=value as the program
    proc = subprocess.run(["bash", "-c", "set -e; exec PJRT_DEVICE=TPU true"], capture_output=True)
    assert proc.returncode == 127


def test_jobset_failure_policy_follows_the_exit_code_table(tmp_path):
    _, text = dry(CASES["multislice_2x_v5e_16_jobset.yaml"])
    doc = yaml.safe_load(text)["spec"]
    job = doc["replicatedJobs"][0]["template"]["spec"]
    rule = job["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["operator"] == "NotIn"
    assert rule["onExitCodes"]["values"] == sorted(RESTART)
    assert rule["onExitCodes"]["containerName"] == "train"
    assert doc["failurePolicy"]["rules"][0]["onJobFailureReasons"] == ["PodFailurePolicy"]
    assert job["template"]["spec"]["terminationGracePeriodSeconds"] == 600


class A:
    repo, commit = "https://github.com/modxla/modxla.git", "0123abcd"
    config, run_dir, overrides = "configs/tiny.yaml", "runs/x", ["train.steps=2"]


def test_tpu_vm_setup_installs_the_pins_in_a_311_venv(tmp_path):
    env = shims(tmp_path)
    (Path(env["HOME"]) / worker.REPO_DIR).symlink_to(ROOT)  # what the clone would leave
    proc = subprocess.run(
        ["bash", "-c", worker.setup_command(A)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "calls").read_text()
    assert "git checkout -q 0123abcd" in calls
    assert "-m uv pip install -q --python" in calls
    assert (Path(env["HOME"]) / "modxla-venv" / "bin" / "python").exists()
    assert worker.setup_command(A).startswith(f"timeout {worker.SETUP_TIMEOUT_S} ")


def test_pip_install_on_the_images_python_fails_as_pip_would(tmp_path):
    # the setup of before: pip on the image's python3 (3.10) with jax 0.7.1 pinned
    env = shims(tmp_path)
    proc = subprocess.run(
        ["bash", "-c", f"cd {ROOT} && python3 -m pip install -q 'torch==2.9.0' -e ."],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "requires a different Python: 3.10 not in '>=3.11'" in proc.stderr
    assert re.search(r"jax==0\.7\.1 \(Requires-Python >=3\.11", proc.stderr)


def runtime_pythons() -> dict[str, str]:
    """The Python each runtime the launcher can ask for trains with."""
    docker = re.search(r"^FROM python:(\d+\.\d+)", (ROOT / "Dockerfile").read_text(), re.M)
    return {"tpu-vm venv": worker.PYTHON, "gke image": docker[1]}


@pytest.mark.parametrize("runtime", sorted(runtime_pythons()))
def test_every_pin_accepts_the_python_of_every_runtime(runtime):
    python = runtime_pythons()[runtime]
    needs, deps = fake_pip.project_requirements()
    assert python in SpecifierSet(needs)
    checked = {d: fake_pip.requires_python(d) for d in deps if "==" in d}
    assert all(v is not None for v in checked.values()), checked  # every pin is installed here
    bad = {d: v for d, v in checked.items() if v and python not in SpecifierSet(v)}
    assert not bad, f"{runtime} (Python {python}): {bad}"


def test_python_requires_tells_the_truth():
    needs, deps = fake_pip.project_requirements()
    for python in ("3.9", "3.10", "3.11", "3.12", "3.13"):
        pins_ok = all(
            python in SpecifierSet(fake_pip.requires_python(d) or "") for d in deps if "==" in d
        )
        assert (python in SpecifierSet(needs)) == pins_ok, python
