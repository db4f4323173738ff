"""Per-block thresholds that calibrate causal routing (modxla-calibrate-routing): the fit,
and the routing statistics before and after."""

from __future__ import annotations

import torch

from modxla.inference.load import (
    InferenceError,
    set_thresholds,
)
from modxla.model import Transformer
from modxla.routing.evaluate import routing_stats

SEARCH = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2)


def causal_modes(model: Transformer) -> tuple[str, ...]:
    """The causal routing modes this model has: predictor (if trained), router (if learned)."""
    mod = model.cfg.mod
    return tuple(
        m for m, ok in (("predictor", mod.predictor), ("router", mod.router == "learned")) if ok
    )


@torch.no_grad()
def causal_logits(model: Transformer, batches, routing: str, layer: int) -> torch.Tensor:
    """All tokens' `routing` logits (N,) at routed block `layer`, in a forward with that
    causal routing (so the block's input is the one causal routing gives it)."""
    n = model.cfg.routed_layers.index(layer)
    got = []
    for batch in batches:
        info = model(batch[:, :-1], routing=routing).routing[n]
        logits = info.predictor_logits if routing == "predictor" else info.router_logits
        got.append(logits.flatten().float())
    return torch.cat(got)


def fit_thresholds(model: Transformer, batches, fraction: float, modes=None) -> dict:
    """Per block and mode, the (1 - fraction) quantile of the logits, so that `logit > t`
    routes `fraction` of the tokens of `batches`. Blocks are fitted in order, each with the
    thresholds of the blocks before it set (they change its input)."""
    out = {str(layer): {} for layer in model.cfg.routed_layers}
    for mode in modes or causal_modes(model):
        for layer in model.cfg.routed_layers:
            set_thresholds(model, out)
            logits = causal_logits(model, batches, mode, layer)
            out[str(layer)][mode] = float(torch.quantile(logits, 1.0 - fraction))
    return out


def evaluate(model: Transformer, batches, topk: bool = True) -> dict:
    """topk NLL and each causal mode's routing_stats with the thresholds set on the model."""
    res = {"topk": {"nll": routing_stats(model, batches, "topk")["nll"]}} if topk else {}
    for m in causal_modes(model):
        res[m] = routing_stats(model, batches, m)
    return res


def calibrate(
    model: Transformer, fit: list, held: list, fraction: float | None = None, search=False
) -> dict:
    """Fit thresholds on `fit`, report before/after on `held`; leaves them set on the model.

    The result records `seq_len`, the length T of the fitting sequences (batches (B, T+1)):
    the thresholds hold for k = round(C * T) slots at that length only, and load_run ignores
    them for a run trained (and decoding) at another length."""
    modes = causal_modes(model)
    if not modes:
        raise InferenceError("the model has neither predictors nor a learned router")
    cap = model.cfg.mod.capacity
    candidates = [f * cap for f in SEARCH] if search else [fraction or cap]
    set_thresholds(model, {})
    before = evaluate(model, held)
    tried = []
    for frac in candidates:
        thr = fit_thresholds(model, fit, frac)
        set_thresholds(model, thr)
        nll = sum(routing_stats(model, fit, m)["nll"] for m in modes) / len(modes)
        tried.append({"fraction": frac, "fit_nll": nll, "thresholds": thr})
        set_thresholds(model, {})
    best = min(tried, key=lambda t: t["fit_nll"])
    set_thresholds(model, best["thresholds"])
    return {
        "seq_len": int(fit[0].shape[1]) - 1,
        "fraction": best["fraction"],
        "capacity": cap,
        "thresholds": best["thresholds"],
        "search": tried if search else [],
        "before": before,
        "after": evaluate(model, held, topk=False),
    }
