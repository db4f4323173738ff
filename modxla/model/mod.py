"""The Mixture-of-Depths block: router, static top-k capacity buffer, causal routing modes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from modxla.config import ModelConfig
from modxla.model.layers import BlockDelta, attention_mask
from modxla.model.predict import Predictor, causal_slots

ROUTING_MODES = ("topk", "predictor", "router")


def capacity_k(capacity: float, seq_len: int) -> int:
    """Static buffer size k = round(C * T), at least 1: a Python int, so XLA sees one shape."""
    return max(1, min(seq_len, int(round(capacity * seq_len))))


@dataclass
class RoutingInfo:
    """What one routed block decided, for losses, metrics and tests."""

    router_logits: torch.Tensor  # (B, T) raw router output r
    topk_mask: torch.Tensor  # (B, T) float, 1 for the top-k of r (the training target)
    predictor_logits: torch.Tensor | None  # (B, T), on stop_gradient(x)
    routed_mask: torch.Tensor  # (B, T) float, 1 for tokens processed in this forward
    idx: torch.Tensor  # (B, k) buffer positions, ascending
    valid: torch.Tensor  # (B, k) bool, False for empty slots (causal modes)
    decided: torch.Tensor  # (B,) tokens the routing wanted to process (>= routed on overflow)


class MoDBlock(nn.Module):
    """x_i + r_i * f(X~)_i for the k routed tokens, x_i for the rest."""

    routed = True

    def __init__(self, cfg: ModelConfig, moe: bool = False) -> None:
        super().__init__()
        self.capacity = cfg.mod.capacity
        self.random = cfg.mod.router == "random"
        self.f = BlockDelta(cfg, moe)  # staged MoDE: the MoE sees the k routed tokens only
        # One router per block, never shared; random routing has none to learn.
        self.router = None if self.random else nn.Linear(cfg.d_model, 1, bias=False)
        self.predictor = (
            Predictor(cfg.d_model, cfg.mod.predictor_hidden, cfg.mod.predictor_input == "normed")
            if cfg.mod.predictor
            else None
        )
        # causal decision: logit > threshold; 0 unless calibrated (modxla/routing/calibration.py)
        self.thresholds = {"predictor": 0.0, "router": 0.0}

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.random:
            w = torch.randn(x.shape[-1], device=x.device, dtype=x.dtype)  # fresh every step
            return x.detach() @ w
        if x.device.type == "xla":
            # A multiply and a sum, not a (B*T, D) x (D, 1) matmul: XLA:CPU fuses that matmul's
            # weight gradient with a transpose of x into a strided loop (7.5 ms per block and
            # step at B8 x T256 x d256; this: under 0.5 ms). Same FLOPs, same parameter.
            # (A custom backward with the weight gradient as one einsum measured slower.)
            return (x * self.router.weight[0].to(x.dtype)).sum(-1)  # (B, T)
        return self.router(x).squeeze(-1)

    def select(self, x: torch.Tensor, routing: str):
        """Router and predictor logits, the top-k target, and the buffer for this mode."""
        b, t, _ = x.shape
        k = capacity_k(self.capacity, t)
        r = self.router_logits(x)
        topk_idx = torch.topk(r, k, dim=1).indices  # (B, k)
        topk_mask = torch.zeros_like(r).scatter(1, topk_idx, 1.0)
        p = self.predictor(x.detach())[..., 0] if self.predictor is not None else None
        if routing == "topk":
            idx = torch.sort(topk_idx, dim=1).values  # causal order kept
            valid = torch.ones_like(idx, dtype=torch.bool)
            decided = torch.full((b,), k, device=x.device)
        else:
            if routing == "predictor" and p is None:
                raise ValueError("routing='predictor' needs model.mod.predictor: true")
            if routing == "router" and self.random:
                raise ValueError("routing='router' needs a learned router")
            decide = (p if routing == "predictor" else r) > self.thresholds[routing]
            idx, valid = causal_slots(decide, k)
            decided = decide.sum(1)
        return r, topk_mask, p, idx, valid, decided

    def forward(self, x, positions, routing: str = "topk"):
        b, t, d = x.shape
        r, topk_mask, p, idx, valid, decided = self.select(x, routing)
        # Whole rows of D, gathered and scatter-added by one flat index per token: the
        # (B, k, D) expanded index of torch.gather/scatter_add lowers on XLA to one index
        # vector per element (B*k*D of them), built and walked in the forward and backward.
        rows = (idx + t * torch.arange(b, device=x.device)[:, None]).flatten()  # (B*k,)
        xs = x.flatten(0, 1).index_select(0, rows).view(b, -1, d)  # (B, k, D)
        pos = torch.gather(positions, 1, idx)  # original positions, for RoPE
        mask = None if routing == "topk" else attention_mask(valid, valid, pos, pos)
        # causal modes: empty slots take no expert slot of a staged MoDE's MoE (which tokens
        # fill them depends on the future), so the forward stays causal for decoding
        delta = self.f(xs, pos, mask, None if routing == "topk" else valid, routing)  # (B, k, D)
        w = torch.ones_like(pos, dtype=x.dtype) if self.random else torch.gather(r, 1, idx)
        if routing != "topk":  # top-k fills every slot: no empty ones to zero
            w = w * valid.to(x.dtype)
        upd = (delta * w[..., None]).to(x.dtype)  # autocast: delta and r may be bf16, x is not
        out = x.flatten(0, 1).index_add(0, rows, upd.flatten(0, 1))
        out = out.view(b, t, d)  # x + scatter_add of r * f, row by row
        if routing == "topk":  # the buffer holds exactly the top-k: no second scatter
            routed = topk_mask
        else:
            routed = torch.zeros_like(topk_mask).scatter(1, idx, valid.to(topk_mask.dtype))
        return out, RoutingInfo(r, topk_mask, p, routed, idx, valid, decided)
