"""AdamW with decoupled weight decay (none on norms and biases), its state as checkpoint
tensors, and its state converted between the unrolled and scanned layouts."""

from __future__ import annotations

import torch
from torch import nn

from modxla.config import OptimizerConfig
from modxla.io.layout import convert_state, is_stacked

MOMENT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def decays(name: str) -> bool:
    """Weight decay for matrices, not for norms or biases (by name: stacked norms are 2-D)."""
    return not name.endswith(("norm.weight", ".bias"))


def param_groups(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) in the optimizer's order: decayed first, then the rest."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [(n, p) for n, p in named if decays(n)] + [(n, p) for n, p in named if not decays(n)]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW. On XLA its step count lives on the device (capturable) and set_lr makes the
    learning rate a device tensor: nothing that changes per step is a Python number, so the
    traced step (modxla/replay.py) can be replayed without tracing it again."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if decays(n)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in named if not decays(n)], "weight_decay": 0.0},
    ]
    kw = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    if cfg.moment_dtype == "float32":
        # torch's foreach AdamW is not capturable on XLA; the per-tensor one is.
        xla = any(p.device.type == "xla" for _, p in named)
        return torch.optim.AdamW(groups, capturable=xla, foreach=False if xla else None, **kw)
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
                if not st:  # lazily, like torch's AdamW; the step count on the device
                    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    st["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
                st["step"] += 1
                t = st["step"]
                g = p.grad.float()
                m = st["exp_avg"].float().mul_(b1).add_(g, alpha=1 - b1)
                v = st["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                if wd:
                    p.mul_(1 - lr * wd)
                denom = (v / (1 - b2**t)).sqrt_().add_(eps)
                p.sub_(m / denom * (lr / (1 - b1**t)))
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
    The optimizer keeps its own `capturable` and step counts stay on the parameter's device,
    whatever the checkpoint was written with.
    """
    own = [g.get("capturable") for g in opt.param_groups]
    opt.load_state_dict(state)
    for g, capturable in zip(opt.param_groups, own, strict=True):
        if capturable is not None:
            g["capturable"] = capturable
        g["lr"] = float(g["lr"])  # set_lr makes it a device tensor again where needed
    for name, p in model.named_parameters():
        st = opt.state.get(p, {})
        if "step" in st:
            st["step"] = st["step"].to(p.device, torch.float32)
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                shard_like(st[key], name)


def optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """opt.state_dict() with plain-float learning rates (a checkpoint's layout either way)."""
    state = opt.state_dict()
    for g in state["param_groups"]:
        g["lr"] = float(g["lr"])
    return state


def step_state(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor a training step reads or updates in place, in a stable order: parameters,
    buffers, optimizer state, device learning rates (for modxla.replay.TracedStep)."""
    out = [*model.parameters(), *model.buffers()]
    for p in model.parameters():
        st = opt.state.get(p, {})
        out += [st[k] for k in sorted(st) if isinstance(st[k], torch.Tensor)]
    return out + [g["lr"] for g in opt.param_groups if isinstance(g["lr"], torch.Tensor)]


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """On XLA a fresh device scalar (device data, read by the compiled step as an input)."""
    for g in opt.param_groups:
        device = g["params"][0].device if g["params"] else None
        if device is not None and device.type == "xla":
            g["lr"] = torch.tensor(lr, dtype=torch.float32).to(device)
        else:
            g["lr"] = lr


def optimizer_names(param_names) -> list[str]:
    """Parameter names in build_optimizer's order (decayed first), given model order."""
    names = list(param_names)
    return [n for n in names if decays(n)] + [n for n in names if not decays(n)]


def convert_optimizer_state(
    osd: dict, src_names: list[str], dst_names: list[str], unit: int
) -> dict:
    """An AdamW state dict over `src_names` -> one over `dst_names` (both in optimizer order).

    Moments are stacked or split like their parameters; the step count is shared by all.
    """
    scan = is_stacked(dst_names)
    if is_stacked(src_names) == scan:
        return osd
    by_key: dict[str, dict] = {}
    for i, st in osd["state"].items():
        for key, value in st.items():
            by_key.setdefault(key, {})[src_names[int(i)]] = value
    step = next(iter(by_key.pop("step").values())) if "step" in by_key else None
    moved = {key: convert_state(vals, unit, scan) for key, vals in by_key.items()}
    state = {}
    for i, name in enumerate(dst_names):
        if all(name in vals for vals in moved.values()) and moved:
            state[i] = {key: vals[name] for key, vals in moved.items()}
            if step is not None:
                state[i]["step"] = step.clone()
    n_decay = sum(decays(n) for n in dst_names)
    groups = [dict(g) for g in osd["param_groups"]]
    groups[0]["params"] = list(range(n_decay))
    groups[1]["params"] = list(range(n_decay, len(dst_names)))
    return {"state": state, "param_groups": groups}
