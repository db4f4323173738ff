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
from tests.test_launch import CASES, PRIVATE_GIT, dry


def shims(tmp_path: Path, git: str = "") -> dict:
    """PATH with a recording `python3` (3.10, as the TPU VM images have; its working folder
    in `cwd`) and a recording `git` that then runs `git` (default: nothing, exit 0)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(
        f'#!/bin/sh\necho "$PJRT_DEVICE $*" >> {tmp_path}/calls\npwd >> {tmp_path}/cwd\n'
        'case "$2" in modxla.train) exit 0;; esac\n'  # training itself is not under test
        f'exec {sys.executable} {ROOT}/tests/fake_python3.py "$@"\n'
    )
    (bin_dir / "git").write_text(f'#!/bin/sh\necho "git $*" >> {tmp_path}/calls\n{git}\n')
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
    repo, commit, upload = "https://github.com/modxla/modxla.git", "0123abcd", False
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


def real_git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_SYSTEM": "/dev/null"}
    ident = ["-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    p = subprocess.run(
        ["git", "-C", str(repo), *ident, *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return p.stdout.strip()


def private_repo(tmp_path: Path) -> tuple[Path, list[str]]:
    """A small git repository with two commits: the second edits a file, deletes another
    and adds one in a subfolder."""
    repo = tmp_path / "private"
    repo.mkdir()
    real_git(repo, "init", "-q")
    (repo / "setup.cfg").write_text("[metadata]\nname = modxla\n")
    (repo / "train.py").write_text("v = 1\n")
    (repo / "old.py").write_text("gone in the second commit\n")
    real_git(repo, "add", "-A")
    real_git(repo, "commit", "-q", "-m", "one")
    first = real_git(repo, "rev-parse", "HEAD")
    (repo / "train.py").write_text("v = 2\n")
    (repo / "old.py").unlink()
    (repo / "pkg").mkdir()
    (repo / "pkg" / "new.py").write_text("x = 0\n")
    real_git(repo, "add", "-A")
    real_git(repo, "commit", "-q", "-m", "two")
    return repo, [first, real_git(repo, "rev-parse", "HEAD")]


class Upload(A):
    upload = True


def test_tpu_vm_upload_setup_runs_no_git(tmp_path):
    # a private repository: git on the worker fails; the uploaded archive needs none
    env = shims(tmp_path, git=PRIVATE_GIT)
    home = Path(env["HOME"])
    older = tmp_path / "older"  # an older tree, linked as fake_gcloud's VMs link theirs
    older.mkdir()
    (older / "stale.py").write_text("")
    (home / worker.REPO_DIR).symlink_to(older)
    repo, commits = private_repo(tmp_path)
    for commit in commits:  # the second replaces the tree of the first
        a = Upload()
        a.commit = commit
        archive = home / worker.archive_name(a)  # where `tpu-vm scp` put it
        real_git(repo, "archive", "--format=tar.gz", "-o", str(archive), commit)
        proc = subprocess.run(
            ["bash", "-c", worker.setup_command(a)],
            cwd=home,  # where ssh starts
            env=env,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        tree = home / worker.REPO_DIR
        assert not tree.is_symlink() and (tree / "COMMIT").read_text() == f"{commit}\n"
        files = {str(f.relative_to(tree)) for f in tree.rglob("*") if f.is_file()}
        assert files == {*real_git(repo, "ls-tree", "-r", "--name-only", commit).split(), "COMMIT"}
        assert not archive.exists() and not (home / f"{worker.REPO_DIR}.new").exists()
    assert (home / worker.REPO_DIR / "train.py").read_text() == "v = 2\n"
    assert (older / "stale.py").exists()  # the old link went, not what it pointed to
    calls = (tmp_path / "calls").read_text()
    assert "git" not in calls  # the shim records any call before failing
    assert "-m uv pip install -q --python" in calls and "-e ." in calls
    assert set((tmp_path / "cwd").read_text().split()) == {str(home / worker.REPO_DIR)}
    assert (home / "modxla-venv" / "bin" / "python").exists()
    assert worker.setup_command(a).startswith(f"timeout {worker.SETUP_TIMEOUT_S} ")


def test_tpu_vm_clone_setup_fails_on_a_private_repository(tmp_path):
    # what --upload fixes: the same worker, cloning instead
    env = shims(tmp_path, git=PRIVATE_GIT)
    proc = subprocess.run(
        ["bash", "-c", worker.setup_command(A)],
        cwd=env["HOME"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 128
    assert "could not read Username for 'https://github.com'" in proc.stderr
    assert (tmp_path / "calls").read_text().startswith(f"git clone -q {A.repo} modxla")
    assert "pip" not in (tmp_path / "calls").read_text()  # set -e: nothing installed


def test_tpu_vm_upload_setup_without_the_archive_fails(tmp_path):
    env = shims(tmp_path, git=PRIVATE_GIT)
    proc = subprocess.run(
        ["bash", "-c", worker.setup_command(Upload)],
        cwd=env["HOME"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "modxla-0123abcd.tar.gz" in proc.stderr
    assert not (tmp_path / "calls").exists()


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
