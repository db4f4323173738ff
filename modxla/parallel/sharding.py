"""Sharding rules: weights FSDP-sharded over `fsdp`, heads and MLP hidden over `tensor`,
MoE experts over `expert`.

Linear weights are (out, in). Column-parallel layers (q, k, v, MLP up/gate, embeddings) shard
out over tensor and in over fsdp; row-parallel layers (attention out, MLP down) the reverse.
An MoE layer's expert weights (E, D, F) and (E, F, D) shard E over expert, D over fsdp and F
over tensor, as the dense MLP does within one expert; its router is a (None, fsdp) matrix like
MoD's. Everything else is replicated over expert, which carries batch there (as data does).
Norms, biases and other 1-D parameters are replicated. The sequence axis is never sharded.

The embedding lookup reads a replicated view of its table (an all-gather, as FSDP does for
every weight) whose gradient is pinned replicated as well. The lookup's gradient is a
scatter-add of the batch-sharded (B*T, D) activation gradient; into the D-over-fsdp table XLA
could only reshard those activations from batch to D sharding by replicating them whole, every
step ("Involuntary full rematerialization", asserted absent in test_train). Into a replicated
buffer each device adds its own rows, then the sum is reduced and sliced to the table's shards.
"""

from __future__ import annotations

import torch
from torch import nn

from modxla.model.layers import BlockDelta
from modxla.model.moe import MoEMLP
from modxla.model.scan import STACKED
from modxla.parallel.mesh import BATCH_AXES

COLUMN = ("tensor", "fsdp")
ROW = ("fsdp", "tensor")
RULES = {
    "embed.weight": COLUMN,
    "head.weight": COLUMN,
    "attn.wq.weight": COLUMN,
    "attn.wk.weight": COLUMN,
    "attn.wv.weight": COLUMN,
    "attn.wo.weight": ROW,
    "mlp.w1.weight": COLUMN,
    "mlp.w3.weight": COLUMN,
    "mlp.w2.weight": ROW,
    "mlp.w1": ("expert", "fsdp", "tensor"),  # MoE (E, D, F)
    "mlp.w3": ("expert", "fsdp", "tensor"),
    "mlp.w2": ("expert", "tensor", "fsdp"),  # MoE (E, F, D)
    "router.weight": (None, "fsdp"),
    "predictor.fc1.weight": (None, "fsdp"),
}


def param_spec(name: str, ndim: int) -> tuple | None:
    """Partition spec of a parameter by its name; None = replicated.

    A scanned model's `layers.*` weights carry a leading period axis (P, ...): it is never
    sharded (scan slices it), and the rest follows the per-block rule.
    """
    if name.startswith(STACKED):
        spec = param_spec(name[len(STACKED) :], ndim - 1)
        return None if spec is None else (None, *spec)
    if ndim < 2:
        return None
    for suffix, spec in RULES.items():
        if name.endswith(suffix):
            return spec
    return None


def shard_model(model: nn.Module, mesh) -> dict[str, tuple | None]:
    """Annotate every parameter of a model already on the XLA device; returns the specs.

    Each block's input is also pinned to batch sharding: without it, sharding propagation
    carries the weights' fsdp split onto a routed block's gathered tokens and then has to
    rematerialize them whole (XLA's "involuntary full rematerialization"). An MoE layer's
    (B, E, C, D) expert buffers are pinned to batch over data x fsdp and E over expert: the
    dispatch into them is GShard's all-to-all, from batch over data x fsdp x expert to each
    device's own experts, and the combine the one back. Unpinned, XLA replicated the flat
    dispatch/combine indices whole on any batch-sharded mesh.
    """
    import torch_xla.distributed.spmd as xs

    specs = {}
    for name, p in model.named_parameters():
        spec = param_spec(name, p.ndim)
        specs[name] = spec
        if spec is not None:
            xs.mark_sharding(p, mesh, spec)

    def pin(x):
        if x.device.type != "xla":  # the model was moved off the device (e.g. to evaluate)
            return
        # Traced inside scan (a tensor subclass there): no annotation; the carry is pinned at
        # the embedding. Every XLA tensor is a functional tensor, so that is no test of it.
        if type(x) is not torch.Tensor:
            return
        xs.mark_sharding(x, mesh, (BATCH_AXES,) + (None,) * (x.ndim - 1))

    def pin_experts(x):  # (B, E, C, D)
        if x.device.type == "xla" and type(x) is torch.Tensor:
            xs.mark_sharding(x, mesh, (("data", "fsdp"), "expert", None, None))

    for module in model.modules():
        if isinstance(module, BlockDelta):
            module.register_forward_pre_hook(lambda module, args: pin(args[0]))  # (B, T, D)
        if isinstance(module, MoEMLP):
            module.pin_buffer = pin_experts
    _lookup_replicated(model.embed, mesh)
    if getattr(model.cfg, "scan", False):  # the scan carry: blocks inside scan are not pinned
        model.embed.register_forward_hook(lambda module, args, out: pin(out))
    return specs


def _lookup_replicated(embed: nn.Embedding, mesh) -> None:
    """Embedding lookups on a replicated view of the table, gradient included (see above)."""
    import torch.nn.functional as F
    import torch_xla.distributed.spmd as xs

    def forward(tokens):
        w = embed.weight
        if w.device.type == "xla":  # not once the model was moved off the device
            # `* 1.0`: a new value to annotate (the parameter keeps its own sharding)
            w = xs.mark_sharding_with_gradients(w * 1.0, mesh, (None, None))
        return F.embedding(tokens, w)

    embed.forward = forward
