"""Divergence guard: a non-finite loss, or one far above its recent median, never reaches a
checkpoint.

The check is XLA-friendly: the compiled step itself updates a small device tensor `health`
([diverged steps, last bad loss, first bad step, steps]), so nothing is read back per step.
The host reads it where it already syncs: in the logging closure (which reads the loss
anyway) and before every checkpoint (a save copies the state to the host anyway). So `stop`
halts at the first log step or save after the divergence, before anything is written.

`skip` (train.on_divergence=skip) undoes a diverged step on the device instead: parameters
and AdamW moments are put back with `torch.where`, at the cost of holding one copy of them
during the step (twice the parameter + moment memory); the count is logged as
`skipped_steps`. The thresholds: a loss above `divergence_factor` x the median of the last
`divergence_window` logged losses (0 = non-finite only).
"""

from __future__ import annotations

import math
import statistics
from collections import deque

import torch

from modxla.config import TrainConfig
from modxla.errors import DivergenceError
from modxla.train.step import train_step

MIN_HISTORY = 5  # logged losses before the median test starts


def guarded_step(model, opt, batch, grad_clip, dtype, health, limit, skip: bool):
    """`train_step` plus the divergence test; returns (stats, health)."""
    if skip:
        params = [p for p in model.parameters() if p.requires_grad]
        saved = [p.detach().clone() for p in params]
        moments = [
            {k: v.detach().clone() for k, v in opt.state[p].items() if k != "step"} for p in params
        ]
    stats = train_step(model, opt, batch, grad_clip, dtype)
    loss = stats["loss"]
    bad = ~torch.isfinite(loss) | ~torch.isfinite(stats["grad_norm"]) | (loss > limit)
    if skip:
        with torch.no_grad():
            for p, old, mom in zip(params, saved, moments, strict=True):
                p.copy_(torch.where(bad, old, p))
                for key in ("exp_avg", "exp_avg_sq"):  # absent before the first step: zeros
                    new = opt.state[p][key]
                    new.copy_(torch.where(bad, mom.get(key, torch.zeros_like(new)), new))
    badf = bad.float()
    first = torch.where((health[0] == 0) & bad, health[3] + 1, health[2])
    health = torch.stack(
        [health[0] + badf, torch.where(bad, loss.float(), health[1]), first, health[3] + 1]
    )
    return stats, health


class DivergenceGuard:
    """Host side of the guard: the median window, the limit, and the stop decision."""

    def __init__(self, cfg: TrainConfig, step: int, device) -> None:
        self.mode = cfg.on_divergence
        self.factor = cfg.divergence_factor
        self.recent: deque[float] = deque(maxlen=cfg.divergence_window)
        self.device = device
        self.health = torch.tensor([0.0, 0.0, 0.0, float(step)]).to(device)
        self._limit_value = math.inf
        self.limit = torch.tensor(math.inf).to(device)
        self.problem: str | None = None  # set once a diverged step is seen (stop mode)

    @property
    def skip(self) -> bool:
        return self.mode == "skip"

    def observe(self, loss: float, health: torch.Tensor) -> dict:
        """At a log step (in the step closure): update the median window, return metrics."""
        h = [float(x) for x in health.cpu()]
        out = {"skipped_steps": h[0]} if self.skip else {}
        self._judge(h)
        if math.isfinite(loss) and loss <= self._limit_value:
            self.recent.append(loss)
        if self.factor > 0 and len(self.recent) >= min(MIN_HISTORY, self.recent.maxlen):
            value = self.factor * statistics.median(self.recent)
            if value != self._limit_value:
                self._limit_value = value
                self.limit = torch.tensor(value).to(self.device)  # device data, no recompile
        return out

    def check(self) -> None:
        """Before a checkpoint: raise if any step so far diverged (stop mode)."""
        self._judge([float(x) for x in self.health.cpu()])
        if self.problem:
            raise DivergenceError(self.problem)

    def _judge(self, h: list[float]) -> None:
        if self.mode != "stop" or h[0] == 0 or self.problem:
            return
        why = (
            "non-finite"
            if not math.isfinite(h[1])
            else f"above {self._limit_value:.4g} = train.divergence_factor {self.factor} x the "
            "median of the recent logged losses"
        )
        self.problem = (
            f"training diverged at step {int(h[2])}: loss {h[1]:.4g} ({why}); stopped before "
            "writing any checkpoint, the saved ones are untouched. Resume from the newest with "
            "a lower optimizer.lr, or set train.on_divergence=skip"
        )
