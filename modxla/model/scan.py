"""Scan over layers: one period of blocks with its weights stacked (P, ...), run by XLA's scan.

For `every: N` the repeating unit is N blocks (N-1 dense, then one routed block); without
routed blocks it is one dense block. A scanned model stores each parameter of the unit once,
stacked over the P = num_layers / N periods: `layers.{j}.<rest>[p]` is the unrolled model's
`blocks.{p * N + j}.<rest>` (modxla.io.layout converts state dicts between the two layouts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modxla.model.mod import RoutingInfo

STACKED = "layers."
TERMS = ("router_bce", "predictor_bce", "routed_frac", "predictor_acc")


def block_terms(info: RoutingInfo) -> dict[str, torch.Tensor]:
    """Per routed block scalars for the aux losses and metrics (tensors, so scan can stack them)."""
    bce = F.binary_cross_entropy_with_logits
    out = {
        "router_bce": bce(info.router_logits, info.topk_mask),
        "routed_frac": info.routed_mask.mean(),
    }
    if info.predictor_logits is not None:
        p = info.predictor_logits
        out["predictor_bce"] = bce(p, info.topk_mask)
        out["predictor_acc"] = ((p > 0).float() == info.topk_mask).float().mean()
    return out


def stack_terms(per_block: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """[{name: ()}] per routed block -> {name: (n_routed,)}."""
    if not per_block:
        return {}
    return {k: torch.stack([t[k] for t in per_block]) for k in per_block[0]}


class _TiedCheckpoint(torch.autograd.Function):
    """Reentrant activation checkpoint for XLA whose recomputation depends on the gradient.

    torch_xla's checkpoint orders the recomputation after the incoming gradient with
    optimization barriers, but XLA:CPU removes them (30 in the step's HLO before
    optimization, none after), and with nothing to order it the recomputed forward kept
    about as many activations alive as no remat (4 layers: 335 vs 346 MB; 16 layers: 0.95x).
    Here the block's input is `x + 0 * g[0]` (g: the output gradient): a data dependency no
    pass drops (0 * g is not folded for floats), so the recomputation waits for the backward.
    """

    @staticmethod
    def forward(ctx, fn, x, positions):
        import torch_xla.core.xla_model as xm

        ctx.fn, ctx.rng = fn, xm.get_rng_state()  # random routing draws again on recompute
        ctx.autocast = {  # the recompute runs under the forward's autocast (bf16 training)
            "enabled": torch.is_autocast_enabled("xla"),
            "dtype": torch.get_autocast_dtype("xla"),
        }
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, positions)
        with torch.no_grad():
            return fn(x, positions)

    @staticmethod
    def backward(ctx, *grads):
        import torch_xla.core.xla_model as xm

        x, positions = ctx.saved_tensors
        g = next(g for g in grads if g is not None)
        x = (x.detach() + g.flatten()[0].to(x.dtype) * 0).requires_grad_()
        with torch.enable_grad(), xm.fork_rng(), torch.autocast("xla", **ctx.autocast):
            xm.set_rng_state(ctx.rng)
            outs = ctx.fn(x, positions)
        pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if g is not None]
        pairs = [(o, g) for o, g in pairs if o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return None, x.grad, None


def run_block(block: nn.Module, x, positions, routing: str, remat: str):
    """One block, its activations recomputed in the backward when remat is 'block'."""
    if remat == "none" or not torch.is_grad_enabled():
        return block(x, positions, routing)
    if x.device.type != "xla":
        from torch.utils.checkpoint import checkpoint

        return checkpoint(block, x, positions, routing, use_reentrant=False)
    # Reentrant: only tensor outputs carry gradients, so the routing info travels as a flat
    # tuple of tensors.
    has_pred = getattr(block, "predictor", None) is not None

    def flat(x, positions):
        out, info = block(x, positions, routing)
        if info is None:
            return (out,)
        fields = [info.router_logits, info.topk_mask, info.routed_mask]
        fields += [info.idx, info.valid, info.decided]
        return (out, *fields, *([info.predictor_logits] if has_pred else []))

    res = _TiedCheckpoint.apply(flat, x, positions)
    if len(res) == 1:
        return res[0], None
    out, r, topk, routed, idx, valid, decided, *p = res
    return out, RoutingInfo(r, topk, p[0] if p else None, routed, idx, valid, decided)


class Period(nn.ModuleList):
    """The repeating unit: its blocks in order; each routed block reports a RoutingInfo."""

    def forward(self, x, positions, routing: str = "topk", remat: str = "none"):
        infos = []
        for block in self:
            x, info = run_block(block, x, positions, routing, remat)
            if info is not None:
                infos.append(info)
        return x, infos


def stack_blocks(blocks: list[nn.Module], unit: int) -> Period:
    """A Period whose parameters are the blocks' parameters stacked over periods (P, ...)."""
    import copy

    periods = len(blocks) // unit
    period = Period(copy.deepcopy(blocks[j]) for j in range(unit))
    for name, _ in list(period.named_parameters()):
        j, rest = name.split(".", 1)
        stacked = torch.stack(
            [blocks[p * unit + int(j)].get_parameter(rest).detach() for p in range(periods)]
        )
        owner, leaf = name.rsplit(".", 1)
        setattr(period.get_submodule(owner), leaf, nn.Parameter(stacked))
    return period


def save_inputs_partition(joint_module, _joint_inputs, *, num_fwd_outputs, **_):
    """AOTAutograd partition that saves only the unit's inputs: the backward recomputes the
    whole unit (its carry and weight slice are all a period keeps, P x (B, T, D) in all)."""
    from torch._functorch.partitioners import _extract_fwd_bwd_modules

    primals = [
        n
        for n in joint_module.graph.nodes
        if n.op == "placeholder" and "tangents" not in str(n.target)
    ]
    return _extract_fwd_bwd_modules(
        joint_module, primals, saved_sym_nodes=[], num_fwd_outputs=num_fwd_outputs
    )


def scan_remat_partition(remat: str):
    """What the scanned unit's forward saves for its backward. 'none': AOTAutograd's min-cut
    partition, which recomputes cheap elementwise ops in the backward instead of saving their
    outputs (the default partition saves every activation the backward reads; each is written
    to a (P, ...) buffer in the forward loop and read back in the backward one: 1.10x the
    unrolled step's CPU time at 8 layers, against 1.03x with min-cut). 'block': only the
    unit's inputs (the whole unit is recomputed)."""
    from functorch.compile import min_cut_rematerialization_partition

    return min_cut_rematerialization_partition if remat == "none" else save_inputs_partition
