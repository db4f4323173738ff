"""Model code: architecture only (no training, data or device logic)."""

from __future__ import annotations

import torch

from modxla.config import ModelConfig
from modxla.model.mod import ROUTING_MODES, MoDBlock, RoutingInfo, capacity_k
from modxla.model.predict import causal_slots
from modxla.model.transformer import ModelOutput, Transformer, lm_loss

__all__ = [
    "ROUTING_MODES",
    "MoDBlock",
    "ModelOutput",
    "RoutingInfo",
    "Transformer",
    "build_model",
    "capacity_k",
    "causal_slots",
    "lm_loss",
]


def build_model(cfg: ModelConfig, seed: int | None = None) -> Transformer:
    """A freshly initialised model on the CPU; `seed` makes the init reproducible."""
    if seed is None:
        return Transformer(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Transformer(cfg)
