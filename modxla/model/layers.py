"""Transformer building blocks: RMSNorm, RoPE, causal attention, MLP, and the block's delta f."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modxla.config import ModelConfig
from modxla.model.moe import MoEMLP


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).type_as(x) * self.weight


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate (B, H, T, hd) by the given original positions (B, T); rotate-half convention."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd))
    ang = positions.to(torch.float32)[:, None, :, None] * inv_freq  # (B, 1, T, hd/2)
    cos, sin = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def attention_mask(
    valid_q: torch.Tensor | None,
    valid_k: torch.Tensor,
    pos_q: torch.Tensor,
    pos_k: torch.Tensor,
) -> torch.Tensor:
    """Boolean (B, 1, Tq, Tk) mask: causal by original position, invalid keys hidden.

    A slot always sees itself, so a query whose every key is invalid still has a finite
    softmax; such a query's output is discarded by its caller (valid_q is False).
    """
    causal = pos_k[:, None, :] <= pos_q[:, :, None]  # (B, Tq, Tk)
    mask = causal & valid_k[:, None, :]
    if valid_q is not None and pos_q.shape[1] == pos_k.shape[1]:
        eye = torch.eye(pos_q.shape[1], dtype=torch.bool, device=pos_q.device)
        mask = mask | eye
    return mask[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.num_heads, self.head_dim, self.theta = cfg.num_heads, cfg.head_dim, cfg.rope_theta
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor):
        q = rope(self._heads(self.wq(x)), positions, self.theta)
        k = rope(self._heads(self.wk(x)), positions, self.theta)
        return q, k, self._heads(self.wv(x))

    def attend(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of q over (k, v); mask None = causal over equal lengths, or, for a
        single query (decoding), every key given."""
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b, _, t, _ = o.shape
        return self.wo(o.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x, positions, mask=None) -> torch.Tensor:
        return self.attend(*self.qkv(x, positions), mask)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, f = cfg.d_model, cfg.ffn_dim
        self.kind = cfg.mlp
        self.w1 = nn.Linear(d, f, bias=False)
        self.w3 = nn.Linear(d, f, bias=False) if cfg.mlp == "swiglu" else None
        self.w2 = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is not None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class BlockDelta(nn.Module):
    """f of a pre-norm block: attention + MLP (or the MoE), returning the delta only."""

    def __init__(self, cfg: ModelConfig, moe: bool = False) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MoEMLP(cfg) if moe else MLP(cfg)

    def mlp_delta(self, x: torch.Tensor, a: torch.Tensor, valid=None, routing="topk"):
        h = self.mlp_norm(x + a)
        return a + (self.mlp(h, valid, routing) if isinstance(self.mlp, MoEMLP) else self.mlp(h))

    def forward(self, x, positions, mask=None, valid=None, routing: str = "topk") -> torch.Tensor:
        """valid (B, T): the tokens an MoE MLP gives expert slots (None: all); routing: the
        model's mode, which an expert-choice MoE follows."""
        a = self.attn(self.attn_norm(x), positions, mask)
        return self.mlp_delta(x, a, valid, routing)


class DenseBlock(nn.Module):
    """An ordinary transformer block: x + f(x) on every token."""

    routed = False

    def __init__(self, cfg: ModelConfig, moe: bool = False) -> None:
        super().__init__()
        self.f = BlockDelta(cfg, moe)

    def forward(self, x, positions, routing: str = "topk"):
        return x + self.f(x, positions, routing=routing), None
