"""What the routed blocks of a model do, on batches (modxla-inspect-routing): contributions next
to the residual stream, router weights, loss with blocks switched off."""

from __future__ import annotations

import contextlib

import torch

from modxla.inference.load import InferenceError, get_thresholds
from modxla.model import MoDBlock, Transformer
from modxla.routing.calibration import causal_modes
from modxla.routing.evaluate import routing_stats, threshold_accuracy

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


@contextlib.contextmanager
def switched_off(model: Transformer, layers):
    """Routed blocks `layers` become identities (x out for x in; routing still reported)."""
    for layer in layers:
        block = model.blocks[layer]

        def identity(x, positions, routing="topk", _forward=block.forward):
            return x, _forward(x, positions, routing)[1]

        block.forward = identity  # an instance attribute shadows the class's forward
    try:
        yield model
    finally:
        for layer in layers:
            del model.blocks[layer].forward


@torch.no_grad()
def contributions(model: Transformer, batches) -> dict:
    """Per routed block: ||r f|| / ||x|| and ||f|| / ||x|| over routed tokens, and r's
    distribution over all and over routed tokens (top-k routing)."""
    seen: dict[int, dict] = {}
    hooks = []
    for layer in model.cfg.routed_layers:
        block: MoDBlock = model.blocks[layer]
        rec = seen.setdefault(layer, {"x": [], "f": [], "info": []})
        hooks.append(block.register_forward_pre_hook(lambda m, a, rec=rec: rec["x"].append(a[0])))
        hooks.append(block.f.register_forward_hook(lambda m, a, o, rec=rec: rec["f"].append(o)))
        hooks.append(block.register_forward_hook(lambda m, a, o, rec=rec: rec["info"].append(o[1])))
    try:
        for batch in batches:
            model(batch[:, :-1], routing="topk")
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for layer, rec in seen.items():
        rf, f_rel, r_all, r_routed = [], [], [], []
        for x, f, info in zip(rec["x"], rec["f"], rec["info"], strict=True):
            xs = torch.gather(x, 1, info.idx[..., None].expand(-1, -1, x.shape[-1]))  # (B, k, D)
            r = torch.gather(info.router_logits, 1, info.idx)  # (B, k)
            w = torch.ones_like(r) if model.blocks[layer].random else r
            xn = xs.norm(dim=-1)
            rf.append(((w[..., None] * f).norm(dim=-1) / xn).flatten())
            f_rel.append((f.norm(dim=-1) / xn).flatten())
            r_all.append(info.router_logits.flatten())
            r_routed.append(r.flatten())
        r_all, r_routed = torch.cat(r_all).float(), torch.cat(r_routed).float()
        member = torch.cat([i.topk_mask.flatten() for i in rec["info"]]) > 0
        out[str(layer)] = {
            "threshold_acc": threshold_accuracy(r_all, member),
            "rf_over_x": float(torch.cat(rf).mean()),
            "f_over_x": float(torch.cat(f_rel).mean()),
            "r_all": _quantiles(r_all),
            "r_routed": _quantiles(r_routed),
            "r_negative_all": float((r_all < 0).float().mean()),
            "r_negative_routed": float((r_routed < 0).float().mean()),
            "routed_frac": float(torch.cat([i.routed_mask.flatten() for i in rec["info"]]).mean()),
        }
    return out


def _quantiles(v: torch.Tensor) -> dict[str, float]:
    q = torch.quantile(v, torch.tensor(QUANTILES))
    return {f"q{int(p * 100):02d}": float(x) for p, x in zip(QUANTILES, q, strict=True)}


def routing_report(model: Transformer, batches) -> dict:
    """The whole report for a model (unrolled, eval mode) on `batches` (B, T+1)."""
    if not model.cfg.routed_layers:
        raise InferenceError("the model has no routed blocks: nothing to report")
    blocks = contributions(model, batches)
    topk = routing_stats(model, batches, "topk")["nll"]
    for layer in model.cfg.routed_layers:
        with switched_off(model, [layer]):
            blocks[str(layer)]["loss_off"] = routing_stats(model, batches, "topk")["nll"]
    with switched_off(model, model.cfg.routed_layers):
        all_off = routing_stats(model, batches, "topk")["nll"]
    loss = {"topk": topk, "all_off": all_off}
    for mode in causal_modes(model):
        loss[mode] = routing_stats(model, batches, mode)
    thresholds = get_thresholds(model)
    calibrated = any(t != 0 for d in thresholds.values() for t in d.values())
    return {
        "capacity": model.cfg.mod.capacity,
        "router": model.cfg.mod.router,
        "batches": len(batches),
        "calibrated": calibrated,
        "thresholds": thresholds,
        "loss": loss,
        "blocks": blocks,
    }
