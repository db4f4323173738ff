"""Shared fixtures and helpers. XLA runs on the CPU with 8 virtual devices (set before
torch_xla loads)."""

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("PJRT_DEVICE", "CPU")
_THREADS_SET = "OMP_NUM_THREADS" in os.environ
os.environ.setdefault("CPU_NUM_DEVICES", "8")
# Test models are tiny: compiling dominates, executing does not. LLVM at -O0 halves the
# suite's XLA compile time (inherited by the training subprocesses); HLO passes still run.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import pytest  # noqa: E402
import torch  # noqa: E402
import torch_xla  # noqa: E402

from modxla.config import load_config  # noqa: E402

# The autograd engine sizes its per-device queues at the first backward pass; the XLA devices
# must exist by then, or an XLA backward after a CPU one fails inside the engine.
torch_xla.device()


def pytest_configure(config):
    """One intra-op thread pool per core: with every xdist worker (and its training
    subprocesses) using all cores, eager torch's spinning OpenMP threads made tiny eager runs
    5-9x slower. Set in the controller, which knows the worker count (-n); the workers
    inherit it."""
    if _THREADS_SET:
        return
    workers = getattr(config.option, "numprocesses", None)
    workers = workers if isinstance(workers, int) and workers > 0 else 1
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for the subprocesses
    torch.set_num_threads(threads)


def tiny_overrides(**kw) -> list[str]:
    base = {
        "model.vocab_size": 128,
        "model.d_model": 64,
        "model.num_layers": 2,
        "model.num_heads": 4,
        "model.max_seq_len": 64,
        "model.mod.capacity": 0.25,
        "model.mod.every": 2,
        "model.mod.predictor_hidden": 16,
        "data.seq_len": 32,
    }
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def pytest_collection_modifyitems(items):
    """A test that trains (it uses the shared data cache) is slow: `make test-fast` skips it."""
    for item in items:
        if "data_cache" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def tiny_cfg():
    """Factory: a tiny MoD config, with dotted overrides as keyword arguments."""

    def make(**kw):
        return load_config(None, tiny_overrides(**kw))

    return make


def shared_once(tmp_path_factory, name: str, build) -> Path:
    """A folder `name` that build(folder) fills once per test run: the xdist workers share
    it (their base temps have one parent), the others wait for the first one's build."""
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent
    path, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            build(path)
            done.touch()
    return path


def _build_data(path: Path) -> None:
    from modxla.data import build_streams

    cfg = load_config("configs/tiny.yaml", [*TINY, f"data.cache_dir={path}"])
    build_streams(cfg.data, cfg.model.vocab_size, progress=False)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One tokenizer and packed corpus (TINY's) for every training test of the run."""
    return str(shared_once(tmp_path_factory, "data_cache", _build_data))


# --- training helpers shared by the trainer, checkpoint, launcher and tool tests ---------

ROOT = Path(__file__).parent.parent
TINY = [
    "model.vocab_size=384",
    "model.max_seq_len=64",
    "data.seq_len=32",
    "data.max_chars=400000",
    "train.batch_size=8",
    "train.eval_every=0",
]


def run(args, devices, timeout=600, check=True):
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(devices)}
    proc = subprocess.run(
        [sys.executable, *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


def train_args(run_dir, data_cache, *extra, config="configs/tiny.yaml"):
    """`python -m modxla.train` arguments for a tiny run on the session's cached data."""
    return [
        "-m",
        "modxla.train",
        "--config",
        config,
        "--run-dir",
        str(run_dir),
        *TINY,
        f"data.cache_dir={data_cache}",
        *extra,
    ]


def read_metrics(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def cpu_trainer(tmp_path, data_cache, name, *over):
    """Train in-process on the native CPU device (no XLA compile); returns (trainer, losses)."""
    from modxla.io.logger import MetricsLogger
    from modxla.train.trainer import Trainer

    cfg = load_config(
        "configs/tiny.yaml",
        [*TINY, f"data.cache_dir={data_cache}", "train.device=cpu", "train.log_every=1", *over],
    )
    t = Trainer(cfg, tmp_path / name)
    t.history = t.fit(MetricsLogger(t.run_dir, cfg.train.steps, 0, enabled=False))
    return t, [h["loss"] for h in t.history if "loss" in h]


from tests.gcs_emulator import (  # noqa: E402, F401 (the session's GCS emulator)
    gcs_emulator,
    uninterrupted_losses,
)
