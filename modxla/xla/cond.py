"""An HLO conditional from two torch functions: only the branch taken runs on the device.

torch_xla 2.9 lowers no `torch.cond`, and a lazy-tensor graph cannot branch on a value, so a
decode step that skips a routed block's work would need a graph per decision. Here each
branch is traced once on stand-in inputs into an XLA computation (as torch_xla's scan
traces its body), and the two become one `Conditional` op in the enclosing graph: one
graph, and at run time the device runs the branch the predicate picks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch_xla
import torch_xla.core.xla_builder as xb

_X = torch_xla._XLAC


def cond(
    pred: torch.Tensor,
    true_fn: Callable[..., Sequence[torch.Tensor]],
    false_fn: Callable[..., Sequence[torch.Tensor]],
    operands: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """`true_fn(*operands)` if `pred` (a bool scalar on the device), else `false_fn`.

    Both return tensors of one structure (shapes and dtypes). A branch reads only its
    operands and device data (weights, constants); anything else it touches would be
    traced into it and computed again there, so pass it as an operand. Operands have rank
    >= 1: a rank-0 stand-in holding 0 or 1 is traced as a constant, not as a parameter."""
    if any(t.dim() == 0 for t in operands):
        raise ValueError("cond operands must have rank >= 1")
    pred = pred.reshape(())
    builder = xb.create_builder("cond")
    params = [xb.mkparam(builder, 0, xb.tensor_shape(pred))]
    inputs = [pred]

    def add(t: torch.Tensor) -> int:
        params.append(xb.mkparam(builder, len(params), xb.tensor_shape(t)))
        inputs.append(t)
        return len(params) - 1

    for t in operands:
        add(t)
    branches = [_branch(fn, operands, add) for fn in (true_fn, false_fn)]
    picked = [xb.Op.tuple(tuple(params[i] for i in order)) for _, order in branches]
    out = params[0].conditional(
        picked[0], picked[1], _caller(branches[0][0]), _caller(branches[1][0])
    )
    return list(_X._xla_user_computation("xla::cond", inputs, out.build("cond")))


def _branch(fn, operands, add) -> tuple[object, list[int]]:
    """Trace `fn` on stand-ins; its computation and, per parameter, the outer input index."""
    dev = operands[0].device
    stand_ins = [torch.zeros(t.shape, dtype=t.dtype).to(dev) for t in operands]
    outs = list(fn(*stand_ins))
    ctx = _X.lowering.LoweringContext("CondBranch")
    ctx.build(outs)
    computation = xb.computation_from_module_proto("cond_branch", ctx.hlo())
    where: dict[int, int] = {}
    hoisted = ctx.device_parameter_id_tensor_mapping()  # parameter id -> device data
    for i, s in enumerate(stand_ins):
        p = ctx.tensor_parameter_id(s)
        if p != -1:  # -1: the branch does not read this operand
            where[p] = i + 1
            del hoisted[p]
    for p, t in sorted(hoisted.items()):  # weights and constants (a C++ map: sort it)
        where[p] = add(t)
    return computation, [where[p] for p in range(len(where))]


def _caller(computation) -> Callable:
    def call(*ps):
        res = xb.Op.call(computation, list(ps))
        n = res.shape().tuple_size()
        return [res.get_tuple_element(j) for j in range(n)]

    return call
