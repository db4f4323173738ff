"""Routing statistics of a model on batches: NLL per routing mode, routed share, overflow, tokens
dropped, and the predictors against top-k membership (one confusion-matrix count).
"""

from __future__ import annotations

import torch

from modxla.inference.load import InferenceError
from modxla.model import Transformer, lm_loss


def _predicted(model: Transformer, out) -> list[tuple[int | str, torch.Tensor, torch.Tensor]]:
    """(name, predictor decision, top-k or top-C target) of every predictor in a forward:
    routed blocks by layer (int), then expert-choice MoE layers as "moeN"."""
    cfg = model.cfg
    got = [
        (layer, i.predictor_logits > 0, i.topk_mask > 0.5)
        for layer, i in zip(cfg.routed_layers, out.routing, strict=True)
        if i.predictor_logits is not None
    ]
    for layer, i in zip(cfg.moe_layers, out.experts, strict=True):
        if i.predictor_logits is not None:
            got.append((f"moe{layer}", i.predictor_logits > 0, i.target > 0.5))
    return got


def _confusion(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(tp, fp, fn, tn) counts, float, on the host."""
    counts = [(pred & target), (pred & ~target), (~pred & target), (~pred & ~target)]
    return torch.stack([c.sum() for c in counts]).float().cpu()


@torch.no_grad()
def evaluate_routing(
    model: Transformer, batches, modes=("topk", "predictor", "router")
) -> dict[str, dict]:
    """Per routing mode: mean NLL, fraction routed, overflow rate; and predictor quality.

    Overflow: the share of (sequence, routed block) pairs whose causal decisions wanted more
    tokens than the capacity buffer holds. Predictor quality is measured against top-k
    membership, next to the accuracy of always answering "skip" (1 - capacity). A model
    with expert-choice MoE predictors (model.moe.predictor) has them scored too, against
    top-C membership of each expert, and per mode `moe_taken` (the share of (row, expert)
    pairs an expert processed, the rows being the MoE's input: in a staged MoDE block the k
    buffer slots, empty ones of the causal modes included) and `moe_overflow` (the share of
    (sequence, layer, expert) whose causal decisions wanted more than C tokens).
    """
    cfg = model.cfg
    moe_pred = bool(cfg.moe_predictor_layers)
    if not cfg.routed_layers and not moe_pred:
        raise InferenceError(
            "the model has no routed blocks and no expert-choice MoE predictors: nothing to "
            "evaluate"
        )
    if cfg.mod.router == "random" or not cfg.routed_layers:  # router: MoD's rule
        modes = tuple(m for m in modes if m != "router")
    expert_choice = cfg.expert_choice
    # predictor routing needs every causal rule: MoD's predictors, the experts' predictors
    has_predictor = (not cfg.routed_layers or cfg.mod.predictor) and (not expert_choice or moe_pred)
    if not has_predictor:  # trained without predictors: nothing to score them on
        modes = tuple(m for m in modes if m != "predictor")
    if expert_choice and not moe_pred:
        modes = ("topk",)  # the experts have no causal rule in any other mode
    acc = {m: {"nll": 0.0} for m in modes}
    conf = torch.zeros(4)
    n = 0
    for batch in batches:
        n += 1
        for mode in modes:
            out = model(batch[:, :-1], routing=mode)
            a = acc[mode]
            a["nll"] += float(lm_loss(out.logits, batch[:, 1:]))
            if out.routing:
                a["routed"] = a.get("routed", 0.0) + float(
                    torch.stack([i.routed_mask.mean() for i in out.routing]).mean()
                )
                k = out.routing[0].idx.shape[1]
                a["overflow"] = a.get("overflow", 0.0) + float(
                    torch.stack([(i.decided > k).float().mean() for i in out.routing]).mean()
                )
            if moe_pred:
                ex = out.experts
                a["moe_taken"] = a.get("moe_taken", 0.0) + float(
                    torch.stack([i.kept.float().mean() for i in ex]).mean()
                )
                a["moe_overflow"] = a.get("moe_overflow", 0.0) + float(
                    torch.stack([(i.decided > i.capacity).float().mean() for i in ex]).mean()
                )
            if mode == "topk":
                for _, pred, target in _predicted(model, out):
                    conf += _confusion(pred, target)
    if n == 0:
        raise InferenceError("no evaluation batches")
    result = {m: {k: v / n for k, v in d.items()} for m, d in acc.items()}
    for m in modes:
        result[m]["normalized_ll"] = result["topk"]["nll"] / result[m]["nll"]
    if "predictor" in result and conf.sum() > 0:
        result["predictor"] |= _predictor_quality(*[float(x) for x in conf])
    result["batches"] = n
    return result


@torch.no_grad()
def predictor_quality(model: Transformer, batches) -> dict:
    """The predictors against top-k membership (top-k routing): accuracy, precision and
    recall of the routed class, the always-skip accuracy; and the accuracy per routed block
    (`blocks`) and per expert-choice MoE layer against its experts' top-C (`moe_blocks`)."""
    counts: dict[int | str, torch.Tensor] = {}
    for batch in batches:
        out = model(batch[:, :-1], routing="topk")
        for name, pred, target in _predicted(model, out):
            counts[name] = counts.get(name, torch.zeros(4)) + _confusion(pred, target)
    if not counts:
        raise InferenceError("the model has no predictors to score")
    total = _predictor_quality(*[float(x) for x in sum(counts.values())])
    total["predictor_acc"] = total["topk_accuracy"]
    acc = {name: float(c[0] + c[3]) / float(c.sum()) for name, c in counts.items()}
    total["blocks"] = {n: a for n, a in acc.items() if isinstance(n, int)}
    total["moe_blocks"] = {int(n[3:]): a for n, a in acc.items() if isinstance(n, str)}
    return total


def _predictor_quality(tp: float, fp: float, fn: float, tn: float) -> dict:
    total = tp + fp + fn + tn
    return {
        "topk_accuracy": (tp + tn) / total,
        "precision": tp / max(1.0, tp + fp),
        "recall": tp / max(1.0, tp + fn),
        "always_skip_accuracy": (fp + tn) / total,  # every non-top-k token
        "counts": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
    }


@torch.no_grad()
def routing_stats(model: Transformer, batches, routing: str) -> dict:
    """NLL, and per routed block: the share of tokens the routing wanted (`decided`) and got
    (`routed`), the overflow rate (sequences wanting more than k) and mean tokens dropped."""
    keys = ("decided", "routed", "overflow", "dropped")
    per = {str(layer): dict.fromkeys(keys, 0.0) for layer in model.cfg.routed_layers}
    nll = 0.0
    for batch in batches:
        out = model(batch[:, :-1], routing=routing)
        nll += float(lm_loss(out.logits, batch[:, 1:]))
        for layer, info in zip(model.cfg.routed_layers, out.routing, strict=True):
            k, t = info.idx.shape[1], info.routed_mask.shape[1]
            d = info.decided.float()  # (B,)
            s = per[str(layer)]
            s["decided"] += float(d.mean()) / t
            s["routed"] += float(info.routed_mask.mean())
            s["overflow"] += float((d > k).float().mean())
            s["dropped"] += float((d - k).clamp(min=0).mean())
    n = len(batches)
    per = {layer: {k: v / n for k, v in s.items()} for layer, s in per.items()}
    mean = {k: sum(s[k] for s in per.values()) / len(per) for k in keys}
    return {"nll": nll / n, **mean, "blocks": per}


def threshold_accuracy(r: torch.Tensor, member: torch.Tensor) -> float:
    """Top-k accuracy of the best single threshold on each token's own router logit: what a
    per-token rule can reach when it knows r_i exactly but not the other tokens' logits
    (top-k's cut-off moves from sequence to sequence)."""
    order = torch.argsort(r, descending=True)
    m = member[order].float()
    # routing the first j tokens (highest r): correct = members among them + non-members after
    correct = (
        torch.cat([m.new_zeros(1), m.cumsum(0)])
        + (1 - m).sum()
        - torch.cat([m.new_zeros(1), (1 - m).cumsum(0)])
    )
    return float(correct.max() / len(m))
