"""AdamW with decoupled weight decay (none on norms and biases) and warmup + cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn

from modxla.config import OptimizerConfig

MOMENT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def lr_at(step: int, cfg: OptimizerConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def decays(name: str) -> bool:
    """Weight decay for matrices, not for norms or biases (by name: stacked norms are 2-D)."""
    return not name.endswith(("norm.weight", ".bias"))


def param_groups(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) in the optimizer's order: decayed first, then the rest."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [(n, p) for n, p in named if decays(n)] + [(n, p) for n, p in named if not decays(n)]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if decays(n)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in named if not decays(n)], "weight_decay": 0.0},
    ]
    kw = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    if cfg.moment_dtype == "float32":
        # On XLA torch picks its per-tensor loop; the foreach path is bitwise equal there and
        # ~25 ms faster to trace, which every lazy-tensor step pays again.
        xla = any(p.device.type == "xla" for _, p in named)
        return torch.optim.AdamW(groups, foreach=True if xla else None, **kw)
    return LowPrecisionAdamW(groups, moment_dtype=MOMENT_DTYPES[cfg.moment_dtype], **kw)


class LowPrecisionAdamW(torch.optim.Optimizer):
    """AdamW whose moments are stored in `moment_dtype` (bfloat16 halves optimizer memory).

    Parameters, gradients and the update itself stay float32: moments are widened, updated,
    applied and rounded back. State keys match torch.optim.AdamW (step, exp_avg, exp_avg_sq),
    so checkpoints and the trainer's restore code treat both alike.
    """

    def __init__(self, params, lr, betas, eps, weight_decay=0.0, moment_dtype=torch.bfloat16):
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.moment_dtype = moment_dtype

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:  # lazily, like torch's AdamW (step on the host: no recompiles)
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
                st["step"] += 1
                t = float(st["step"])
                g = p.grad.float()
                m = st["exp_avg"].float().mul_(b1).add_(g, alpha=1 - b1)
                v = st["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                if wd:
                    p.mul_(1 - lr * wd)
                denom = (v / (1 - b2**t)).sqrt_().add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1 - b1**t))
                st["exp_avg"].copy_(m)
                st["exp_avg_sq"].copy_(v)


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
    moments = MOMENT_DTYPES[cfg.moment_dtype]
    template["state"] = {
        i: {
            "step": torch.zeros(()),
            "exp_avg": torch.zeros_like(p, dtype=moments),
            "exp_avg_sq": torch.zeros_like(p, dtype=moments),
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
