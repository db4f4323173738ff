"""Incremental decoding with causal routing: a routed block skips the work of tokens it skips.

Cache layout, for a sequence of at most S tokens of a model trained at length T (S <= T):
- a dense block keeps one slot per position, (B, H, S, hd); slot t holds token t.
- a routed block keeps only its capacity, k = round(C * T) slots (B, H, k, hd), filled in
  order, with each slot's original position in `pos` (-1 = empty) and the fill count. k comes
  from the trained length T, never from S (the prompt plus the tokens asked for): the model
  only ever saw k = round(C * T) slots, and a k that followed S would make the logits at
  position t depend on how many tokens are asked for. Since a full forward of length T drops
  the routed tokens past the k-th (overflow), so does decoding: position t's logits equal
  those of the full forward at the trained length T (causal routing: they depend on tokens
  0..t only). A sequence longer than T is refused: no k reproduces training there.
- an MoE MLP (model.moe, token choice) keeps `experts`, the slots each of its E experts has
  filled so far in the sequence, (B, E): a choice is kept while its expert has a free slot of
  the full forward's C (at the trained length T; in a routed block, of its k routed tokens),
  dropped after, in position order as there. No-op experts (integrated MoDE) take no slot.
  Expert choice (each expert's top-C tokens of the sequence) is not causal; with its
  predictor (model.moe.predictor) it decodes as the causal full forward decides: expert e
  takes the token while its predictor logit is above the threshold and e has a free slot,
  the same (B, E) counts. Without a predictor, or in topk mode, it is refused.

Execution strategies for a routed block:
- eager (CPU/GPU): a real branch. The causal decision (predictor or router logit) is computed
  first; rows that do not route do no attention or MLP work at all (B = 1: a Python `if`;
  B > 1: only the routing rows are gathered, processed and written back).
- conditional (`cond` given; on XLA modxla.xla.cond.cond, in one graph traced once and
  replayed by modxla.xla.decode.Decoder): the block sits in an HLO conditional, so a step
  where no row routes runs none of its work; at B > 1 the routing rows go through the
  smallest static bucket of (1, 2, 4, ..., B). Measured on XLA:CPU (8 x d256, S256,
  2026-12-02, tools/bench_decode.py): MoD 1.565x dense per token at B=1, 1.60x at B=8.
- static (XLA without `cond`, as before): every row computed, the result selected with
  `torch.where` (MoD 0.88x dense, and tracing every token cost 3.5x the replayed step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modxla.model.mod import MoDBlock, capacity_k
from modxla.model.moe import MoEMLP, expert_capacity
from modxla.model.transformer import Transformer


@dataclass
class KVCache:
    k: list[torch.Tensor]  # per block (B, H, S, hd) dense, (B, H, k, hd) routed
    v: list[torch.Tensor]
    pos: list[torch.Tensor | None]  # routed blocks: (B, k) slot positions, -1 = empty
    count: list[torch.Tensor | None]  # routed blocks: (B,) slots filled
    length: int  # S, the longest sequence the cache serves
    seq_len: int  # T, the length the model was trained at: routed blocks hold round(C*T)
    experts: list[torch.Tensor | None] | None = None  # MoE blocks: (B, E) expert slots used

    @classmethod
    def empty(
        cls,
        model: Transformer,
        batch: int,
        length: int,
        device=None,
        seq_len: int | None = None,
    ) -> KVCache:
        """A cache for `length` tokens of a model trained at `seq_len` (data.seq_len of its
        run; default model.cfg.max_seq_len, the longest sequence a bare model's config
        allows: pass the trained length whenever it is shorter)."""
        cfg = model.cfg
        if cfg.expert_choice and not cfg.moe_predictor_layers:
            raise ValueError(
                "decoding an expert-choice MoE (model.moe.routing: expert) needs its top-C "
                "predictor (model.moe.predictor: true, or modxla-train-predictor on the run): "
                "each expert's top-C tokens of the whole sequence are not causal"
            )
        seq_len = cfg.max_seq_len if seq_len is None else seq_len
        if (cfg.routed_layers or cfg.moe_layers) and length > seq_len:
            what = "routed blocks hold k = round(C * T)" if cfg.routed_layers else "MoE experts"
            raise ValueError(
                f"a cache of {length} tokens exceeds the trained length {seq_len}: {what} "
                f"slots, the capacity they trained with at T = {seq_len}"
            )
        dtype = model.embed.weight.dtype
        k, v, pos, count, experts = [], [], [], [], []
        for block in model.blocks:
            routed = isinstance(block, MoDBlock)
            slots = capacity_k(block.capacity, seq_len) if routed else length
            shape = (batch, cfg.num_heads, slots, cfg.head_dim)
            k.append(torch.zeros(shape, device=device, dtype=dtype))
            v.append(torch.zeros(shape, device=device, dtype=dtype))
            pos.append(torch.full((batch, slots), -1, device=device) if routed else None)
            count.append(torch.zeros(batch, dtype=torch.long, device=device) if routed else None)
            e = block.f.mlp.num_experts if isinstance(block.f.mlp, MoEMLP) else 0
            experts.append(torch.zeros(batch, e, dtype=torch.long, device=device) if e else None)
        return cls(k, v, pos, count, length, seq_len, experts)

    def expert_slots(self, i: int) -> torch.Tensor | None:
        """Block i's (B, E) expert slots used, None without an MoE."""
        return None if self.experts is None else self.experts[i]

    def nbytes(self, layer: int | None = None) -> int:
        """Bytes held for keys, values and slot positions (all blocks, or one)."""
        layers = range(len(self.k)) if layer is None else [layer]
        total = 0
        for i in layers:
            for t in (self.k[i], self.v[i], self.pos[i], self.count[i], self.expert_slots(i)):
                total += 0 if t is None else t.numel() * t.element_size()
        return total


def moe_capacity(block, seq_len: int) -> int:
    """C of the block's MoE in the full forward at the trained length: over its T tokens, or
    in a routed block over its k = round(C_mod * T) routed ones."""
    n = capacity_k(block.capacity, seq_len) if isinstance(block, MoDBlock) else seq_len
    return expert_capacity(block.f.mlp.moe, n)


def _mlp_delta(block, x, a, used, seq_len: int, take=None):
    """f.mlp_delta for one token a row, and the MoE's expert slots used after it (or None)."""
    f = block.f
    if used is None:
        return f.mlp_delta(x, a), None
    delta, used = f.mlp.step(f.mlp_norm(x + a), used, moe_capacity(block, seq_len), take)
    return a + delta, used


def _cached_mlp_delta(block, cache: KVCache, i: int, x, a, take=None):
    """_mlp_delta for block i, its MoE's expert slots (if any) updated in the cache in place
    (a replayed step updates the cache tensors it holds)."""
    used = cache.expert_slots(i)
    delta, new = _mlp_delta(block, x, a, used, cache.seq_len, take)
    if used is not None:
        used.copy_(new)
    return delta


def _dense_step(block, cache: KVCache, i: int, x, pos, seen):
    """Every token through a dense block; writes slot pos of the full-length cache."""
    f = block.f
    q, k_new, v_new = f.attn.qkv(f.attn_norm(x), pos[:, None])  # (B, H, 1, hd), RoPE at pos
    at = pos[:, None, None, None].expand_as(k_new)  # (B, H, 1, hd)
    cache.k[i].scatter_(2, at, k_new)
    cache.v[i].scatter_(2, at, v_new)
    a = f.attn.attend(q, cache.k[i], cache.v[i], seen[:, None, None, :])
    return x + _cached_mlp_delta(block, cache, i, x, a)


def _decide(block: MoDBlock, x, routing: str) -> torch.Tensor:
    """The causal routing decision (B,) for one token (B, 1, D)."""
    if routing == "predictor":
        if block.predictor is None:
            raise ValueError("routing='predictor' needs model.mod.predictor: true")
        return block.predictor.rows(x[:, 0])[:, 0] > block.thresholds["predictor"]
    if block.random:
        raise ValueError("routing='router' needs a learned router")
    return block.router_logits(x)[:, 0] > block.thresholds["router"]


def _weight(block: MoDBlock, x) -> torch.Tensor:
    """r of x + r * f: the router logit, or 1 for random routing (as in MoDBlock.forward)."""
    if block.random:
        return torch.ones(x.shape[0], 1, 1, device=x.device, dtype=x.dtype)
    return block.router_logits(x)[..., None]  # (B, 1, 1)


def _routed_rows(block: MoDBlock, cache: KVCache, i: int, x, pos, rows):
    """Process the routing rows only: x (n, 1, D) at pos (n,) are the batch rows `rows`."""
    f = block.f
    q, k_new, v_new = f.attn.qkv(f.attn_norm(x), pos[:, None])  # (n, H, 1, hd)
    slot = cache.count[i][rows]  # (n,), < k: the caller checked the capacity
    cache.k[i][rows, :, slot] = k_new[:, :, 0]
    cache.v[i][rows, :, slot] = v_new[:, :, 0]
    cache.pos[i][rows, slot] = pos
    cache.count[i][rows] += 1
    mask = cache.pos[i][rows] >= 0  # (n, k): written slots, all at or before pos
    a = f.attn.attend(q, cache.k[i][rows], cache.v[i][rows], mask[:, None, None, :])
    used = cache.expert_slots(i)
    delta, new = _mlp_delta(block, x, a, None if used is None else used[rows], cache.seq_len)
    if used is not None:
        used[rows] = new
    return x + _weight(block, x) * delta


def _routed_one(block: MoDBlock, cache: KVCache, i: int, x, pos, routing: str):
    """Batch of one: a Python branch, and only the filled slots are attended."""
    if not bool(_decide(block, x, routing)[0]):
        return x
    slot = int(cache.count[i][0])
    if slot == cache.k[i].shape[2]:
        return x  # the buffer is full: overflow is dropped, as in the full forward
    f = block.f
    q, k_new, v_new = f.attn.qkv(f.attn_norm(x), pos[:, None])  # (1, H, 1, hd)
    cache.k[i][:, :, slot] = k_new[:, :, 0]
    cache.v[i][:, :, slot] = v_new[:, :, 0]
    cache.pos[i][0, slot] = pos[0]
    cache.count[i] += 1
    n = slot + 1  # slots 0..slot hold this block's routed tokens so far, all at or before pos
    a = f.attn.attend(q, cache.k[i][:, :, :n], cache.v[i][:, :, :n], None)
    return x + _weight(block, x) * _cached_mlp_delta(block, cache, i, x, a)


def _routed_step_eager(block: MoDBlock, cache: KVCache, i: int, x, pos, routing: str):
    """A real branch: rows that skip the block do no attention or MLP work."""
    if x.shape[0] == 1:
        return _routed_one(block, cache, i, x, pos, routing)
    k = cache.k[i].shape[2]
    take = _decide(block, x, routing) & (cache.count[i] < k)  # (B,)
    rows = take.nonzero()[:, 0]
    if rows.numel() == 0:
        return x
    out = x.clone()
    out[rows] = _routed_rows(block, cache, i, x[rows], pos[rows], rows)
    return out


def _routed_step_static(block: MoDBlock, cache: KVCache, i: int, x, pos, routing: str):
    """Static shapes for one XLA graph: every row computed, results selected by `take`."""
    f = block.f
    k = cache.k[i].shape[2]
    count = cache.count[i]
    take = _decide(block, x, routing) & (count < k)  # (B,)
    q, k_new, v_new = f.attn.qkv(f.attn_norm(x), pos[:, None])  # (B, H, 1, hd)
    write = (torch.arange(k, device=x.device)[None, :] == count[:, None]) & take[:, None]
    # in place: a replayed step (modxla/xla/replay.py) updates the cache tensors it holds
    cache.k[i].copy_(torch.where(write[:, None, :, None], k_new, cache.k[i]))
    cache.v[i].copy_(torch.where(write[:, None, :, None], v_new, cache.v[i]))
    cache.pos[i].copy_(torch.where(write, pos[:, None], cache.pos[i]))
    cache.count[i].copy_(count + take.long())
    mask = cache.pos[i] >= 0  # (B, k)
    mask = mask | ~mask.any(-1, keepdim=True)  # a skipped row with an empty cache stays finite
    a = f.attn.attend(q, cache.k[i], cache.v[i], mask[:, None, None, :])
    delta = _cached_mlp_delta(block, cache, i, x, a, take)  # take: skipped rows count 0
    y = x + _weight(block, x) * delta
    return torch.where(take[:, None, None], y, x)


def _process(block: MoDBlock, seq_len: int, x, pos, take, kc, vc, pc, count, used, n, *order):
    """The block on rows x (c, 1, D); rows with take False (bucket padding) change nothing.

    used: the MoE's (c, E) expert slots used, or a stand-in (any tensor) without an MoE."""
    f = block.f
    k = kc.shape[2]
    q, k_new, v_new = f.attn.qkv(f.attn_norm(x), pos[:, None])  # (c, H, 1, hd)
    write = (torch.arange(k, device=x.device)[None, :] == count[:, None]) & take[:, None]
    kc = torch.where(write[:, None, :, None], k_new, kc)  # (c, H, k, hd)
    vc = torch.where(write[:, None, :, None], v_new, vc)
    pc = torch.where(write, pos[:, None], pc)  # (c, k)
    mask = pc >= 0
    mask = mask | ~mask.any(-1, keepdim=True)  # a padding row with an empty cache stays finite
    a = f.attn.attend(q, kc, vc, mask[:, None, None, :])
    moe = isinstance(f.mlp, MoEMLP)
    delta, new = _mlp_delta(block, x, a, used if moe else None, seq_len, take)
    y = torch.where(take[:, None, None], x + _weight(block, x) * delta, x)
    used = new if moe else used
    return y, pos, take, kc, vc, pc, count + take.long(), used, n, *order


def _bucket(block: MoDBlock, seq_len: int, c: int, *state):
    """The first c routing rows gathered, processed and written back: static shape c."""
    x, pos, take, kc, vc, pc, count, used, n, order = state
    rows = order[:c]  # (c,) distinct: the routing rows first
    x_r, pos_r, kc_r, vc_r, pc_r, count_r, used_r = (
        t.index_select(0, rows) for t in (x, pos, kc, vc, pc, count, used)
    )
    take_r = take.long().index_select(0, rows) > 0  # XLA:CPU crashes on a bool index_select
    part = _process(block, seq_len, x_r, pos_r, take_r, kc_r, vc_r, pc_r, count_r, used_r, n)
    x, kc, vc, pc, count, used = (
        t.index_copy(0, rows, p)
        for t, p in zip((x, kc, vc, pc, count, used), (part[0], *part[3:8]), strict=True)
    )
    return x, pos, take, kc, vc, pc, count, used, n, order


def _routed_step_cond(block: MoDBlock, cache: KVCache, i: int, x, pos, routing: str, cond):
    """A conditional per routed block: a step where no row routes runs none of its work.

    B = 1: process the row or not. B > 1: the n routing rows go through the smallest
    bucket c >= n of (1, 2, 4, ..., B), each a static-shape branch, chosen by nested
    conditionals. `cond(pred, true_fn, false_fn, operands)` is modxla.xla.cond.cond on XLA
    (eagerly: a Python if)."""
    k = cache.k[i].shape[2]
    take = _decide(block, x, routing) & (cache.count[i] < k)  # (B,)
    n = take.long().sum(0, keepdim=True)  # (1,): cond operands have rank >= 1
    used = cache.expert_slots(i)
    slots = cache.count[i][:, None] if used is None else used  # without an MoE: a stand-in
    state = (x, pos, take, cache.k[i], cache.v[i], cache.pos[i], cache.count[i], slots, n)
    b = x.shape[0]
    if b > 1:  # rows, routing ones first: a permutation without topk (which a branch of
        # XLA:CPU's conditional fails to lower), built here from cumulative counts
        t = take.long()
        key = torch.where(take, t.cumsum(0) - 1, n + (1 - t).cumsum(0) - 1)  # (B,) 0..B-1
        at = torch.arange(b, device=x.device)
        state += (((key[None, :] == at[:, None]).long() * at[None, :]).sum(1),)  # (B,)
    buckets = [c for c in (2**j for j in range(b.bit_length())) if c < b] + [b]

    def level(j: int):
        c = buckets[j]

        def run(*s):
            t = cache.seq_len
            return _process(block, t, *s) if c == b == 1 else _bucket(block, t, c, *s)

        if j == len(buckets) - 1:
            return run
        return lambda *s: cond(s[8] <= c, run, level(j + 1), s)

    out = cond(n > 0, level(0), lambda *s: s, state)
    held = [cache.k[i], cache.v[i], cache.pos[i], cache.count[i]] + ([] if used is None else [used])
    for t, new in zip(held, out[3 : 3 + len(held)], strict=True):
        t.copy_(new)  # in place: a replayed step updates the cache tensors it holds
    return out[0]


def python_cond(pred, true_fn, false_fn, operands):
    """The eager `cond`: a Python branch (for tests of the conditional path off XLA)."""
    return true_fn(*operands) if bool(pred) else false_fn(*operands)


@torch.no_grad()
def decode_step(
    model: Transformer,
    cache: KVCache,
    tokens: torch.Tensor,
    pos: torch.Tensor,
    routing: str,
    cond=None,
) -> torch.Tensor:
    """Logits (B, V) for tokens (B,) at positions pos (B,), given the cache of earlier ones.

    `cond`: run routed blocks through conditionals (`_routed_step_cond`; on XLA pass
    modxla.xla.cond.cond); None: eagerly a Python branch, on XLA every row and a select."""
    if routing not in ("predictor", "router") and model.cfg.routed_layers:
        raise ValueError(f"decoding needs a causal routing mode, got {routing!r}")
    if routing not in ("predictor", "router") and model.cfg.moe_predictor_layers:
        raise ValueError(
            f"decoding an expert-choice MoE needs a causal routing mode, got {routing!r}: "
            "use routing='predictor' (--routing predictor), its experts' top-C predictor decides"
        )
    x = model.embed(tokens[:, None])  # (B, 1, D)
    seen = torch.arange(cache.length, device=x.device)[None, :] <= pos[:, None]  # (B, S)
    static = x.device.type == "xla"
    routed_step = _routed_step_static if static else _routed_step_eager
    for i, block in enumerate(model.blocks):
        if isinstance(block, MoDBlock) and cond is not None:
            x = _routed_step_cond(block, cache, i, x, pos, routing, cond)
        elif isinstance(block, MoDBlock):
            x = routed_step(block, cache, i, x, pos, routing)
        else:
            x = _dense_step(block, cache, i, x, pos, seen)
    x = model.norm(x)
    w = model.embed.weight if model.head is None else model.head.weight
    return torch.nn.functional.linear(x[:, 0], w)
