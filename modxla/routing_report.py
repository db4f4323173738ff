"""What the routed blocks of a run do, measured on validation batches.

    modxla-inspect-routing --run-dir runs/x [--batches 8] [--json report.json]

Per routed block (top-k routing, the training mode):
- the size of its contribution next to the residual stream: the mean over routed tokens of
  ||r_i f_i|| / ||x_i|| and of ||f_i|| / ||x_i|| (x_i: the block's input at token i);
- the router weights r: quantiles over all tokens and over the routed ones, fraction negative;
- the routed fraction (k/T under top-k; what causal routing wanted and got, below);
- the validation loss with this block switched off alone (an identity), next to top-k's.
Then the loss with every routed block switched off, and with causal routing (predictor,
router; with the thresholds of <run>/predictor/calibration.json when it matches the
checkpoint): NLL, routed fraction, overflow rate and tokens dropped per sequence.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch

from modxla import rundir
from modxla.calibration import causal_modes, routing_stats
from modxla.errors import UserError, report, say
from modxla.inference import InferenceError, get_thresholds, load_run, validation_batches
from modxla.model import MoDBlock, Transformer

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


def print_report(res: dict) -> None:
    loss = res["loss"]
    print(
        f"capacity {res['capacity']}, router {res['router']}, {res['batches']} validation "
        f"batches{', calibrated thresholds' if res['calibrated'] else ''}"
    )
    print(
        f"{'block':>5} {'|rf|/|x|':>9} {'|f|/|x|':>8} {'routed':>7} {'r<0 all':>8} "
        f"{'r<0 rtd':>8} {'r q05':>7} {'r q50':>7} {'r q95':>7} {'rtd q50':>8} "
        f"{'loss off':>9} {'delta':>7} {'thr acc':>8}"
    )
    for layer, b in res["blocks"].items():
        print(
            f"{layer:>5} {b['rf_over_x']:9.4f} {b['f_over_x']:8.4f} {b['routed_frac']:7.4f} "
            f"{b['r_negative_all']:8.3f} {b['r_negative_routed']:8.3f} "
            f"{b['r_all']['q05']:7.3f} {b['r_all']['q50']:7.3f} {b['r_all']['q95']:7.3f} "
            f"{b['r_routed']['q50']:8.3f} {b['loss_off']:9.4f} "
            f"{b['loss_off'] - loss['topk']:+7.4f} {b['threshold_acc']:8.4f}"
        )
    print(f"validation NLL: top-k {loss['topk']:.4f}, all routed blocks off {loss['all_off']:.4f}")
    print("thr acc: top-k accuracy of the best single threshold on a token's own router logit")
    for mode in ("predictor", "router"):
        if mode in loss:
            s = loss[mode]
            print(
                f"  {mode:<9} routing: NLL {s['nll']:.4f}, wanted {s['decided']:.4f}, routed "
                f"{s['routed']:.4f}, overflow {s['overflow']:.3f}, dropped/seq {s['dropped']:.2f}"
            )


def inspect_run(run_dir: str, batches: int) -> dict:
    if not rundir.load_config(run_dir).model.routed_layers:  # before loading any weights
        raise InferenceError(f"{run_dir} has no routed blocks: nothing to report")
    cfg, model, path = load_run(run_dir, unrolled=True, warn=say)
    res = routing_report(model, validation_batches(cfg, batches))
    return {"run_dir": str(run_dir), "checkpoint": path, **res}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="modxla-inspect-routing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--run-dir", required=True, help="a run directory (path or gs:// URL)")
    ap.add_argument("--batches", type=int, default=8, help="validation batches")
    ap.add_argument("--json", help="write the report to this file (path or URL)")
    args = ap.parse_args(argv)
    if args.batches < 1:
        ap.error("--batches must be >= 1")
    try:
        res = inspect_run(args.run_dir, args.batches)
    except UserError as e:
        return report(e)
    print_report(res)
    if args.json:
        rundir.write_text(args.json, json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
