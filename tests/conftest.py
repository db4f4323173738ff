"""Shared fixtures. XLA runs on the CPU with 8 virtual devices (set before torch_xla loads)."""

import os

os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("CPU_NUM_DEVICES", "8")

import pytest  # noqa: E402
import torch_xla  # noqa: E402

from modxla.config import load_config  # noqa: E402

# The autograd engine sizes its per-device queues at the first backward pass; the XLA devices
# must exist by then, or an XLA backward after a CPU one fails inside the engine.
torch_xla.device()


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


@pytest.fixture
def tiny_cfg():
    """Factory: a tiny MoD config, with dotted overrides as keyword arguments."""

    def make(**kw):
        return load_config(None, tiny_overrides(**kw))

    return make


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One tokenizer and packed corpus for every training test of the session."""
    return str(tmp_path_factory.mktemp("data_cache"))


from tests.gcs_emulator import (  # noqa: E402, F401 (the session's GCS emulator)
    gcs_emulator,
    uninterrupted_losses,
)
