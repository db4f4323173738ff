"""Post-hoc training of the causal routing predictors on a frozen model.

    modxla-train-predictor --run-dir runs/demo [--steps 300] [--init auto|fresh|continue]

Loads the run's newest (checksum-verified) training checkpoint, freezes everything but the
predictor MLP of each routed block (and of each expert-choice MoE layer: per expert, membership
of its top-C tokens), and trains those on top-k membership (BCE) over the run's
training data, on the same pieces as training: the runtime (SPMD mesh, compiled step), the
host-sharded loader, and the trainer's loop: sharded checkpoints into <run>/predictor/,
resumed from the newest complete one when there is one (--resume: fail when there is none;
--restart: delete them and start over), SIGTERM = save the step and exit 143 (run the same
command again to resume).

Predictors to start from (--init): `fresh` initialises new ones (the only choice for a model
trained with model.mod.predictor: false: they are added to it); `continue` starts from the
jointly trained ones; `auto` continues when the run has predictors, else fresh. The output
and eval.json say which one ran; resuming checkpoints of another --init is refused.

Writes <run>/predictor/: config.yaml (the run's config with predictors), metrics.jsonl and
tb/, checkpoints/step_N (the whole model with its predictors: evaluation and sampling load
it), and eval.json: log-likelihood with topk, predictor and router routing on the
validation split, next to the predictor's top-k accuracy and the always-skip baseline.

For an accuracy curve, `--eval-every N` logs to metrics.jsonl every N steps, on the
--eval-batches first validation batches: val/predictor_acc (top-k
accuracy), val/precision and val/recall of the routed class, val/always_skip_acc (1 - C),
and val/predictor_acc/blockN. Ablations (fresh predictors only, or matching the run's):
`--hidden N` (MLP width), `--input x|normed` (the block's input or its RMS-normalized input,
saved as model.mod.predictor_input), `--pos-weight W|balanced` (BCE weight of the routed
class; balanced = (1-C)/C; the logged predictor_loss is then the weighted one).
"""

from __future__ import annotations

import sys
from dataclasses import fields

from modxla.cli.common import parser
from modxla.errors import EXIT_OK, EXIT_STOPPED, UserError, report
from modxla.routing.predictor import INITS, PredictorOptions, train_predictors


def print_eval(result: dict) -> None:
    init = result["predictor_init"]
    how = "new initialisation" if init == "fresh" else "joint weights"
    if result.get("fresh_predictors"):  # continued, but the run trained some kinds without
        how += "; fresh: " + ", ".join(result["fresh_predictors"])
    print(f"predictors: {init} ({how})")
    print(f"{'routing':<10} {'nll':>8} {'norm. LL':>9} {'routed':>8} {'overflow':>9}")
    for mode in ("topk", "predictor", "router"):
        if mode in result:
            r = result[mode]
            # a model without routed blocks: its expert-choice MoE's taken share and overflow
            routed, over = (
                (r["routed"], r["overflow"])
                if "routed" in r
                else (r["moe_taken"], r["moe_overflow"])
            )
            print(f"{mode:<10} {r['nll']:8.4f} {r['normalized_ll']:9.4f} {routed:8.3f} {over:9.3f}")
    p = result["predictor"]
    print(
        f"predictor vs top-k: accuracy {p['topk_accuracy']:.4f} (always-skip "
        f"{p['always_skip_accuracy']:.4f}), precision {p['precision']:.3f}, "
        f"recall {p['recall']:.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = parser(
        "modxla-train-predictor",
        __doc__,
        epilog="Exit status: 0 done (eval.json written), 2 bad input, 143 stopped by SIGTERM "
        "after saving its step (run it again to resume); see modxla/errors.py.",
    )
    d = PredictorOptions()
    ap.add_argument("--run-dir", required=True, help="a run directory written by modxla-train")
    ap.add_argument("--steps", type=int, default=d.steps, help="predictor training steps")
    ap.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (constant)")
    ap.add_argument("--log-every", type=int, default=d.log_every)
    ap.add_argument("--eval-batches", type=int, default=d.eval_batches)
    ap.add_argument("--init", choices=INITS, default=d.init, help="predictors to start from")
    ap.add_argument(
        "--restart", action="store_true", help="delete earlier predictor checkpoints, start over"
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest predictor checkpoint, failing if there is none",
    )
    ap.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="0 = at end")
    ap.add_argument(
        "--eval-every", type=int, default=0, help="log validation accuracy, precision, recall"
    )
    ap.add_argument("--hidden", type=int, default=0, help="predictor MLP width (fresh only)")
    ap.add_argument(
        "--input", choices=("x", "normed"), default="", help="predictor input (fresh only)"
    )
    ap.add_argument("--pos-weight", default="", help="routed-class BCE weight, or 'balanced'")
    args = ap.parse_args(argv)
    for name in ("steps", "log_every", "eval_batches"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0 or args.checkpoint_every < 0 or args.eval_every < 0 or args.hidden < 0:
        ap.error("--lr must be > 0; --checkpoint-every, --eval-every, --hidden >= 0")
    given = [f.name for f in fields(PredictorOptions) if hasattr(args, f.name)]
    opts = PredictorOptions(**{name: getattr(args, name) for name in given})
    try:
        result = train_predictors(args.run_dir, opts)
    except UserError as e:
        return report(e)
    if result is None:  # stopped by a signal after saving its step: run again to resume
        return EXIT_STOPPED
    print_eval(result)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
