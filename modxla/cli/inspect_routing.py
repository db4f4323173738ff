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

import json
import sys

from modxla.cli.common import parser
from modxla.errors import UserError, report
from modxla.inference.load import (
    InferenceError,
    load_run,
    uncalibrated_router,
    validation_batches,
)
from modxla.io import rundir
from modxla.io.logger import say
from modxla.routing.report import routing_report


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
    if msg := uncalibrated_router(cfg, model, run_dir):  # its router rows use that logit
        print(msg.replace("--routing router: ", "router routing: "), file=sys.stderr)
    res = routing_report(model, validation_batches(cfg, batches))
    return {"run_dir": str(run_dir), "checkpoint": path, **res}


def main(argv: list[str] | None = None) -> int:
    ap = parser("modxla-inspect-routing", __doc__)
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
