"""The trainer: one run's state (model, optimizer, data position, checkpoints) and its loop."""

from __future__ import annotations

import copy
import time

import torch

from modxla.analysis.flops import flops_per_step, mfu
from modxla.analysis.goodput import Recorder
from modxla.config import Config
from modxla.data import BatchLoader, build_streams
from modxla.data.tokenizer import file_digest
from modxla.errors import EXIT_CRASH, EXIT_HUNG, EXIT_OK, EXIT_STOPPED, DivergenceError, UserError
from modxla.io import rundir
from modxla.io.checkpoint import CheckpointError, check_model_shapes, read_marker, read_metadata
from modxla.io.checkpoint import load as load_checkpoint
from modxla.io.layout import convert_state, is_stacked
from modxla.io.logger import say
from modxla.model import build_model
from modxla.train import identity
from modxla.train.guard import DivergenceGuard, guarded_step
from modxla.train.loop import Loop, StopRequest
from modxla.train.optim import (
    build_optimizer,
    convert_optimizer_state,
    optimizer_names,
    optimizer_state,
    restore_state,
    set_lr,
    state_template,
    step_state,
)
from modxla.train.schedule import lr_at
from modxla.train.step import eval_step
from modxla.train.watchdog import Watchdog
from modxla.xla.runtime import peak_flops_per_device, setup_runtime


def _grouped(loader: BatchLoader, accum: int):
    while True:
        yield torch.stack([next(loader) for _ in range(accum)])  # (A, B/P, T+1)


class Trainer(Loop):
    """Holds the state one run shares between steps, evaluation and checkpoints."""

    def __init__(self, cfg: Config, run_dir: str, stop: StopRequest | None = None) -> None:
        self.cfg = cfg
        self.goodput: Recorder | None = None  # set by train(): the attempt's timeline
        marks = [("start", time.time())]  # setup_s: seconds of each part of the set-up
        self.run_dir = str(run_dir)  # a path or URL (gs://...): never a pathlib.Path
        rundir.makedirs(self.run_dir)
        self.rt = rt = setup_runtime(cfg)
        marks.append(("runtime", time.time()))
        torch.manual_seed(cfg.train.seed)
        streams = build_streams(cfg.data, cfg.model.vocab_size, progress=rt.is_main)
        self.tokenizer = str(streams.tokenizer)
        self.tokenizer_digest = file_digest(self.tokenizer)  # part of the run's identity
        self.train_seqs = streams.sequences("train", cfg.data.seq_len)
        self.val_seqs = streams.sequences("val", cfg.data.seq_len) if cfg.train.eval_every else None
        self.loader = BatchLoader(self.train_seqs, cfg.train.batch_size, cfg.data.seed)
        self.ckpt_dir = rundir.checkpoints(self.run_dir, cfg)
        self.config_changes: dict[str, list] = {}  # what this resume changed (metrics.jsonl)
        c = cfg.checkpoint
        super().__init__(rt, self.ckpt_dir, cfg.train.steps, c.every, c.keep, c.async_save, stop)
        marks.append(("data", time.time()))
        model = build_model(cfg.model, seed=cfg.train.seed)
        model.remat = cfg.train.remat
        marks.append(("model", time.time()))
        restored = self.resume(cfg.checkpoint.resume, lambda path: self._load(path, model))
        self.model = model.to(rt.device)
        self.specs = rt.shard_model(self.model)
        self.opt = build_optimizer(self.model, cfg.optimizer)
        if restored:
            self._restore(restored)
        marks.append(("resume_and_shard", time.time()))
        if rt.is_main:  # only now: a refused resume leaves the run's files untouched
            rundir.save_config(cfg, self.run_dir)
            # tools (generate, predictor) read the run's own tokenizer
            rundir.put_file(self.tokenizer, rundir.join(self.run_dir, rundir.TOKENIZER))
        self.flops = flops_per_step(cfg)
        self.tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
        self.peak = peak_flops_per_device(cfg, rt)
        self.guard = DivergenceGuard(cfg.train, self.step, rt.device)
        t = cfg.train
        self.watchdog = Watchdog(
            self.run_dir, rt.hosts.index, t.hang_timeout_s, t.hang_first_step_s
        )
        self._train_step = rt.compile(
            guarded_step, "train_step", state=lambda: step_state(self.model, self.opt)
        )
        self._eval_step = rt.compile(eval_step, "eval_step")
        marks.append(("other", time.time()))
        self.setup_s = {k: t - marks[i][1] for i, (k, t) in enumerate(marks[1:])}

    @property
    def data_position(self) -> int:
        """Global batches the finished steps consumed (the device feed reads ahead of it)."""
        return self.step * self.cfg.train.grad_accum

    def _meta(self) -> dict:
        """Step, data position and RNG state: what a resumed run needs besides the tensors."""
        return {
            "step": self.step,
            "loader": {**self.loader.state_dict(), "batch": self.data_position},
            "torch_rng": torch.get_rng_state(),
            "xla_rng": self.rt.rng_state(),
        }

    def marker(self) -> dict:
        return {
            "config": identity.flat(self.cfg),
            "identity": identity.identity_hash(self.cfg),
            "tokenizer": self.tokenizer_digest,
        }

    def _check_identity(self, path: str) -> None:
        """Refuse a checkpoint of another run; note (and allow) what may change on resume."""
        marker = read_marker(path)
        saved = marker.get("config")
        if marker.get("tokenizer", self.tokenizer_digest) != self.tokenizer_digest:
            raise CheckpointError(
                f"resume: {path} was trained with another tokenizer than the data gives now "
                f"({self.tokenizer}: the corpus or the tokenizer settings changed). Use "
                "another --run-dir, or data.tokenizer=<the run's tokenizer.model>"
            )
        if saved is None:  # written before checkpoints recorded their config
            say(f"{path} records no config: resuming without checking it is this run")
            return
        diff = identity.changes(saved, self.cfg)
        if diff["identity"]:
            raise CheckpointError(
                f"resume: {path} is another run: {identity.describe(diff['identity'])}. "
                "Use another --run-dir for it"
            )
        if diff["schedule"] and not self.cfg.checkpoint.allow_schedule_change:
            raise CheckpointError(
                f"resume: {path} was trained with another schedule: "
                f"{identity.describe(diff['schedule'])}. Pass --allow-schedule-change "
                "(checkpoint.allow_schedule_change=true) to continue with the new one"
            )
        self.config_changes = {**diff["schedule"], **diff["free"]}
        if diff["schedule"]:
            step, o = int(marker["step"]), self.cfg.optimizer
            old = copy.deepcopy(self.cfg)
            for key, (value, _) in diff["schedule"].items():
                section, name = key.split(".", 1)
                setattr(getattr(old, section), name, value)
            say(
                f"schedule changed at step {step}: {identity.describe(diff['schedule'])}; "
                f"lr {lr_at(step, old.optimizer, old.train.steps):.3g} -> "
                f"{lr_at(step, o, self.cfg.train.steps):.3g} at this step, warmup "
                f"{o.warmup_steps}, cosine to {o.lr * o.min_lr_ratio:.3g} at step "
                f"{self.cfg.train.steps}"
            )

    def _load(self, path: str, model: torch.nn.Module) -> dict:
        """Read a checkpoint into host tensors; the model (on the CPU) takes its weights."""
        self._check_identity(path)
        # Either layout (unrolled or scanned) loads into either: the template follows the
        # checkpoint's layout, and the loaded tensors are converted to the model's.
        unit, scan = self.cfg.model.scan_unit, self.cfg.model.scan
        saved_scan = is_stacked(k[6:] for k in read_metadata(path) if k.startswith("model."))
        state = convert_state(model.state_dict(), unit, saved_scan)
        check_model_shapes(path, state)
        names = optimizer_names(state)  # the checkpoint's optimizer order
        template = {
            "model": state,
            "optim": state_template(model, self.cfg.optimizer, [state[n] for n in names]),
            "meta": self._meta(),
        }
        loaded = load_checkpoint(path, template)  # checksums verified as it reads
        own = optimizer_names(model.state_dict())
        loaded["optim"] = convert_optimizer_state(loaded["optim"], names, own, unit)
        model.load_state_dict(convert_state(loaded["model"], unit, scan))
        say(f"resuming from {path} (step {loaded['meta']['step']})")
        return loaded

    def _restore(self, loaded: dict) -> None:
        """Optimizer state (sharded like its parameter), step, data position and RNG."""
        restore_state(
            self.opt,
            self.model,
            loaded["optim"],
            lambda t, name: self.rt.shard_like(t, self.specs.get(name)),
        )
        meta = loaded["meta"]
        self.step = int(meta["step"])
        self.loader.load_state_dict(meta["loader"])
        torch.set_rng_state(meta["torch_rng"])
        self.rt.set_rng_state(meta["xla_rng"])

    def save(self) -> str | None:
        g = self.goodput
        if g:
            g.event("save_start", self.step)
        path = super().save()
        if g:
            g.event("save_end", self.step, written=path is not None)
        return path

    def _after(self, n: int) -> None:  # step n done (its closures ran): goodput progress
        if self.goodput:
            if n == self._first_step:
                self.goodput.event("first_step", n)
            elif n % self.cfg.train.log_every == 0:
                self.goodput.event("step", n)

    def before_save(self) -> None:
        self.guard.check()  # a step since the last check diverged: raise, write nothing

    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optim": optimizer_state(self.opt),
            "meta": self._meta(),
        }

    def evaluate(self) -> torch.Tensor:
        """Mean validation loss over the first `eval_batches` fixed validation batches."""
        cfg, rt = self.cfg.train, self.rt
        loader = BatchLoader(self.val_seqs, cfg.batch_size, 0, shuffle=False)
        batches = [next(loader) for _ in range(cfg.eval_batches)]
        losses = [self._eval_step(self.model, b, cfg.dtype) for b in rt.feed(batches, 0)]
        return torch.stack(losses).mean()

    def _due(self, every: int, step: int) -> bool:
        return bool(every) and (step % every == 0 or step == self.cfg.train.steps)

    def fit(self, logger) -> list[dict]:
        cfg, rt, guard = self.cfg, self.rt, self.guard
        history: list[dict] = []
        last = {"t": time.perf_counter(), "step": self.step}

        def record(step: int, stats: dict, health: torch.Tensor, lr: float) -> None:
            now = time.perf_counter()
            dt = (now - last["t"]) / max(1, step - last["step"])
            last.update(t=now, step=step)
            rec = {"step": step, "lr": lr, **{k: float(v) for k, v in stats.items()}}
            rec.update(guard.observe(rec["loss"], health))
            rec.update(
                step_time_s=dt,
                tokens_per_s=self.tokens_per_step / dt,
                flops_per_step=self.flops,
                mfu=mfu(self.flops, dt, self.peak, rt.num_devices),
                compiles=rt.compile_count(),
            )
            history.append(rec)
            logger.log(rec)

        def record_eval(step: int, loss: torch.Tensor) -> None:
            rec = {"step": step, "val_loss": float(loss)}
            history.append(rec)
            logger.log(rec)

        if self.config_changes:  # in the run's history, at the step they took effect
            rec = {"step": self.step, "config_changes": self.config_changes}
            history.append(rec)
            logger.log(rec)
        if self.val_seqs is not None and self.step == 0:
            rt.after_step(record_eval, 0, self.evaluate())
        batches = rt.feed(_grouped(self.loader, cfg.train.grad_accum), 1)

        def step(n: int) -> None:  # train step n, log and evaluate at it
            lr = lr_at(n - 1, cfg.optimizer, cfg.train.steps)
            set_lr(self.opt, lr)
            stats, guard.health = self._train_step(
                self.model,
                self.opt,
                next(batches),
                cfg.optimizer.grad_clip,
                cfg.train.dtype,
                guard.health,
                guard.limit,
                guard.skip,
            )
            if self._due(cfg.train.log_every, n):
                rt.after_step(record, n, stats, guard.health, lr)
            if self.val_seqs is not None and self._due(cfg.train.eval_every, n):
                rt.after_step(record_eval, n, self.evaluate())

        self._first_step = self.step + 1
        self.run(step, stop=lambda: guard.problem, after=self._after)
        guard.check()  # a divergence seen at a log step: stop with its message
        return history


def train(cfg: Config, run_dir: str) -> bool:
    """Train `cfg` into `run_dir` (records in metrics.jsonl); False if a signal stopped it
    before train.steps."""
    from modxla.io.logger import MetricsLogger

    started = time.time()
    with StopRequest().on_sigterm() as stop:
        trainer = Trainer(cfg, run_dir, stop)  # a failure here is not in goodput.jsonl
        gp = trainer.goodput = Recorder(trainer.run_dir, trainer.rt.is_main)
        gp.event("start", trainer.step, t=started)
        gp.event("setup", trainer.step, setup_s=trainer.setup_s)
        trainer.watchdog.on_hang = lambda: gp.event(
            "end", trainer.step, cause="hung", exit_code=EXIT_HUNG
        )  # written in place; not uploaded for a URL (the run directory may be what hangs)
        trainer.on_checkpoint.append(gp.sync)
        end = {"cause": "crashed", "exit_code": EXIT_CRASH}
        # records logged after the checkpoint we resume from are dropped (logged again)
        logger = MetricsLogger(trainer.run_dir, cfg.train.steps, trainer.step, trainer.rt.is_main)
        trainer.on_checkpoint.append(logger.sync)
        try:
            trainer.fit(logger)
            finished = trainer.step >= cfg.train.steps
            end = {"cause": "finished", "exit_code": EXIT_OK}
            if not finished:
                end = {"cause": "stopped", "exit_code": EXIT_STOPPED}
            return finished
        except DivergenceError as e:
            end = {"cause": "diverged", "exit_code": e.exit_code}
            raise
        except UserError as e:
            end = {"cause": "error", "exit_code": e.exit_code, "error": type(e).__name__}
            raise
        except Exception as e:
            end["error"] = type(e).__name__
            raise
        except BaseException as e:  # KeyboardInterrupt, SystemExit
            end = {"cause": "interrupted", "error": type(e).__name__}
            raise
        finally:
            logger.close()
            gp.event("end", trainer.step, **end)
            gp.close()
