"""Train the causal routing predictors of a finished run, post hoc, on a frozen model.

    python tools/train_predictor.py --run-dir runs/demo [--steps 300] [--lr 3e-3]

Loads the run's newest checkpoint, freezes everything but the predictor MLP of each routed
block, and trains those on top-k membership (BCE) over the run's training data. Logs top-k
prediction accuracy (per block and mean) to <run>/predictor/metrics.jsonl and TensorBoard,
saves <run>/predictor/checkpoints/step_N (the whole model, predictors included) and resumes
from there. Then evaluates log-likelihood with topk, predictor and router routing on the
validation split, prints the table and writes <run>/predictor/eval.json.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from modxla import rundir
from modxla.checkpoint import Checkpointer, CheckpointError, latest_checkpoint
from modxla.checkpoint import load as load_checkpoint
from modxla.data import BatchLoader, DataError, build_streams
from modxla.inference import evaluate_routing, load_run, predictor_ckpt_dir
from modxla.logger import MetricsLogger
from modxla.model import Transformer
from modxla.runtime import feed, setup_runtime
from modxla.step import routing_stats


def predictor_step(model: Transformer, opt, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """One step on the predictors only: the model is frozen, their input is stop_gradient(x)."""
    out = model(batch[:, :-1])
    out.predictor_loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    stats = {"predictor_loss": out.predictor_loss.detach()}
    stats.update(routing_stats(out.routing, model.cfg.routed_layers))
    accs = [v for k, v in stats.items() if k.startswith("predictor_acc/")]
    stats["predictor_acc/mean"] = torch.stack(accs).mean()
    return {k: v.detach() for k, v in stats.items() if not k.startswith("routed_frac")}


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--run-dir", required=True, help="a run directory written by modxla.train (path or URL)"
    )
    ap.add_argument("--steps", type=int, default=300, help="predictor training steps")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-batches", type=int, default=8, help="validation batches to score")
    ap.add_argument("--fresh", action="store_true", help="ignore earlier predictor checkpoints")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        return run(args)
    except (CheckpointError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    run_dir = str(args.run_dir)  # a path or URL (gs://...)
    cfg, model, path = load_run(run_dir, prefer_predictor=False)
    if not cfg.model.routed_layers:
        raise ValueError(f"{run_dir} trains a model without routed blocks: no predictor to train")
    if not cfg.model.mod.predictor:
        raise ValueError(f"{run_dir} has model.mod.predictor: false")
    out_dir = rundir.join(run_dir, rundir.PREDICTOR)
    ckpt = Checkpointer(predictor_ckpt_dir(run_dir), keep=2)
    step = 0
    resume = None if args.fresh else latest_checkpoint(predictor_ckpt_dir(run_dir))
    if resume:
        state = load_checkpoint(resume, {"model": model.state_dict(), "meta": {"step": 0}})
        model.load_state_dict(state["model"])
        step = int(state["meta"]["step"])
        print(f"resuming predictor training from {resume} (step {step})", file=sys.stderr)
    for n, p in model.named_parameters():
        p.requires_grad_(".predictor." in n)
    model.train()

    rt = setup_runtime(cfg)
    streams = build_streams(cfg.data, cfg.model.vocab_size, progress=False)
    loader = BatchLoader(
        streams.sequences("train", cfg.data.seq_len),
        cfg.train.batch_size,
        cfg.data.seed + 1,
        rt.process_index,
        rt.process_count,
    )
    loader.batch = step
    model = model.to(rt.device)
    if rt.xla:
        import torch_xla

        from modxla.parallel import shard_model

        shard_model(model, rt.mesh)
        step_fn = torch_xla.compile(predictor_step, full_graph=True, name="predictor_step")
    else:
        step_fn = predictor_step
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0
    )
    logger = MetricsLogger(out_dir, args.steps, step, rt.is_main)
    batches = feed(loader, rt, 0)
    try:
        while step < args.steps:
            stats = step_fn(model, opt, next(batches))
            step += 1
            if step % args.log_every == 0 or step == args.steps:
                rec = {"step": step, **{k: float(v) for k, v in stats.items()}}
                logger.log(rec)
        model = model.cpu()
        ckpt.save(step, {"model": model.state_dict(), "meta": {"step": step, "base": path}})
        ckpt.close()
    finally:
        logger.close()

    model.eval()
    val = BatchLoader(
        streams.sequences("val", cfg.data.seq_len), cfg.train.batch_size, 0, shuffle=False
    )
    result = evaluate_routing(model, [next(val) for _ in range(args.eval_batches)])
    result["base_checkpoint"] = path
    result["capacity"] = cfg.model.mod.capacity
    if rt.is_main:
        rundir.write_text(rundir.join(out_dir, rundir.EVAL), json.dumps(result, indent=2))
    print_table(result)
    return 0


def print_table(result: dict) -> None:
    print(f"{'routing':<10} {'nll':>8} {'norm. LL':>9} {'routed':>8} {'overflow':>9}")
    for mode in ("topk", "predictor", "router"):
        if mode in result:
            r = result[mode]
            print(
                f"{mode:<10} {r['nll']:8.4f} {r['normalized_ll']:9.4f} {r['routed']:8.3f} "
                f"{r['overflow']:9.3f}"
            )
    p = result["predictor"]
    print(
        f"predictor vs top-k: accuracy {p['topk_accuracy']:.4f} (always-skip "
        f"{p['always_skip_accuracy']:.4f}), precision {p['precision']:.3f}, "
        f"recall {p['recall']:.3f}"
    )


if __name__ == "__main__":
    sys.exit(main())
