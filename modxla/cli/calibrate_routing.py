"""Overflow of causal routing, and per-block thresholds that calibrate it.

    modxla-calibrate-routing --run-dir runs/x [--batches 8] [--fraction F] [--search]

Causal routing (predictor or router logit > threshold) decides token by token; a sequence
whose decisions want more than the k = round(C*T) slots of a routed block drops its latest
routed tokens (overflow). This measures, per routed block, how often that happens and how many
tokens are dropped, and what it costs: the NLL of predictor/router routing next to top-k's.

Calibration: per routed block and causal mode, a threshold on the logit chosen on validation
batches so that the share of tokens routed is `--fraction` (default: the capacity C), i.e. the
(1 - fraction) quantile of the logits. `--search` instead tries fractions of C*{0.5, 0.6, ...,
1.2} (the same for every block) and keeps the one with the lowest mean causal NLL on the
fitting batches. Thresholds go to <run>/predictor/calibration.json, tagged with the checkpoint
they were fitted on and the sequence length (data.seq_len) of the batches they were fitted
for; evaluation and sampling (modxla-generate) load them with the run, so
`logit > threshold` replaces `logit > 0` (a file of another checkpoint or another length is
ignored, with a warning). Delete the file to go back. The thresholds are fitted
on --batches validation batches and reported on as many others (held out; even and odd
batches, as the split is in document order) when the split has them.
"""

from __future__ import annotations

import json
import sys

from modxla.cli.common import parser
from modxla.errors import UserError, report
from modxla.inference.load import (
    InferenceError,
    calibration_path,
    load_run,
    validation_batches,
)
from modxla.io import rundir
from modxla.io.logger import say
from modxla.routing.calibration import calibrate


def print_calibration(res: dict) -> None:
    print(
        f"routed-fraction target {res['fraction']:.4f} (capacity {res['capacity']}); "
        f"fitted on {res['fit_batches']} batches of {res['seq_len']} tokens, reported on "
        f"{res['eval_batches']} "
        f"{'held-out' if res['held_out'] else '(the same: the split is small)'}"
    )
    if res["search"]:
        tried = ", ".join(f"{t['fraction']:.4f}: {t['fit_nll']:.4f}" for t in res["search"])
        print(f"search (fraction: mean causal NLL on the fitting batches): {tried}")
    top = res["before"]["topk"]["nll"]
    print(f"top-k NLL {top:.4f}")
    hdr = f"{'mode':<10} {'block':>5} {'thresh':>8} {'nll':>8} {'decided':>8} {'routed':>7}"
    print(hdr + f" {'overflow':>8} {'dropped':>7}   (before -> after)")
    for mode in ("predictor", "router"):
        if mode not in res["after"]:
            continue
        b, a = res["before"][mode], res["after"][mode]
        print(
            f"{mode:<10} {'all':>5} {'':>8} {b['nll']:8.4f} {b['decided']:8.4f} "
            f"{b['routed']:7.4f} {b['overflow']:8.3f} {b['dropped']:7.3f}"
        )
        print(
            f"{'':<10} {'':>5} {'calib.':>8} {a['nll']:8.4f} {a['decided']:8.4f} "
            f"{a['routed']:7.4f} {a['overflow']:8.3f} {a['dropped']:7.3f}"
        )
        for layer, s in a["blocks"].items():
            s0 = b["blocks"][layer]
            t = res["thresholds"][layer][mode]
            print(
                f"{'':<10} {layer:>5} {t:8.3f} {'':>8} "
                f"{s0['decided']:.3f}->{s['decided']:.3f} "
                f"ovf {s0['overflow']:.3f}->{s['overflow']:.3f} "
                f"drop {s0['dropped']:.2f}->{s['dropped']:.2f}"
            )


def run_calibration(
    run_dir: str, batches: int, fraction: float | None, search: bool, write: bool
) -> dict:
    if not rundir.load_config(run_dir).model.routed_layers:  # before loading any weights
        raise InferenceError(f"{run_dir} has no routed blocks: nothing to calibrate")
    cfg, model, path = load_run(run_dir, calibrated=False, unrolled=True, warn=say)
    val = validation_batches(cfg, 2 * batches)
    # interleaved: the split is in document order, and documents differ
    fit, held = (val[0::2], val[1::2]) if len(val) > 1 else (val, [])
    res = calibrate(model, fit, held or fit, fraction, search)
    res |= {
        "checkpoint": path,
        "fit_batches": len(fit),
        "eval_batches": len(held or fit),
        "held_out": bool(held),
    }
    if write:
        rundir.write_text(calibration_path(run_dir), json.dumps(res, indent=2))
        say(f"wrote {calibration_path(run_dir)}")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = parser("modxla-calibrate-routing", __doc__)
    ap.add_argument("--run-dir", required=True, help="a run directory (path or gs:// URL)")
    ap.add_argument(
        "--batches", type=int, default=8, help="validation batches to fit on (N more: report)"
    )
    ap.add_argument(
        "--fraction", type=float, default=None, help="routed-fraction target (default: capacity)"
    )
    ap.add_argument(
        "--search", action="store_true", help="pick the fraction (C*0.5..1.2) of lowest NLL"
    )
    ap.add_argument("--dry-run", action="store_true", help="measure only; write no file")
    ap.add_argument("--json", help="also write the full result to this file")
    args = ap.parse_args(argv)
    if args.batches < 1:
        ap.error("--batches must be >= 1")
    if args.fraction is not None and not 0 < args.fraction <= 1:
        ap.error("--fraction must be in (0, 1]")
    if args.fraction is not None and args.search:
        ap.error("--fraction and --search exclude each other")
    try:
        res = run_calibration(
            args.run_dir, args.batches, args.fraction, args.search, not args.dry_run
        )
    except UserError as e:
        return report(e)
    print_calibration(res)
    if args.json:
        rundir.write_text(args.json, json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
