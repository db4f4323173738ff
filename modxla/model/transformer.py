"""Decoder-only transformer whose every `every`-th block is a Mixture-of-Depths block."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from modxla.config import ModelConfig
from modxla.model.layers import DenseBlock, RMSNorm
from modxla.model.mod import ROUTING_MODES, MoDBlock, RoutingInfo


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    aux_loss: torch.Tensor  # weighted router BCE + predictor BCE, mean over routed blocks
    router_loss: torch.Tensor  # unweighted router BCE (mean over routed blocks)
    predictor_loss: torch.Tensor  # unweighted predictor BCE (mean over routed blocks)
    routing: list[RoutingInfo] = field(default_factory=list)  # one per routed block


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        routed = set(cfg.routed_layers)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            MoDBlock(cfg) if i in routed else DenseBlock(cfg) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers)  # residual outputs, GPT-2 style
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("attn.wo.weight", "mlp.w2.weight")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(
        self,
        tokens: torch.Tensor,
        routing: str = "topk",
        positions: torch.Tensor | None = None,
    ) -> ModelOutput:
        """tokens (B, T) -> logits (B, T, V). `routing`: topk (training) | predictor | router."""
        if routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")
        b, t = tokens.shape
        if positions is None:
            positions = torch.arange(t, device=tokens.device).expand(b, t)
        x = self.embed(tokens)  # (B, T, D)
        infos: list[RoutingInfo] = []
        for block in self.blocks:
            x, info = block(x, positions, routing)
            if info is not None:
                infos.append(info)
        x = self.norm(x)
        w = self.embed.weight if self.head is None else self.head.weight
        logits = F.linear(x, w)  # (B, T, V)
        router_loss, predictor_loss = self._aux(infos, x)
        mod = self.cfg.mod
        aux = mod.aux_loss_weight * router_loss + mod.predictor_loss_weight * predictor_loss
        return ModelOutput(logits, aux, router_loss, predictor_loss, infos)

    def _aux(self, infos: list[RoutingInfo], like: torch.Tensor):
        zero = like.new_zeros(())
        if not infos:
            return zero, zero
        bce = F.binary_cross_entropy_with_logits
        learned = self.cfg.mod.router == "learned"
        router = sum(bce(i.router_logits, i.topk_mask) for i in infos) / len(infos)
        router = router if learned else zero
        preds = [
            bce(i.predictor_logits, i.topk_mask) for i in infos if i.predictor_logits is not None
        ]
        predictor = sum(preds) / len(preds) if preds else zero
        return router, predictor

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
        return n


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy; logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
