"""Routing statistics of a model on batches: NLL per routing mode, routed share, overflow, tokens
dropped, and the predictors against top-k membership (one confusion-matrix count).
"""

from __future__ import annotations

import torch

from modxla.inference.load import InferenceError
from modxla.model import Transformer, lm_loss


@torch.no_grad()
def evaluate_routing(
    model: Transformer, batches, modes=("topk", "predictor", "router")
) -> dict[str, dict]:
    """Per routing mode: mean NLL, fraction routed, overflow rate; and predictor quality.

    Overflow: the share of (sequence, routed block) pairs whose causal decisions wanted more
    tokens than the capacity buffer holds. Predictor quality is measured against top-k
    membership, next to the accuracy of always answering "skip" (1 - capacity).
    """
    if not model.cfg.routed_layers:
        raise InferenceError("the model has no routed blocks: nothing to evaluate")
    if model.cfg.mod.router == "random":
        modes = tuple(m for m in modes if m != "router")
    has_predictor = model.cfg.mod.predictor
    if not has_predictor:  # trained without predictors: nothing to score them on
        modes = tuple(m for m in modes if m != "predictor")
    acc = {m: {"nll": 0.0, "routed": 0.0, "overflow": 0.0} for m in modes}
    tp = fp = fn = tn = 0.0
    n = 0
    for batch in batches:
        n += 1
        for mode in modes:
            out = model(batch[:, :-1], routing=mode)
            acc[mode]["nll"] += float(lm_loss(out.logits, batch[:, 1:]))
            acc[mode]["routed"] += float(
                torch.stack([i.routed_mask.mean() for i in out.routing]).mean()
            )
            k = out.routing[0].idx.shape[1]
            acc[mode]["overflow"] += float(
                torch.stack([(i.decided > k).float().mean() for i in out.routing]).mean()
            )
            if mode == "topk" and has_predictor:
                for info in out.routing:
                    pred = info.predictor_logits > 0
                    target = info.topk_mask > 0.5
                    tp += float((pred & target).sum())
                    fp += float((pred & ~target).sum())
                    fn += float((~pred & target).sum())
                    tn += float((~pred & ~target).sum())
    if n == 0:
        raise InferenceError("no evaluation batches")
    result = {m: {k: v / n for k, v in d.items()} for m, d in acc.items()}
    for m in modes:
        result[m]["normalized_ll"] = result["topk"]["nll"] / result[m]["nll"]
    if "predictor" in result:
        result["predictor"] |= _predictor_quality(tp, fp, fn, tn)
    result["batches"] = n
    return result


@torch.no_grad()
def predictor_quality(model: Transformer, batches) -> dict:
    """The predictors against top-k membership (top-k routing): accuracy, precision and
    recall of the routed class, the always-skip accuracy; and the accuracy per routed block."""
    counts = {layer: torch.zeros(4) for layer in model.cfg.routed_layers}
    for batch in batches:
        out = model(batch[:, :-1], routing="topk")
        for layer, info in zip(model.cfg.routed_layers, out.routing, strict=True):
            pred, target = info.predictor_logits > 0, info.topk_mask > 0.5
            counts[layer] += (
                torch.stack(
                    [
                        (pred & target).sum(),
                        (pred & ~target).sum(),
                        (~pred & target).sum(),
                        (~pred & ~target).sum(),
                    ]
                )
                .float()
                .cpu()
            )
    total = _predictor_quality(*[float(x) for x in sum(counts.values())])
    total["predictor_acc"] = total["topk_accuracy"]
    total["blocks"] = {layer: float(c[0] + c[3]) / float(c.sum()) for layer, c in counts.items()}
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
