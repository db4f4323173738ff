"""Post-hoc training of the causal routing predictors on a frozen model.

    modxla-train-predictor --run-dir runs/demo [--steps 300] [--init auto|fresh|continue]

Loads the run's newest (checksum-verified) training checkpoint, freezes everything but the
predictor MLP of each routed block, and trains those on top-k membership (BCE) over the run's
training data, on the same pieces as training: the runtime (SPMD mesh, compiled step), the
host-sharded loader, sharded checkpoints with resume, SIGTERM = checkpoint and stop.

Predictors to start from (--init): `fresh` initialises new ones (the only choice for a model
trained with model.mod.predictor: false: they are added to it); `continue` starts from the
jointly trained ones; `auto` continues when the run has predictors, else fresh. The output
and eval.json say which one ran.

Writes <run>/predictor/: config.yaml (the run's config with predictors), metrics.jsonl and
tb/, checkpoints/step_N (the whole model with its predictors: evaluation and sampling load
it), and eval.json: log-likelihood with topk, predictor and router routing on the
validation split, next to the predictor's top-k accuracy and the always-skip baseline.
"""

from __future__ import annotations

import argparse
import copy
import json
import signal
import sys
from dataclasses import dataclass

import torch

from modxla import rundir
from modxla.checkpoint import (
    Checkpointer,
    CheckpointError,
    latest_checkpoint,
    load,
    read_metadata,
)
from modxla.config import Config, OptimizerConfig
from modxla.data import BatchLoader, build_streams
from modxla.errors import UserError, report
from modxla.inference import evaluate_routing, merge_routing_results, predictor_ckpt_dir
from modxla.logger import MetricsLogger
from modxla.model import Transformer, build_model
from modxla.optim import build_optimizer, restore_state, state_template
from modxla.runtime import setup_runtime

INITS = ("auto", "fresh", "continue")


@dataclass
class PredictorOptions:
    steps: int = 300
    lr: float = 1e-2
    log_every: int = 10
    eval_batches: int = 8
    init: str = "auto"  # auto | fresh | continue (see the module docstring)
    restart: bool = False  # delete earlier predictor checkpoints of this run first
    checkpoint_every: int = 0  # 0 = at the end (and on SIGTERM)
    keep: int = 2


def predictor_step(model: Transformer, opt, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """One step on the predictors only: the model is frozen, their input is stop_gradient(x)."""
    out = model(batch[:, :-1])
    out.predictor_loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    stats = {"predictor_loss": out.predictor_loss.detach()}
    stats.update(out.block_stats)  # per routed block: routed_frac, predictor_acc
    accs = [v for k, v in stats.items() if k.startswith("predictor_acc/")]
    stats["predictor_acc/mean"] = torch.stack(accs).mean()
    return {k: v.detach() for k, v in stats.items() if not k.startswith("routed_frac")}


def _say(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"[modxla] {msg}", file=sys.stderr)


def _is_predictor(name: str) -> bool:
    return ".predictor." in name


class PredictorTrainer:
    """The frozen model with trainable predictors, its optimizer, data and checkpoints."""

    def __init__(self, run_dir: str, opts: PredictorOptions) -> None:
        if opts.init not in INITS:
            raise UserError(f"--init must be one of {', '.join(INITS)}, got {opts.init!r}")
        # run-dir file access: config.yaml in, predictor/ out (kept to these lines)
        self.run_dir = str(run_dir)  # a path or URL (gs://...)
        self.out_dir = rundir.join(self.run_dir, rundir.PREDICTOR)
        run_cfg = rundir.load_config(self.run_dir)
        if not run_cfg.model.routed_layers:
            raise UserError(f"{run_dir} trains a model without routed blocks: no predictor")
        self.opts = opts
        self.init = opts.init
        if opts.init == "auto":
            self.init = "continue" if run_cfg.model.mod.predictor else "fresh"
        if self.init == "continue" and not run_cfg.model.mod.predictor:
            raise UserError(
                f"{run_dir} was trained with model.mod.predictor: false: there are no "
                "predictors to continue from (use --init fresh)"
            )
        self.cfg: Config = copy.deepcopy(run_cfg)
        self.cfg.model.mod.predictor = True  # fresh predictors are added to such a model
        self.base = latest_checkpoint(rundir.checkpoints(self.run_dir, run_cfg), warn=_say)
        if self.base is None:
            raise CheckpointError(f"{run_dir} has no complete checkpoint to load")

        self.rt = rt = setup_runtime(self.cfg)
        streams = build_streams(self.cfg.data, self.cfg.model.vocab_size, progress=False)
        self.train_seqs = streams.sequences("train", self.cfg.data.seq_len)
        self.val_seqs = streams.sequences("val", self.cfg.data.seq_len)
        self.loader = BatchLoader(
            self.train_seqs,
            self.cfg.train.batch_size,
            self.cfg.data.seed + 1,  # another order than the model saw
            rt.process_index,
            rt.process_count,
        )
        model = build_model(self.cfg.model, seed=self.cfg.train.seed)  # fresh predictors
        self.step = 0
        self.ckpt = Checkpointer(predictor_ckpt_dir(self.run_dir), opts.keep, is_main=rt.is_main)
        if opts.restart and rt.is_main:
            self.ckpt.clear()  # asked for: a complete step is otherwise never rewritten
        resume = None if opts.restart else latest_checkpoint(self.ckpt.base, warn=_say)
        self._load_base(model)
        for name, p in model.named_parameters():
            p.requires_grad_(_is_predictor(name))
        self.ocfg = OptimizerConfig(lr=opts.lr, weight_decay=0.0, warmup_steps=0)
        restored = self._load_resume(resume, model) if resume else None
        self.model = model.to(rt.device)
        specs = rt.shard_model(self.model)
        self.opt = build_optimizer(self.model, self.ocfg)
        if restored:
            restore_state(
                self.opt, self.model, restored, lambda t, n: rt.shard_like(t, specs.get(n))
            )
        self._step = rt.compile(predictor_step, "predictor_step")
        self.stop_requested = False
        self.on_checkpoint: list = []  # called before each save (the logger uploads its files)
        if rt.is_main:
            rundir.makedirs(self.out_dir)
            rundir.save_config(self.cfg, self.out_dir)  # what loads the checkpoints

    def _load_base(self, model: Transformer) -> None:
        """The training checkpoint's weights; its predictors too when continuing."""
        saved = {k[len("model.") :] for k in read_metadata(self.base) if k.startswith("model.")}
        state = model.state_dict()
        keep = {
            k: v
            for k, v in state.items()
            if k in saved and (self.init == "continue" or not _is_predictor(k))
        }
        missing = sorted(k for k in state if k not in keep and not _is_predictor(k))
        if missing:
            raise CheckpointError(
                f"{self.base} does not match the run's config: missing {missing[:5]}"
            )
        loaded = load(self.base, {"model": keep}, verify=False)  # verified when found
        model.load_state_dict(loaded["model"], strict=False)
        how = {
            "fresh": "fresh predictors (new initialisation)",
            "continue": "continuing from the jointly trained predictors",
        }[self.init]
        _say(f"{how}; frozen model from {self.base}")

    def _load_resume(self, path: str, model: Transformer) -> dict:
        template = {
            "model": model.state_dict(),
            "optim": state_template(model, self.ocfg),
            "meta": {"step": 0, "loader": self.loader.state_dict(), "init": ""},
        }
        loaded = load(path, template, verify=False)
        if loaded["meta"]["init"] != self.init:
            raise UserError(
                f"{path} holds predictors trained with --init {loaded['meta']['init']}, not "
                f"{self.init}: pass --restart to start over"
            )
        model.load_state_dict(loaded["model"])
        self.step = int(loaded["meta"]["step"])
        self.loader.load_state_dict(loaded["meta"]["loader"])
        _say(f"resuming predictor training from {path} (step {self.step})")
        return loaded["optim"]

    def save(self) -> None:
        # one batch per step; the device feed reads ahead of the loader's own counter
        loader = {**self.loader.state_dict(), "batch": self.step}
        meta = {"step": self.step, "loader": loader, "init": self.init}
        for hook in self.on_checkpoint:
            hook()
        state = {"model": self.model.state_dict(), "optim": self.opt.state_dict(), "meta": meta}
        if self.ckpt.save(self.step, state) is not None:
            _say(f"predictor checkpoint step {self.step}")

    def fit(self, logger) -> None:
        rt, opts = self.rt, self.opts
        batches = rt.feed(self.loader, 0)
        every = opts.checkpoint_every

        def record(step: int, stats: dict) -> None:
            logger.log({"step": step, **{k: float(v) for k, v in stats.items()}})

        try:
            while self.step < opts.steps:
                stats = self._step(self.model, self.opt, next(batches))
                self.step += 1
                if self.step % opts.log_every == 0 or self.step == opts.steps:
                    rt.after_step(record, self.step, stats)
                rt.sync()
                if self.stop_requested or (every and self.step % every == 0):
                    self.save()
                if self.stop_requested:
                    _say(f"stop requested: left at step {self.step}; run again to resume")
                    return
            self.save()  # skipped when this step is already complete
        finally:
            self.ckpt.close()

    def evaluate(self) -> dict:
        """Routing evaluation on this host's rows of the validation batches, merged."""
        rt = self.rt
        val = BatchLoader(
            self.val_seqs,
            self.cfg.train.batch_size,
            0,
            rt.process_index,
            rt.process_count,
            shuffle=False,
        )
        model = self.model.cpu().eval()
        result = evaluate_routing(model, [next(val) for _ in range(self.opts.eval_batches)])
        if rt.process_count > 1:
            import torch.distributed as dist

            parts = [None] * rt.process_count
            dist.all_gather_object(parts, result)
            result = merge_routing_results(parts)
        return result | {
            "base_checkpoint": self.base,
            "capacity": self.cfg.model.mod.capacity,
            "predictor_init": self.init,
        }


def train_predictors(run_dir: str, opts: PredictorOptions) -> dict:
    """Train (or resume) the predictors of a run, then evaluate routing; returns eval.json."""
    trainer = PredictorTrainer(run_dir, opts)
    logger = MetricsLogger(
        trainer.out_dir, opts.steps, trainer.step, trainer.rt.is_main, desc="predictor"
    )
    trainer.on_checkpoint.append(logger.sync)

    def on_term(signum, frame):  # preemption: finish the step, save, exit cleanly
        trainer.stop_requested = True

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        trainer.fit(logger)
    finally:
        signal.signal(signal.SIGTERM, previous)
        logger.close()
    if trainer.stop_requested:
        return {}
    result = trainer.evaluate()
    if trainer.rt.is_main:
        rundir.write_text(rundir.join(trainer.out_dir, rundir.EVAL), json.dumps(result, indent=2))
    return result


def print_table(result: dict) -> None:
    init = result["predictor_init"]
    print(f"predictors: {init} ({'new initialisation' if init == 'fresh' else 'joint weights'})")
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="modxla-train-predictor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    ap.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="0 = at end")
    args = ap.parse_args(argv)
    for name in ("steps", "log_every", "eval_batches"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0 or args.checkpoint_every < 0:
        ap.error("--lr must be > 0 and --checkpoint-every >= 0")
    opts = PredictorOptions(
        steps=args.steps,
        lr=args.lr,
        log_every=args.log_every,
        eval_batches=args.eval_batches,
        init=args.init,
        restart=args.restart,
        checkpoint_every=args.checkpoint_every,
    )
    try:
        result = train_predictors(args.run_dir, opts)
    except UserError as e:
        return report(e)
    if result:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
