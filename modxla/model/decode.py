"""Incremental decoding with causal routing and a static-shape KV cache.

The cache has one slot per position (B, H, S, hd) in every block and a validity mask (B, S).
A dense block writes every token. A routed block writes a token only if it routes it, so a
skipped token never enters that block's cache; unwritten slots stay masked. A routed block
also keeps the count of tokens it processed, so that the capacity k = round(C * S) drops the
same overflow as a full-sequence forward of length S in the same mode. The position is a
tensor: every step runs the same compiled graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modxla.model.mod import MoDBlock, capacity_k
from modxla.model.transformer import Transformer


@dataclass
class KVCache:
    k: list[torch.Tensor]  # per block (B, H, S, hd)
    v: list[torch.Tensor]
    valid: list[torch.Tensor]  # per block (B, S) bool: slot written
    count: list[torch.Tensor]  # per block (B,) tokens processed (routed blocks)

    @classmethod
    def empty(cls, model: Transformer, batch: int, length: int, device=None) -> KVCache:
        cfg = model.cfg
        shape = (batch, cfg.num_heads, length, cfg.head_dim)
        dtype = model.embed.weight.dtype
        n = cfg.num_layers
        return cls(
            k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
            v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
            valid=[torch.zeros(batch, length, dtype=torch.bool, device=device) for _ in range(n)],
            count=[torch.zeros(batch, dtype=torch.long, device=device) for _ in range(n)],
        )

    @property
    def length(self) -> int:
        return self.k[0].shape[2]


def _block_step(block, cache: KVCache, i: int, x, pos, routing: str):
    """One token (B, 1, D) at positions pos (B,) through block i; updates the cache."""
    b = x.shape[0]
    s = cache.length
    onehot = torch.arange(s, device=x.device)[None, :] == pos[:, None]  # (B, S)
    if isinstance(block, MoDBlock):
        r = block.router_logits(x)  # (B, 1)
        if routing == "predictor":
            decide = block.predictor(x)[:, 0] > 0
        else:
            decide = r[:, 0] > 0
        k = capacity_k(block.capacity, s)
        take = decide & (cache.count[i] < k)  # (B,)
        weight = r[:, 0]
    else:
        take = torch.ones(b, dtype=torch.bool, device=x.device)
        weight = None
    f = block.f
    h = f.attn_norm(x)
    q, k_new, v_new = f.attn.qkv(h, pos[:, None])  # (B, H, 1, hd), RoPE at the true position
    write = (onehot & take[:, None])[:, None, :, None]  # (B, 1, S, 1)
    cache.k[i] = torch.where(write, k_new, cache.k[i])
    cache.v[i] = torch.where(write, v_new, cache.v[i])
    cache.valid[i] = cache.valid[i] | (onehot & take[:, None])
    cache.count[i] = cache.count[i] + take.long()
    seen = torch.arange(s, device=x.device)[None, :] <= pos[:, None]
    mask = (cache.valid[i] & seen) | onehot  # own slot keeps a skipped query's softmax finite
    a = f.attn.attend(q, cache.k[i], cache.v[i], mask[:, None, None, :])
    delta = f.mlp_delta(x, a)  # (B, 1, D)
    if weight is None:
        return x + delta
    return torch.where(take[:, None, None], x + weight[:, None, None] * delta, x)


@torch.no_grad()
def decode_step(
    model: Transformer, cache: KVCache, tokens: torch.Tensor, pos: torch.Tensor, routing: str
) -> torch.Tensor:
    """Logits (B, V) for tokens (B,) at positions pos (B,), given the cache of earlier ones."""
    if routing not in ("predictor", "router") and model.cfg.routed_layers:
        raise ValueError(f"decoding needs a causal routing mode, got {routing!r}")
    x = model.embed(tokens[:, None])  # (B, 1, D)
    for i, block in enumerate(model.blocks):
        x = _block_step(block, cache, i, x, pos, routing)
    x = model.norm(x)
    w = model.embed.weight if model.head is None else model.head.weight
    return torch.nn.functional.linear(x[:, 0], w)
