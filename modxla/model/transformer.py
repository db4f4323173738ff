"""Decoder-only transformer whose every `every`-th block is a Mixture-of-Depths block."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from modxla.config import ModelConfig
from modxla.model.layers import DenseBlock, RMSNorm
from modxla.model.mod import ROUTING_MODES, MoDBlock, RoutingInfo
from modxla.model.moe import MoEInfo
from modxla.model.scan import block_terms, run_block, stack_blocks, stack_terms


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    aux_loss: torch.Tensor  # weighted router + predictor BCE (routed blocks), MoE balance + z
    router_loss: torch.Tensor  # unweighted router BCE (mean over routed blocks)
    # unweighted predictor BCE, mean over routed blocks and expert-choice MoE predictors
    predictor_loss: torch.Tensor
    routing: list[RoutingInfo] = field(default_factory=list)  # one per routed block (not scan)
    block_stats: dict[str, torch.Tensor] = field(default_factory=dict)  # routed_frac/blockN, moe_*
    experts: list[MoEInfo] = field(default_factory=list)  # one per MoE layer


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = _make_blocks(cfg)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, False)
        self.remat = "none"  # train.remat: none | block (set by the trainer)
        self.reset_parameters()  # unrolled first: a scanned model starts from the same weights
        if cfg.scan:  # `layers` takes the place of `blocks`, so parameter order is unchanged
            layers = stack_blocks(list(self.blocks), cfg.scan_unit)
            self._modules = {
                ("layers" if k == "blocks" else k): (layers if k == "blocks" else v)
                for k, v in self._modules.items()
            }

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers)  # residual outputs, GPT-2 style
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("attn.wo.weight", "mlp.w2.weight", "mlp.w2")):  # mlp.w2: MoE
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
        if not self.cfg.scan:
            for block in self.blocks:
                x, info = run_block(block, x, positions, routing, self.remat)
                if info is not None:
                    infos.append(info)
            terms = stack_terms([block_terms(i) for i in infos])
        elif x.device.type == "xla" and routing == "topk":
            x, terms = self._scan(x, positions)
        else:  # eager or causal routing: a plain loop over the stacked weights
            x, infos = self._loop(x, positions, routing)
            terms = stack_terms([block_terms(i) for i in infos])
        x = self.norm(x)
        w = self.embed.weight if self.head is None else self.head.weight
        logits = F.linear(x, w)  # (B, T, V)
        stats: dict[str, torch.Tensor] = {}
        for n, layer in enumerate(self.cfg.routed_layers):
            stats[f"routed_frac/block{layer}"] = terms["routed_frac"][n]
            if "predictor_acc" in terms:
                stats[f"predictor_acc/block{layer}"] = terms["predictor_acc"][n]
        moe_aux, moe_terms, experts = self._moe_terms(stats) if self.cfg.moe_layers else (0, {}, [])
        # expert-choice MoE predictors' BCE joins MoD's in the predictor loss, same weight
        router_loss, predictor_loss = self._aux(terms, x, moe_terms.get("predictor_bce"))
        mod = self.cfg.mod
        aux = mod.aux_loss_weight * router_loss + mod.predictor_loss_weight * predictor_loss
        aux = aux + moe_aux
        return ModelOutput(logits, aux, router_loss, predictor_loss, infos, stats, experts)

    def _moe_terms(self, stats: dict[str, torch.Tensor]):
        """The MoE layers' weighted aux losses, their terms stacked (n_moe,) and their infos;
        their per-layer fractions (and predictor accuracies) go into stats."""
        per_layer, infos = [], []
        for layer in self.cfg.moe_layers:
            mlp = self.blocks[layer].f.mlp
            per_layer.append(mlp.terms)
            infos.append(mlp.info)
            mlp.terms, mlp.info = {}, None  # this forward's tensors are not kept past it
        terms = stack_terms(per_layer)
        for n, layer in enumerate(self.cfg.moe_layers):
            for name in ("routed_frac", "dropped_frac", "noop_frac", "predictor_acc"):
                if name in terms:
                    stats[f"moe_{name}/block{layer}"] = terms[name][n]
        balance, z = terms["balance_loss"].mean(), terms["z_loss"].mean()
        stats["moe_balance_loss"], stats["moe_z_loss"] = balance, z
        moe = self.cfg.moe
        return moe.load_balance_weight * balance + moe.z_loss_weight * z, terms, infos

    @property
    def blocks(self) -> nn.ModuleList:
        """The blocks in order. A scanned model builds them as views of its stacked weights
        (for decoding and tools that walk the blocks; they share storage on the host), once
        for as long as those weights live where they are: what is set on them (routing
        thresholds) stays, an in-place load shows through, a move rebuilds them."""
        if "blocks" in self._modules:
            return self._modules["blocks"]
        params = list(self.layers.parameters())
        if params[0].device.type == "xla":  # no host storage to be views of: built anew
            return self._build_views()
        where = [(id(p), p.device, p.requires_grad, p.data_ptr()) for p in params]
        cached = self.__dict__.get("_views")
        if cached is not None and cached[0] == where:
            return cached[1]
        self.__dict__["_views"] = (where, self._build_views())  # not a submodule
        return self.__dict__["_views"][1]

    def _build_views(self) -> nn.ModuleList:
        unit = self.cfg.scan_unit
        with torch.device("meta"):
            blocks = _make_blocks(self.cfg)
        for name, v in self.layers.named_parameters():
            j, rest = name.split(".", 1)
            for p in range(self._periods()):
                owner, leaf = f"{p * unit + int(j)}.{rest}".rsplit(".", 1)
                param = nn.Parameter(v[p], requires_grad=v.requires_grad)
                setattr(blocks.get_submodule(owner), leaf, param)
        return blocks

    def _periods(self) -> int:
        return self.cfg.num_layers // self.cfg.scan_unit

    def _loop(self, x, positions, routing: str):
        params = dict(self.layers.named_parameters())  # (P, ...) each
        infos: list[RoutingInfo] = []
        for p in range(self._periods()):
            w = {name: v[p] for name, v in params.items()}
            if self.remat == "none" or not torch.is_grad_enabled() or x.device.type == "xla":
                x, got = self._period(x, w, positions, routing)
            else:  # recompute inside functional_call, where the period's weights are bound
                x, got = checkpoint(self._period, x, w, positions, routing, use_reentrant=False)
            infos += got
        return x, infos

    def _period(self, x, w, positions, routing):
        return functional_call(self.layers, w, (x, positions, routing, "none"))

    def _scan(self, x, positions):
        """All periods in one XLA While loop; routed blocks' terms come back stacked (P,)."""
        from torch_xla.experimental.scan import scan

        from modxla.model.scan import scan_remat_partition

        params = dict(self.layers.named_parameters())  # (P, ...) each
        pos = positions.expand(self._periods(), *positions.shape)  # (P, B, T), not copied
        key = id(self.layers)  # a deep copy of the model gets a function of its own
        fn = self._scan_fns.get(key)
        if fn is None:
            layers = self.layers

            def fn(h, xs):
                w, pos_p = xs
                h, got = functional_call(layers, w, (h, pos_p, "topk", "none"))
                # scan differentiates every output: metrics (routed_frac, ...) get a zero
                # path to a weight so that they have one.
                zero = next(iter(w.values())).flatten()[0] * 0
                terms = stack_terms([block_terms(i) for i in got])
                return h, {k: v if v.requires_grad else v + zero for k, v in terms.items()}

            self._scan_fns[key] = fn
        partition = scan_remat_partition(self.remat)
        # Pure (cached trace) unless the unit draws random router weights each step.
        pure = self.cfg.mod.router != "random"
        x, terms = scan(fn, x, (params, pos), partition_fn=partition, is_fn_pure=pure)
        return x, {k: v.flatten() for k, v in terms.items()}  # (P,) one routed block a period

    @property
    def _scan_fns(self) -> dict:
        if "_scan_cache" not in self.__dict__:
            self.__dict__["_scan_cache"] = {}
        return self.__dict__["_scan_cache"]

    def _aux(self, terms: dict[str, torch.Tensor], like: torch.Tensor, moe_bce=None):
        """Router and predictor BCE: means over routed blocks; expert-choice MoE predictors'
        BCE (moe_bce, (n_moe,)) counts one per layer in the predictor's mean."""
        zero = like.new_zeros(())
        bces = [t for t in (terms.get("predictor_bce"), moe_bce) if t is not None]
        predictor = torch.cat(bces).mean() if bces else zero
        if not terms:
            return zero, predictor
        learned = self.cfg.mod.router == "learned"
        router = terms["router_bce"].mean() if learned else zero
        return router, predictor

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
        return n


def _make_blocks(cfg: ModelConfig) -> nn.ModuleList:
    routed, moe = set(cfg.routed_layers), set(cfg.moe_layers)
    return nn.ModuleList(
        (MoDBlock if i in routed else DenseBlock)(cfg, i in moe) for i in range(cfg.num_layers)
    )


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy; logits (B, T, V), targets (B, T)."""
    flat = logits.float().flatten(0, 1)
    if flat.device.type == "xla":
        return _CrossEntropy.apply(flat, targets.flatten())
    return F.cross_entropy(flat, targets.flatten())  # eager's fused kernel is the faster one


class _CrossEntropy(torch.autograd.Function):
    """F.cross_entropy's value and gradient in fewer passes over the (N, V) logits on XLA.

    XLA:CPU runs log_softmax + nll_loss (and nll_loss's scatter backward) in about twice the
    passes: 129 vs ~80 ms forward + backward at 2048 x 8192. Like log_softmax it keeps one
    (N, V) tensor for the backward (the logits), and its gradient is one fused pass:
    softmax minus the one-hot target."""

    @staticmethod
    def forward(ctx, logits, targets):
        lse = torch.logsumexp(logits, -1)
        ctx.save_for_backward(logits, lse, targets)
        return (lse - logits.gather(1, targets[:, None]).squeeze(1)).mean()

    @staticmethod
    def backward(ctx, g):
        logits, lse, targets = ctx.saved_tensors
        classes = torch.arange(logits.shape[1], device=logits.device)
        onehot = (targets[:, None] == classes).to(logits.dtype)
        return (torch.exp(logits - lse[:, None]) - onehot) * (g / logits.shape[0]), None
