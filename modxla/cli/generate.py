"""Sample text from a trained run with causal routing and a static-shape KV cache.

    modxla-generate --run-dir runs/demo --prompt "def main(" [--max-tokens 64]

Routing is causal: `predictor` (the predictor MLPs decide; train them first with
modxla-train-predictor) or `router` (the router logit decides: sound when the run was trained
with model.mod.aux_loss_weight > 0 or calibrated with modxla-calibrate-routing; otherwise a
warning says so). The newest predictor checkpoint is used if there is one, else the newest
training checkpoint.

Routed blocks keep k = round(C * T) slots, T the length the run was trained at (data.seq_len),
whatever the prompt and --max-tokens: the logits at a position are those of the full forward
at the trained length and do not change with --max-tokens. A routed block does no attention or
MLP work for a token it skips, which is where MoD's sampling speed comes from: eagerly by a
branch, on XLA by conditionals in one decode graph traced once and replayed at every token.
MoE layers (and both MoDE variants) decode token choice with the experts' per-sequence
capacity of the full forward at data.seq_len: a token whose expert is full is dropped there,
as in training. Expert-choice routing (each expert's top-C tokens of the sequence) is not
causal: it decodes with its top-C predictors (model.moe.predictor, or added by
modxla-train-predictor), expert e taking a token its predictor says it wants while it has a
free slot of C; without them it is refused. --routing says how MoD's routed blocks decide;
expert-choice MoE layers decide by their predictors in both modes. The device defaults to XLA
where there is a TPU, else the CPU (eager: no compile before the first token). The speed in
tokens/s and, for MoD, the share of tokens each routed block processed (for MoE, the share of
choices an expert processed) go to stderr. The prompt plus the new tokens must fit the trained
length data.seq_len (a dense model: its max_seq_len): --max-tokens (and, if need be, the
prompt's start) is clipped to fit, with a note on stderr.
"""

from __future__ import annotations

import sys
import time

from modxla.cli.common import parser
from modxla.data import EOS_ID, load_tokenizer
from modxla.errors import UserError, report
from modxla.inference.load import InferenceError, load_run, tokenizer_path, uncalibrated_router
from modxla.inference.sample import (
    context_length,
    default_device,
    expert_fraction,
    generate,
    routed_fraction,
    trained_length_bound,
    xla_device,
)
from modxla.io.logger import say


def clip_to_context(prompt: list[int], max_tokens: int, context: int, name="max_seq_len"):
    """Prompt and new-token count that fit the model's context (`name` says which length it
    is), with a note on stderr."""
    if max_tokens < 1:
        raise InferenceError(f"--max-tokens must be >= 1, got {max_tokens}")
    if len(prompt) >= context:
        keep = context - 1
        print(
            f"note: the prompt has {len(prompt)} tokens; keeping its last {keep} "
            f"({name} {context})",
            file=sys.stderr,
        )
        prompt = prompt[-keep:]
    room = context - len(prompt)
    if max_tokens > room:
        print(
            f"note: generating {room} tokens, not {max_tokens}: prompt ({len(prompt)} tokens) "
            f"+ new tokens must fit {name} {context}",
            file=sys.stderr,
        )
    return prompt, min(max_tokens, room)


def main(argv: list[str] | None = None) -> int:
    ap = parser("modxla-generate", __doc__)
    ap.add_argument("--run-dir", required=True, help="a run directory: path or URL (gs://...)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--routing", choices=("predictor", "router"), default="predictor")
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=40, help="0 = off")
    ap.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--device",
        choices=("cpu", "xla"),
        default=None,
        help="xla: one decode graph, traced once (default where there is a TPU, else cpu)",
    )
    ap.add_argument(
        "--stale-predictor",
        action="store_true",
        help="sample with predictors trained on an older checkpoint than the run's newest",
    )
    args = ap.parse_args(argv)
    if args.max_tokens < 1:
        ap.error("--max-tokens must be >= 1")
    try:
        cfg, model, path = load_run(args.run_dir, warn=say, stale_predictor=args.stale_predictor)
        routed = bool(cfg.model.routed_layers)  # --routing is about MoD's routed blocks only
        if routed and args.routing == "predictor" and not cfg.model.mod.predictor:
            raise UserError(
                f"{args.run_dir} has no predictors: add them with modxla-train-predictor, "
                "or pass --routing router"
            )
        if routed and args.routing == "router" and cfg.model.mod.router == "random":
            raise UserError(f"{args.run_dir} uses random routing: pass --routing predictor")
        if (
            routed
            and args.routing == "router"
            and (msg := uncalibrated_router(cfg, model, args.run_dir))
        ):
            print(msg, file=sys.stderr)
        sp = load_tokenizer(tokenizer_path(args.run_dir), cfg.model.vocab_size)
        device = xla_device() if args.device == "xla" else None
        if args.device is None:
            device = default_device()
        if device is not None:
            model = model.to(device)
        prompt = sp.encode(args.prompt)
        # routed blocks: the trained length, so their k is the trained one (see the docstring)
        seq_len = cfg.data.seq_len
        context = context_length(model, seq_len)
        bound = trained_length_bound(model)
        name = "data.seq_len (the trained length)" if bound else "max_seq_len"
        prompt, max_tokens = clip_to_context(prompt, args.max_tokens, context, name)
        t0 = time.perf_counter()
        tokens, cache = generate(
            model,
            prompt,
            max_tokens,
            args.routing,
            args.temperature,
            args.top_k,
            args.top_p,
            args.seed,
            device,
            stop_id=EOS_ID,
            seq_len=seq_len,
        )
    except UserError as e:  # anything else is a bug: keep its traceback
        return report(e)
    new = len(tokens) - len(prompt)
    # token-choice MoE alone: no routing to choose
    how = f"routing={args.routing}, " if routed or cfg.model.moe_predictor_layers else ""
    secs = time.perf_counter() - t0
    print(
        f"[{path}, {how}{new} tokens in {secs:.2f} s: {new / max(secs, 1e-9):.1f} tokens/s]",
        file=sys.stderr,
    )
    if cfg.model.routed_layers:  # the tokens fed through the blocks: all but the last
        frac = routed_fraction(model, cache, len(tokens) - 1)
        shares = ", ".join(f"block {i}: {f:.3f}" for i, f in frac.items())
        print(f"[routed fraction per routed block: {shares}]", file=sys.stderr)
    if cfg.model.moe_layers:
        frac = expert_fraction(model, cache, len(tokens) - 1)
        shares = ", ".join(f"block {i}: {f:.3f}" for i, f in frac.items())
        print(f"[expert-processed fraction of choices per MoE block: {shares}]", file=sys.stderr)
    print(sp.decode(tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
