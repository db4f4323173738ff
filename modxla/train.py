"""The training loop: python -m modxla.train --config FILE --run-dir DIR [key=value ...]."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from modxla.config import Config, ConfigError, load_config, save_config
from modxla.data import BatchLoader, DataError, build_streams
from modxla.metrics import flops_per_step, measure_matmul_peak, mfu, tpu_peak_flops
from modxla.model import build_model
from modxla.optim import build_optimizer, lr_at, set_lr
from modxla.parallel.mesh import MeshError, check_batch, resolve_mesh_shape
from modxla.step import eval_step, train_step


@dataclass
class Runtime:
    """Where the run executes: device, mesh, and this host's place among the hosts."""

    device: torch.device
    xla: bool
    mesh: object = None
    num_devices: int = 1
    process_index: int = 0
    process_count: int = 1

    @property
    def is_main(self) -> bool:
        return self.process_index == 0


_CACHE_READY = False


def setup_runtime(cfg: Config) -> Runtime:
    """SPMD over every XLA device (or a native device); validates mesh against batch."""
    global _CACHE_READY
    if cfg.train.device != "xla":
        if cfg.train.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("train.device: cuda requested but no CUDA device is available")
        return Runtime(torch.device(cfg.train.device), xla=False)
    import torch_xla
    import torch_xla.runtime as xr

    from modxla.parallel import build_mesh

    if cfg.train.compile_cache and not _CACHE_READY:
        cache = os.path.expanduser(cfg.train.compile_cache)
        os.makedirs(cache, exist_ok=True)
        xr.initialize_cache(cache, readonly=False)  # must precede the first compile
        _CACHE_READY = True
    xr.use_spmd()
    n = xr.global_runtime_device_count()
    shape = resolve_mesh_shape(cfg.mesh, n)
    check_batch(cfg.train.batch_size, shape, xr.process_count())
    return Runtime(
        device=torch_xla.device(),
        xla=True,
        mesh=build_mesh(cfg.mesh, n),
        num_devices=n,
        process_index=xr.process_index(),
        process_count=xr.process_count(),
    )


def peak_flops_per_device(cfg: Config, rt: Runtime) -> float:
    """Config value, else the TPU table, else the CPU's matmul rate shared among devices."""
    if cfg.train.peak_flops > 0:
        return cfg.train.peak_flops
    if rt.xla:
        import torch_xla.runtime as xr

        if xr.device_type() == "TPU":
            kind = os.environ.get("TPU_ACCELERATOR_TYPE", "")
            peak = tpu_peak_flops(kind)
            if peak:
                return peak
    cache = Path(os.path.expanduser(cfg.data.cache_dir)) / "cpu_peak_flops.json"
    if cache.exists():
        total = json.loads(cache.read_text())["flops"]
    else:
        total = measure_matmul_peak()
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"flops": total}))
    return total / rt.num_devices


def _grouped(loader: BatchLoader, accum: int):
    while True:
        yield torch.stack([next(loader) for _ in range(accum)])  # (A, B/P, T+1)


def _feed(batches, rt: Runtime, batch_dim: int):
    """Iterator of device batches, the batch axis sharded over (data, fsdp) under SPMD."""
    if not rt.xla:
        return (b.to(rt.device) for b in batches)
    import torch_xla.distributed.parallel_loader as pl
    import torch_xla.distributed.spmd as xs

    spec = [None] * (batch_dim + 2)
    spec[batch_dim] = ("data", "fsdp")
    return iter(
        pl.MpDeviceLoader(batches, rt.device, input_sharding=xs.ShardingSpec(rt.mesh, tuple(spec)))
    )


def compile_count() -> int:
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


class Trainer:
    """Holds the state one run shares between steps, evaluation and checkpoints."""

    def __init__(self, cfg: Config, run_dir: str | Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rt = setup_runtime(cfg)
        if self.rt.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
        torch.manual_seed(cfg.train.seed)
        streams = build_streams(cfg.data, cfg.model.vocab_size, progress=self.rt.is_main)
        self.train_seqs = streams.sequences("train", cfg.data.seq_len)
        self.val_seqs = streams.sequences("val", cfg.data.seq_len) if cfg.train.eval_every else None
        self.loader = BatchLoader(
            self.train_seqs,
            cfg.train.batch_size,
            cfg.data.seed,
            self.rt.process_index,
            self.rt.process_count,
        )
        self.model = build_model(cfg.model, seed=cfg.train.seed).to(self.rt.device)
        if self.rt.xla:
            from modxla.parallel import shard_model

            shard_model(self.model, self.rt.mesh)
        self.opt = build_optimizer(self.model, cfg.optimizer)
        self.step = 0
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
        losses = [self._eval_step(self.model, b, cfg.dtype) for b in _feed(batches, self.rt, 0)]
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
        batches = _feed(_grouped(self.loader, cfg.train.grad_accum), self.rt, 1)
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
        self.loader.batch = self.step * cfg.train.grad_accum  # what the steps consumed
        return history


def train(cfg: Config, run_dir: str | Path) -> list[dict]:
    """Train `cfg` into `run_dir`; returns the logged records (also in metrics.jsonl)."""
    from modxla.logger import MetricsLogger

    trainer = Trainer(cfg, run_dir)
    logger = MetricsLogger(trainer.run_dir, cfg.train.steps, trainer.step, trainer.rt.is_main)
    try:
        return trainer.fit(logger)
    finally:
        logger.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="modxla-train",
        description="Train a MoD (or dense baseline) transformer; writes the run directory: "
        "config.yaml, metrics.jsonl, tb/, checkpoints/.",
    )
    ap.add_argument("--config", help="YAML experiment config (see configs/)")
    ap.add_argument("--run-dir", required=True, help="output directory (local path)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg, args.run_dir)
    except (ConfigError, DataError, MeshError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
