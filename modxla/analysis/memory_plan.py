"""Per-device memory of a train step, predicted from a config, mesh, remat and dtype without
building anything on a device (modxla-plan-memory prints it; tests check it against
modxla.xla.memory.compiled_memory, XLA's own buffer assignment).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from modxla.config import Config
from modxla.model.mod import capacity_k
from modxla.model.moe import expert_capacity


@dataclass
class Plan:
    """Bytes per device for one train step."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    devices: int
    mesh: tuple[int, int, int, int]  # (data, fsdp, expert, tensor)
    hbm: int = 0
    params_total: int = 0

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations

    @property
    def fits(self) -> bool | None:
        return None if not self.hbm else self.total <= self.hbm

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(total=self.total, fits=self.fits)
        return d


def _sharded_numel(shape, spec, mesh: dict[str, int]) -> int:
    if spec is None:
        return math.prod(shape)
    n = 1
    for size, axis in zip(shape, spec, strict=True):
        ways = mesh.get(axis, 1) if axis else 1
        n *= -(-size // ways)
    return n


def param_bytes_per_device(cfg: Config, mesh: dict[str, int]) -> tuple[int, int]:
    """(parameter numel per device, total numel) from the model built on the meta device."""
    from modxla.model import build_model
    from modxla.parallel.sharding import param_spec

    with torch.device("meta"):
        model = build_model(cfg.model)
    per_dev = total = 0
    for name, p in model.named_parameters():
        per_dev += _sharded_numel(p.shape, param_spec(name, p.ndim), mesh)
        total += p.numel()
    return per_dev, total


def activation_bytes(cfg: Config, batch: int, remat: str) -> int:
    """Activation bytes per device kept for the backward of one micro-batch of `batch` sequences.

    Per token and block, without remat, the backward reads about 20 d_model-sized and 4
    d_ff-sized tensors (norm inputs/outputs, q/k/v before and after RoPE, attention output,
    MLP up/gate/activation, residual sums) plus 2 H x n attention score matrices (scores,
    probabilities).
    A routed block keeps those for its k tokens and a few (B, T) router tensors. With 'block'
    remat a block keeps only its input; one block's full set is live again while it is
    recomputed. The logits (float32) count once: the fused cross entropy
    (modxla.model.transformer.lm_loss) writes their gradient over them, and with remat they
    are gone before the first recompute. Expert weights come in through the built model
    (param_bytes_per_device); an MoE layer keeps its experts' activations at capacity.
    """
    m, t = cfg.model, cfg.data.seq_len
    width = 2 if cfg.train.dtype == "bfloat16" else 4
    d, f, h = m.d_model, m.ffn_dim, m.num_heads
    routed = set(m.routed_layers)
    k = capacity_k(m.mod.capacity, t)

    moe_layers, moe = set(m.moe_layers), m.moe

    def block(n: int, i: int) -> int:  # elements per sequence kept by block i's f over n tokens
        if i not in moe_layers:
            return n * (20 * d + 4 * f) + 2 * h * n * n
        # MoE: the MLP's 4 F-sized tensors for every expert slot, the slots' input and output
        # buffers (2 D each), the K gathered outputs per token, and the router's (n, E + N)
        # logits, probabilities, one-hot and cumsum.
        slots = moe.experts * expert_capacity(moe, n)
        per_token = 20 * d + moe.top_k * d + 4 * (moe.experts + moe.noop_experts)
        return n * per_token + slots * (4 * f + 2 * d) + 2 * h * n * n

    per_block = []
    for i in range(m.num_layers):
        if i in routed:
            per_block.append(block(k, i) + 8 * t + 2 * k * d)
        else:
            per_block.append(block(t, i))
    unit = m.scan_unit if m.scan else 1  # a scanned model recomputes a whole unit at once
    logits = t * m.vocab_size * 4  # float32; the fused cross entropy's gradient overwrites them
    if remat == "none":
        kept = sum(per_block) * width + logits  # everything is live at the loss
    else:  # the logits are gone before the first recompute
        recompute = max(sum(per_block[i : i + unit]) for i in range(0, m.num_layers, unit))
        kept = m.num_layers // unit * t * d * width + max(recompute * width, logits)
    return batch * (kept + 4 * t * d * 4)


def plan(cfg: Config, devices: int, hbm: int = 0) -> Plan:
    """Per-device memory of cfg's train step on `devices` chips with cfg's mesh and remat."""
    from modxla.parallel.mesh import AXES, batch_shards, check_batch, resolve_mesh_shape

    shape = resolve_mesh_shape(cfg.mesh, devices)
    check_batch(cfg.train.batch_size, shape)
    mesh = dict(zip(AXES, shape, strict=True))
    per_dev, total = param_bytes_per_device(cfg, mesh)
    moment = getattr(torch, cfg.optimizer.moment_dtype).itemsize  # float32 | bfloat16
    batch = cfg.train.batch_size // batch_shards(shape)
    return Plan(
        parameters=per_dev * 4,
        gradients=per_dev * 4,
        optimizer=per_dev * 2 * moment,
        activations=activation_bytes(cfg, batch, cfg.train.remat),
        devices=devices,
        mesh=shape,
        hbm=hbm,
        params_total=total,
    )
