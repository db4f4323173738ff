"""The training loop: python -m modxla.train --config FILE --run-dir DIR [key=value ...]."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from modxla.checkpoint import (
    Checkpointer,
    CheckpointError,
    check_model_shapes,
    latest_checkpoint,
    read_metadata,
)
from modxla.checkpoint import load as load_checkpoint
from modxla.config import Config, ConfigError, load_config, save_config
from modxla.data import BatchLoader, DataError, build_streams
from modxla.metrics import flops_per_step, mfu
from modxla.model import build_model
from modxla.model.stacking import (
    convert_optimizer_state,
    convert_state,
    is_stacked,
    optimizer_names,
)
from modxla.optim import MOMENT_DTYPES, build_optimizer, lr_at, set_lr
from modxla.parallel.mesh import MeshError
from modxla.runtime import compile_count, feed, peak_flops_per_device, setup_runtime
from modxla.step import eval_step, train_step


def _say(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"[modxla] {msg}", file=sys.stderr)


def _grouped(loader: BatchLoader, accum: int):
    while True:
        yield torch.stack([next(loader) for _ in range(accum)])  # (A, B/P, T+1)


class Trainer:
    """Holds the state one run shares between steps, evaluation and checkpoints."""

    def __init__(self, cfg: Config, run_dir: str | Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rt = setup_runtime(cfg)
        torch.manual_seed(cfg.train.seed)
        streams = build_streams(cfg.data, cfg.model.vocab_size, progress=self.rt.is_main)
        if self.rt.is_main:  # tools (generate, predictor) read the run's own tokenizer
            shutil.copyfile(streams.tokenizer, self.run_dir / "tokenizer.model")
        self.train_seqs = streams.sequences("train", cfg.data.seq_len)
        self.val_seqs = streams.sequences("val", cfg.data.seq_len) if cfg.train.eval_every else None
        self.loader = BatchLoader(
            self.train_seqs,
            cfg.train.batch_size,
            cfg.data.seed,
            self.rt.process_index,
            self.rt.process_count,
        )
        self.stop_requested = False  # set by SIGTERM: checkpoint, then leave the loop
        self.ckpt_dir = cfg.checkpoint.dir or str(self.run_dir / "checkpoints")
        self.ckpt = Checkpointer(
            self.ckpt_dir, cfg.checkpoint.keep, cfg.checkpoint.async_save, self.rt.is_main
        )
        self.step = 0
        model = build_model(cfg.model, seed=cfg.train.seed)
        model.remat = cfg.train.remat
        resume = self._find_resume()
        restored = self._load(resume, model) if resume else None
        self.model = model.to(self.rt.device)
        specs = {}
        if self.rt.xla:
            from modxla.parallel import shard_model

            specs = shard_model(self.model, self.rt.mesh)
        self.opt = build_optimizer(self.model, cfg.optimizer)
        if restored:
            self._restore(restored, specs)
        if self.rt.is_main:  # only now: a refused resume leaves the run's config untouched
            save_config(cfg, self.run_dir / "config.yaml")
        self.flops = flops_per_step(cfg)
        self.tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
        self.peak = peak_flops_per_device(cfg, self.rt)
        if self.rt.xla:
            import torch_xla

            self._train_step = torch_xla.compile(train_step, full_graph=True, name="train_step")
            self._eval_step = torch_xla.compile(eval_step, full_graph=True, name="eval_step")
        else:
            self._train_step, self._eval_step = train_step, eval_step

    def _after_sync(self, fn, args) -> None:
        """Run `fn(*args)` once the step's tensors exist, without forcing a sync per step."""
        if self.rt.xla:
            import torch_xla.core.xla_model as xm

            xm.add_step_closure(fn, args=args)
        else:
            fn(*args)

    def _find_resume(self) -> str | None:
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            return None
        path = latest_checkpoint(self.ckpt_dir, warn=_say)
        if path is None and mode == "must":
            raise CheckpointError(f"resume: no complete checkpoint in {self.ckpt_dir}")
        return path

    def _load(self, path: str, model: torch.nn.Module) -> dict:
        """Read a checkpoint into host tensors; the model (on the CPU) takes its weights."""
        # Either layout (unrolled or scanned) loads into either: the template follows the
        # checkpoint's layout, and the loaded tensors are converted to the model's.
        unit, scan = self.cfg.model.scan_unit, self.cfg.model.scan
        saved_scan = is_stacked(k[6:] for k in read_metadata(path) if k.startswith("model."))
        state = convert_state(model.state_dict(), unit, saved_scan)
        check_model_shapes(path, state)
        opt = build_optimizer(model, self.cfg.optimizer)
        opt_template = opt.state_dict()
        names = optimizer_names(state)  # the checkpoint's optimizer order
        params = [state[n] for n in names]
        moments = MOMENT_DTYPES[self.cfg.optimizer.moment_dtype]
        opt_template["state"] = {
            i: {
                "step": torch.zeros(()),
                "exp_avg": torch.zeros_like(p, dtype=moments),
                "exp_avg_sq": torch.zeros_like(p, dtype=moments),
            }
            for i, p in enumerate(params)
        }
        meta = {
            "step": 0,
            "loader": self.loader.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "xla_rng": 0,
        }
        loaded = load_checkpoint(path, {"model": state, "optim": opt_template, "meta": meta})
        own = optimizer_names(model.state_dict())
        loaded["optim"] = convert_optimizer_state(loaded["optim"], names, own, unit)
        model.load_state_dict(convert_state(loaded["model"], unit, scan))
        _say(f"resuming from {path} (step {loaded['meta']['step']})")
        return loaded

    def _restore(self, loaded: dict, specs: dict) -> None:
        """Optimizer state (sharded like its parameter), step, data position and RNG."""
        self.opt.load_state_dict(loaded["optim"])
        if self.rt.xla:
            import torch_xla.core.xla_model as xm
            import torch_xla.distributed.spmd as xs

            for name, p in self.model.named_parameters():
                for key in ("exp_avg", "exp_avg_sq"):
                    t = self.opt.state[p][key]
                    if specs.get(name) is not None:
                        xs.mark_sharding(t, self.rt.mesh, specs[name])
            xm.set_rng_state(int(loaded["meta"]["xla_rng"]))
        meta = loaded["meta"]
        self.step = int(meta["step"])
        self.loader.load_state_dict(meta["loader"])
        torch.set_rng_state(meta["torch_rng"])

    def save(self) -> str:
        loader = {**self.loader.state_dict(), "batch": self.step * self.cfg.train.grad_accum}
        xla_rng = 0
        if self.rt.xla:
            import torch_xla.core.xla_model as xm

            xla_rng = xm.get_rng_state()
        meta = {
            "step": self.step,
            "loader": loader,
            "torch_rng": torch.get_rng_state(),
            "xla_rng": xla_rng,
        }
        state = {"model": self.model.state_dict(), "optim": self.opt.state_dict(), "meta": meta}
        path = self.ckpt.save(self.step, state)
        _say(f"checkpoint step {self.step} -> {path}")
        return path

    def evaluate(self) -> torch.Tensor:
        """Mean validation loss over the first `eval_batches` fixed validation batches."""
        cfg = self.cfg.train
        loader = BatchLoader(
            self.val_seqs,
            cfg.batch_size,
            0,
            self.rt.process_index,
            self.rt.process_count,
            shuffle=False,
        )
        batches = [next(loader) for _ in range(cfg.eval_batches)]
        losses = [self._eval_step(self.model, b, cfg.dtype) for b in feed(batches, self.rt, 0)]
        return torch.stack(losses).mean()

    def fit(self, logger) -> list[dict]:
        cfg = self.cfg
        history: list[dict] = []
        last = {"t": time.perf_counter(), "step": self.step}

        def record(step: int, stats: dict, lr: float) -> None:
            now = time.perf_counter()
            dt = (now - last["t"]) / max(1, step - last["step"])
            last.update(t=now, step=step)
            rec = {"step": step, "lr": lr, **{k: float(v) for k, v in stats.items()}}
            rec.update(
                step_time_s=dt,
                tokens_per_s=self.tokens_per_step / dt,
                flops_per_step=self.flops,
                mfu=mfu(self.flops, dt, self.peak, self.rt.num_devices),
                compiles=compile_count() if self.rt.xla else 0,
            )
            history.append(rec)
            logger.log(rec)

        def record_eval(step: int, loss: torch.Tensor) -> None:
            rec = {"step": step, "val_loss": float(loss)}
            history.append(rec)
            logger.log(rec)

        if self.val_seqs is not None and self.step == 0:
            self._after_sync(record_eval, (0, self.evaluate()))
        batches = feed(_grouped(self.loader, cfg.train.grad_accum), self.rt, 1)
        while self.step < cfg.train.steps:
            lr = lr_at(self.step, cfg.optimizer, cfg.train.steps)
            set_lr(self.opt, lr)
            stats = self._train_step(
                self.model, self.opt, next(batches), cfg.optimizer.grad_clip, cfg.train.dtype
            )
            self.step += 1
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                self._after_sync(record, (self.step, stats, lr))
            if (
                cfg.train.eval_every
                and self.val_seqs is not None
                and (self.step % cfg.train.eval_every == 0 or self.step == cfg.train.steps)
            ):
                self._after_sync(record_eval, (self.step, self.evaluate()))
            if self.rt.xla:
                import torch_xla

                torch_xla.sync()  # runs pending closures
            every = cfg.checkpoint.every
            if self.stop_requested or (every and self.step % every == 0):
                saved = self.save()
            if self.stop_requested:
                _say(f"stop requested: left at step {self.step}, checkpoint {saved}")
                break
        else:
            if not (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                self.save()
        self.ckpt.close()
        self.loader.batch = self.step * cfg.train.grad_accum  # what the steps consumed
        return history


def train(cfg: Config, run_dir: str | Path) -> list[dict]:
    """Train `cfg` into `run_dir`; returns the logged records (also in metrics.jsonl)."""
    from modxla.logger import MetricsLogger

    trainer = Trainer(cfg, run_dir)
    if trainer.step and trainer.rt.is_main:
        _truncate_metrics(trainer.run_dir / "metrics.jsonl", trainer.step)
    logger = MetricsLogger(trainer.run_dir, cfg.train.steps, trainer.step, trainer.rt.is_main)

    def on_term(signum, frame):  # preemption: finish the step, save, exit cleanly
        if not trainer.stop_requested:
            _say(f"signal {signum}: saving a checkpoint after this step")
        trainer.stop_requested = True  # a second signal changes nothing

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        return trainer.fit(logger)
    finally:
        signal.signal(signal.SIGTERM, previous)
        logger.close()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after the checkpoint we resume from (they will be logged again)."""
    if not path.exists():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in keep))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="modxla-train",
        description="Train a MoD (or dense baseline) transformer; writes the run directory: "
        "config.yaml, metrics.jsonl, tb/, checkpoints/.",
    )
    ap.add_argument("--config", help="YAML experiment config (see configs/)")
    ap.add_argument("--run-dir", required=True, help="output directory (local path)")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint, failing if there is none "
        "(without it, checkpoint.resume=auto resumes when one exists)",
    )
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    args = ap.parse_args(argv)
    try:
        overrides = [*args.overrides, *(["checkpoint.resume=must"] if args.resume else [])]
        cfg = load_config(args.config, overrides)
        train(cfg, args.run_dir)
    except (ConfigError, DataError, MeshError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
