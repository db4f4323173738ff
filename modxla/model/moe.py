"""Mixture-of-Experts MLP: a router per layer, static per-sequence expert buffers (B, E, C, D).

Token choice (Switch top-1, GShard top-2): each token picks top_k of the E + N choices, N
being parameter-free no-op experts (integrated MoDE). A choice's slot in its expert's buffer
is its rank among the sequence's choices of that expert in position order (a cumsum); those
past C are dropped. A dropped or no-op choice adds nothing, so the block passes the token's
residual through. Slots depend on earlier positions only: one sequence decoded alone can
equal the full forward. `valid` (B, n) marks the tokens that take slots (a causal MoD buffer's
empty slots do not: which tokens fill them depends on the future). `step` is the decoding
form: one token per row, each expert's slots used so far carried in a (B, E) count.

Expert choice: each expert takes its top-C tokens of the sequence by router probability, kept
in position order (the routing family MoD uses); a token may be taken by several or none.
Top-C over the sequence looks at the future, so, as for MoD, a predictor (model.moe.predictor:
an MLP on stop_gradient(h), (B, n, E) logits, trained by BCE on top-C membership) gives the
causal rule: in the causal routing modes expert e takes the tokens whose logit e is above the
layer's threshold, the first C of them in position order (overflow dropped, counted), `valid` tokens
only, with the router probability as gate as in training. That holds in `router` mode too:
the mode names how MoD blocks decide, and an expert-choice router has no per-token rule of
its own (its softmax is over experts, while top-C membership depends on how a token's
probability ranks among the sequence's, and no loss trains it as a classifier). `step`
decodes it with the same (B, E) slot counts as token choice.

C = round(capacity_factor * n * top_k / (E + N)) per sequence of n tokens. Dispatch and combine
are one flat row index per slot (index_add / index_select), as in MoD's block: static shapes,
no one-hot (B, n, E, C) tensor. The expert axis of the buffer and of the weights (E, ...) is
the one an `expert` mesh axis can shard.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modxla.config import ModelConfig, MoEConfig
from modxla.model.predict import Predictor, causal_slots


def expert_capacity(moe: MoEConfig, n: int) -> int:
    """Slots per expert and sequence of n tokens: a Python int, so XLA sees one shape."""
    total = moe.experts + moe.noop_experts
    return max(1, min(n, int(round(moe.capacity_factor * n * moe.top_k / total))))


@dataclass
class MoEInfo:
    """One MoE layer's decisions, token-major, for tests and tools.

    Token choice: K = top_k choices per token. Expert choice: K = E, choice e is expert e and
    `kept` says whether expert e took the token.
    """

    router_logits: torch.Tensor  # (B, n, E + N) float32
    expert: torch.Tensor  # (B, n, K) expert index of each choice (>= E: a no-op expert)
    gate: torch.Tensor  # (B, n, K) combine weight
    kept: torch.Tensor  # (B, n, K) bool, processed by a real expert within its capacity
    capacity: int  # C
    # expert choice: (B, n, E) top-C membership (the predictor's target), the predictor's
    # logits on stop_gradient(h) (None without one), and (B, E) tokens each expert's
    # decisions wanted (C in topk mode; more than C on overflow in the causal modes)
    target: torch.Tensor | None = None
    predictor_logits: torch.Tensor | None = None
    decided: torch.Tensor | None = None


class MoEMLP(nn.Module):
    """delta = sum over a token's kept choices of gate * expert_e(h); 0 for the others."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        moe, d, f = cfg.moe, cfg.d_model, cfg.ffn_dim
        self.moe = moe
        self.num_experts = moe.experts
        self.router = nn.Linear(d, moe.experts + moe.noop_experts, bias=False)  # one per layer
        self.w1 = nn.Parameter(torch.empty(moe.experts, d, f))  # (E, D, F)
        self.w3 = nn.Parameter(torch.empty(moe.experts, d, f)) if cfg.mlp == "swiglu" else None
        self.w2 = nn.Parameter(torch.empty(moe.experts, f, d))  # (E, F, D)
        for p in (self.router.weight, self.w1, self.w3):
            if p is not None:
                nn.init.normal_(p, 0.0, cfg.init_std)
        nn.init.normal_(self.w2, 0.0, cfg.init_std / math.sqrt(2 * cfg.num_layers))
        mod = cfg.mod  # the predictor's shape is MoD's, with one output per expert
        self.predictor = (
            Predictor(d, mod.predictor_hidden, mod.predictor_input == "normed", moe.experts)
            if moe.routing == "expert" and moe.predictor
            else None
        )
        # causal decision: logit > threshold, the same for every expert
        self.thresholds = {"predictor": 0.0}
        # This forward's losses and stats, taken (and cleared) by the Transformer: the block
        # interface (out, RoutingInfo | None) has no place for them.
        self.terms: dict[str, torch.Tensor] = {}
        self.info: MoEInfo | None = None  # this forward's decisions, taken with the terms
        # Set by the SPMD layer (modxla/parallel/sharding.py) to lay the (B, E, C, D) expert
        # buffers out over the mesh; the model itself knows no mesh.
        self.pin_buffer: Callable[[torch.Tensor], None] | None = None

    def experts(self, xs: torch.Tensor) -> torch.Tensor:
        """Every expert on its own buffer: (B, E, C, D) -> (B, E, C, D)."""
        if self.pin_buffer is not None:
            self.pin_buffer(xs)
        h = torch.einsum("becd,edf->becf", xs, self.w1)
        if self.w3 is not None:
            h = F.silu(h) * torch.einsum("becd,edf->becf", xs, self.w3)
        else:
            h = F.gelu(h, approximate="tanh")
        out = torch.einsum("becf,efd->becd", h, self.w2)
        if self.pin_buffer is not None:
            self.pin_buffer(out)
        return out

    def forward(self, h, valid: torch.Tensor | None = None, routing: str = "topk"):
        delta, self.info, self.terms = self.route(h, valid, routing)
        return delta

    def route(self, h: torch.Tensor, valid: torch.Tensor | None = None, routing: str = "topk"):
        """h (B, n, D), the normed MLP input -> (delta (B, n, D), MoEInfo, terms).

        valid (B, n) bool: the tokens that take expert slots (None: all; expert choice: in
        the causal modes). routing: the model's mode; token choice is causal in every mode,
        expert choice takes its top-C in topk mode, else decides by its predictor."""
        if self.moe.routing == "expert":
            return self._expert_choice(h, valid, routing)
        return self._token_choice(h, valid)

    def step(self, h: torch.Tensor, used: torch.Tensor, capacity: int, take=None):
        """Decoding, one token per row: h (B, 1, D), used (B, E) slots each expert filled so
        far in the row's sequence -> (delta (B, 1, D), used after this token).

        A choice is kept while its expert has a free slot of the `capacity` C of the full
        forward at the trained length, so the sequence decoded token by token equals that
        forward, overflow included. Rows with `take` (B,) False keep nothing and count
        nothing. Only the chosen experts' weights are read; no topk (XLA:CPU fails to lower
        one inside a conditional's branch). Expert choice: `_expert_choice_step`."""
        if self.moe.routing == "expert":
            return self._expert_choice_step(h, used, capacity, take)
        b, _, d = h.shape
        e, k = self.num_experts, self.moe.top_k
        probs = self.router(h[:, 0]).float().softmax(-1)  # (B, E + N)
        gate, expert = _top(probs, k)  # (B, K), largest first as topk
        if k > 1:  # GShard: the chosen gates sum to 1
            gate = gate / gate.sum(-1, keepdim=True)
        real = expert.clamp(max=e - 1)  # a no-op choice reads expert E-1 and keeps nothing
        kept = (expert < e) & (used.gather(1, real) < capacity)  # (B, K)
        if take is not None:
            kept = kept & take[:, None]
        used = used + (F.one_hot(real, e) * kept[..., None].long()).sum(1)  # (B, E)
        rows = real.flatten()  # (B*K,)
        xs = h.expand(b, k, d).reshape(b * k, 1, d)  # (B*K, 1, D)
        z = torch.bmm(xs, self.w1.index_select(0, rows))  # (B*K, 1, F)
        if self.w3 is not None:
            z = F.silu(z) * torch.bmm(xs, self.w3.index_select(0, rows))
        else:
            z = F.gelu(z, approximate="tanh")
        y = torch.bmm(z, self.w2.index_select(0, rows)).view(b, k, d)
        delta = (y * (gate * kept)[..., None].to(y.dtype)).sum(1)  # (B, D)
        return delta[:, None].to(h.dtype), used

    def _token_choice(self, h, valid=None):
        b, n, d = h.shape
        e, k = self.num_experts, self.moe.top_k
        c = expert_capacity(self.moe, n)
        logits = self.router(h).float()  # (B, n, E + N)
        probs = logits.softmax(-1)
        gate, expert = probs.topk(k, dim=-1)  # (B, n, K)
        if k > 1:  # GShard: the chosen gates sum to 1
            gate = gate / gate.sum(-1, keepdim=True)
        # Position-major (token t's choices before token t+1's): a slot depends on the past only.
        onehot = F.one_hot(expert, logits.shape[-1]).flatten(1, 2)  # (B, n*K, E + N)
        counted = onehot
        if valid is not None:  # invalid tokens take no slot
            counted = onehot * valid[:, :, None].expand(b, n, k).reshape(b, n * k, 1)
        slot = ((counted.cumsum(1) * onehot).sum(-1) - 1).view(b, n, k)  # rank within expert
        kept = (slot < c) & (expert < e)  # no-op experts have no buffer
        if valid is not None:
            kept = kept & valid[:, :, None]
        # Flat row in a (B*E*C + 1, D) buffer; the extra last row takes every unkept choice.
        batch = torch.arange(b, device=h.device)[:, None, None]
        dest = torch.where(kept, (batch * e + expert) * c + slot, b * e * c).flatten()
        src = h.unsqueeze(2).expand(b, n, k, d).reshape(-1, d)  # (B*n*K, D)
        buf = h.new_zeros(b * e * c + 1, d).index_add(0, dest, src)
        y = self.experts(buf[:-1].view(b, e, c, d)).reshape(-1, d)  # (B*E*C, D)
        y = torch.cat([y, y.new_zeros(1, d)]).index_select(0, dest).view(b, n, k, d)
        delta = (y * (gate * kept)[..., None].to(y.dtype)).sum(2)  # (B, n, D)
        noop = expert >= e
        # Switch: (E + N) * sum_e f_e * P_e, f_e the fraction of choices given to e
        share, mean_prob = onehot.float().mean((0, 1)), probs.mean((0, 1))  # (E + N,) each
        terms = {
            "balance_loss": logits.shape[-1] * (share * mean_prob).sum(),
            "z_loss": torch.logsumexp(logits, -1).pow(2).mean(),
            # fractions of the n*K choices: routed + dropped + noop = 1
            "routed_frac": kept.float().mean(),
            "dropped_frac": (~kept & ~noop).float().mean(),
        }
        if self.moe.noop_experts:
            terms["noop_frac"] = noop.float().mean()
        return delta.to(h.dtype), MoEInfo(logits, expert, gate, kept, c), terms

    def _expert_choice_step(self, h, used, capacity: int, take=None):
        """Expert choice decoding: expert e takes the token while its predictor logit is
        above the threshold and e has a free slot of C, as the causal full forward decides
        in position order. Every expert runs on the row (static shapes); the untaken ones
        are weighted 0."""
        if self.predictor is None:
            raise ValueError(_NEEDS_PREDICTOR)
        x = h[:, 0]  # (B, D)
        gate = self.router(x).float().softmax(-1)  # (B, E), as the full forward's
        kept = (self.predictor.rows(x) > self.thresholds["predictor"]) & (used < capacity)
        if take is not None:
            kept = kept & take[:, None]
        b, e = kept.shape
        y = self.experts(h[:, None].expand(b, e, 1, h.shape[-1]))[:, :, 0]  # (B, E, D)
        delta = (y * (gate * kept)[..., None].to(y.dtype)).sum(1)  # (B, D)
        return delta[:, None].to(h.dtype), used + kept.long()

    def _expert_choice(self, h, valid=None, routing: str = "topk"):
        b, n, d = h.shape
        e = self.num_experts
        c = expert_capacity(self.moe, n)
        logits = self.router(h).float()  # (B, n, E)
        probs = logits.softmax(-1)
        by_expert = probs.transpose(1, 2)  # (B, E, n)
        top = by_expert.topk(c, dim=-1).indices  # (B, E, C)
        target = torch.zeros_like(by_expert).scatter(2, top, 1.0).transpose(1, 2)  # (B, n, E)
        p = self.predictor(h.detach()) if self.predictor is not None else None  # (B, n, E)
        if routing == "topk":
            idx, ok = top.sort(-1).values, None  # (B, E, C) position order
            decided = torch.full((b, e), c, device=h.device)
        else:  # causal: each expert's first C decided tokens, in position order
            if p is None:
                raise ValueError(_NEEDS_PREDICTOR)
            decide = p > self.thresholds["predictor"]  # (B, n, E)
            if valid is not None:  # an empty slot of a MoD buffer takes no expert slot
                decide = decide & valid[:, :, None]
            idx, ok = causal_slots(decide.transpose(1, 2).flatten(0, 1), c)  # (B*E, C)
            idx, ok = idx.view(b, e, c), ok.view(b, e, c)
            decided = decide.sum(1)  # (B, E)
        gate = by_expert.gather(2, idx)  # (B, E, C)
        if ok is not None:  # slots past the decided count hold tokens weighted 0
            gate = gate * ok
        rows = (idx + n * torch.arange(b, device=h.device)[:, None, None]).flatten()
        xs = h.flatten(0, 1).index_select(0, rows).view(b, e, c, d)
        y = self.experts(xs) * gate[..., None].to(h.dtype)
        delta = h.new_zeros(b * n, d).index_add(0, rows, y.flatten(0, 2).to(h.dtype))
        if ok is None:
            taken = target > 0
        else:
            taken = torch.zeros_like(by_expert).scatter(2, idx, ok.float()).transpose(1, 2) > 0
        routed = taken.any(-1).float()  # (B, n) taken by at least one expert
        terms = {
            "balance_loss": logits.new_zeros(()),  # trained in topk mode: all C slots full
            "z_loss": torch.logsumexp(logits, -1).pow(2).mean(),
            "routed_frac": routed.mean(),  # fractions of tokens
            "dropped_frac": 1 - routed.mean(),
        }
        if p is not None:  # against top-C membership, as MoD's predictor against top-k
            terms["predictor_bce"] = F.binary_cross_entropy_with_logits(p, target)
            terms["predictor_acc"] = ((p > 0).float() == target).float().mean()
        expert = torch.arange(e, device=h.device).expand(b, n, e)
        info = MoEInfo(logits, expert, probs, taken, c, target, p, decided)
        return delta.view(b, n, d), info, terms


_NEEDS_PREDICTOR = (
    "causal routing of an expert-choice MoE (model.moe.routing: expert) decides by its "
    "predictor: it needs model.moe.predictor: true (or modxla-train-predictor on the run)"
)


def _top(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(probs, k) over the last axis as k maxima: values and indices (..., k)."""
    values, indices = [], []
    for _ in range(k):
        v, i = probs.max(-1)
        values.append(v)
        indices.append(i)
        probs = probs.masked_fill(F.one_hot(i, probs.shape[-1]) > 0, -1.0)
    return torch.stack(values, -1), torch.stack(indices, -1)
