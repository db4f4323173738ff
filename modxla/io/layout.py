"""State-dict layouts of a model: unrolled (`blocks.{i}.*`) and scanned (`layers.{j}.*`, stacked
over the P periods: `layers.{j}.<rest>[p]` is `blocks.{p * N + j}.<rest>`). A checkpoint
written in either layout loads into a model of the other.
"""

from __future__ import annotations

import re

import torch

from modxla.model.scan import STACKED

_UNROLLED = re.compile(r"^blocks\.(\d+)\.(.+)$")


_STACKED = re.compile(r"^layers\.(\d+)\.(.+)$")


def is_stacked(keys) -> bool:
    return any(k.startswith(STACKED) for k in keys)


def to_stacked(state: dict, unit: int) -> dict:
    """Unrolled state dict (`blocks.{i}.*`) -> stacked (`layers.{j}.*` of shape (P, ...))."""
    out, groups = {}, {}
    for key, value in state.items():
        m = _UNROLLED.match(key)
        if m is None:
            out[key] = value
            continue
        i = int(m.group(1))
        groups.setdefault(f"{STACKED}{i % unit}.{m.group(2)}", {})[i // unit] = value
    for key, by_period in groups.items():
        out[key] = torch.stack([by_period[p] for p in range(len(by_period))])
    return _ordered(out)


def to_unrolled(state: dict, unit: int) -> dict:
    """Stacked state dict (`layers.{j}.*`) -> unrolled (`blocks.{p * unit + j}.*`)."""
    out = {}
    for key, value in state.items():
        m = _STACKED.match(key)
        if m is None:
            out[key] = value
            continue
        j, rest = int(m.group(1)), m.group(2)
        for p in range(value.shape[0]):
            out[f"blocks.{p * unit + j}.{rest}"] = value[p].clone()
    return _ordered(out)


def _ordered(state: dict) -> dict:
    """Model order: embed, then blocks/layers by index (stable within one), then the rest."""

    def rank(key: str):
        m = _UNROLLED.match(key) or _STACKED.match(key)
        if key.startswith("embed."):
            return (0, 0)
        return (1, int(m.group(1))) if m else (2, 0)

    return dict(sorted(state.items(), key=lambda kv: rank(kv[0])))


def convert_state(state: dict, unit: int, scan: bool) -> dict:
    """A model state dict in either layout -> the layout `scan` asks for."""
    if is_stacked(state) == scan:
        return state
    return to_stacked(state, unit) if scan else to_unrolled(state, unit)
