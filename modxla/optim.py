"""AdamW with decoupled weight decay (none on norms and biases) and warmup + cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn

from modxla.config import OptimizerConfig


def lr_at(step: int, cfg: OptimizerConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def state_template(
    model: nn.Module, cfg: OptimizerConfig, params: list[torch.Tensor] | None = None
) -> dict:
    """An AdamW state_dict with every slot present (CPU zeros), to load a checkpoint into.

    AdamW creates its state lazily at the first step; a checkpoint needs the full layout.
    `params`: the tensors in the checkpoint's index order (default: this model's own).
    """
    opt = build_optimizer(model, cfg)
    template = opt.state_dict()
    if params is None:
        params = [p for g in opt.param_groups for p in g["params"]]  # state_dict's order
    template["state"] = {
        i: {
            "step": torch.zeros(()),
            "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": torch.zeros_like(p),
        }
        for i, p in enumerate(params)
    }
    return template


def restore_state(opt: torch.optim.Optimizer, model: nn.Module, state: dict, shard_like) -> None:
    """Load an optimizer state_dict; each moment is sharded like its parameter.

    `shard_like(tensor, spec_of_param_name)`: e.g. a Runtime's, bound to the model's specs.
    """
    opt.load_state_dict(state)
    for name, p in model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            if p in opt.state and key in opt.state[p]:
                shard_like(opt.state[p][key], name)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
