"""The pure training and evaluation steps: tensors in, tensors out, no host sync."""

from __future__ import annotations

import contextlib

import torch

from modxla.model import Transformer, lm_loss


def _autocast(device: torch.device, dtype: str):
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(
    model: Transformer,
    opt: torch.optim.Optimizer,
    batch: torch.Tensor,
    grad_clip: float = 1.0,
    dtype: str = "float32",
) -> dict[str, torch.Tensor]:
    """One optimizer step over `batch` (A, B, T+1): A micro-batches accumulated.

    Returns detached scalar tensors: losses averaged over micro-batches, the gradient norm
    before clipping, and per routed block the fraction routed and the predictor's accuracy
    on top-k membership.
    """
    accum = batch.shape[0]
    sums: dict[str, torch.Tensor] = {}
    for micro in batch:  # unrolled into one graph: A is a static Python int
        inputs, targets = micro[:, :-1], micro[:, 1:]
        with _autocast(inputs.device, dtype):
            out = model(inputs)
            lm = lm_loss(out.logits, targets)
            loss = lm + out.aux_loss
        # Every op here is traced again each step on XLA: skip the no-op / 1 and 0 +.
        (loss / accum if accum > 1 else loss).backward()
        stats = {
            "loss": loss,
            "lm_loss": lm,
            "router_loss": out.router_loss,
            "predictor_loss": out.predictor_loss,
        }
        stats.update(out.block_stats)  # routed_frac/blockN, predictor_acc/blockN (scan too)
        for k, v in stats.items():
            v = v.detach().float()
            sums[k] = sums[k] + v / accum if k in sums else (v / accum if accum > 1 else v)
    params = [p for p in model.parameters() if p.grad is not None]
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    opt.step()
    opt.zero_grad(set_to_none=True)
    sums["grad_norm"] = norm.detach()
    return sums


@torch.no_grad()
def eval_step(model: Transformer, batch: torch.Tensor, dtype: str = "float32") -> torch.Tensor:
    """Mean next-token loss of `batch` (B, T+1) with top-k routing."""
    with _autocast(batch.device, dtype):
        out = model(batch[:, :-1])
    return lm_loss(out.logits, batch[:, 1:])
