"""Post-hoc training of the causal routing predictors on a frozen model (modxla-train-predictor)."""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modxla.config import Config, OptimizerConfig
from modxla.data import BatchLoader, build_streams
from modxla.errors import UserError
from modxla.inference.load import predictor_ckpt_dir
from modxla.io import rundir
from modxla.io.checkpoint import (
    CheckpointError,
    checkpoint_id,
    list_checkpoints,
    load,
    load_newest,
    read_marker,
    read_metadata,
)
from modxla.io.logger import MetricsLogger, say
from modxla.model import Transformer, build_model
from modxla.routing.evaluate import evaluate_routing, predictor_quality
from modxla.train.loop import Loop, StopRequest
from modxla.train.optim import build_optimizer, optimizer_state, restore_state, state_template
from modxla.xla.runtime import setup_runtime

INITS = ("auto", "fresh", "continue")


@dataclass
class PredictorOptions:
    steps: int = 300
    lr: float = 1e-2
    log_every: int = 10
    eval_batches: int = 8
    init: str = "auto"  # auto | fresh | continue (see the module docstring)
    restart: bool = False  # delete earlier predictor checkpoints of this run first
    resume: bool = False  # continue from a predictor checkpoint, failing if there is none
    checkpoint_every: int = 0  # 0 = at the end (and on SIGTERM)
    keep: int = 2
    eval_every: int = 0  # steps between logged validation evals; 0 = only at the end
    hidden: int = 0  # predictor MLP width; 0 = the run's model.mod.predictor_hidden
    input: str = ""  # x | normed; "" = the run's model.mod.predictor_input
    pos_weight: str = ""  # BCE weight of the routed class: a number or "balanced"; "" = 1


def predictor_step(
    model: Transformer, opt, batch: torch.Tensor, pos_weight: float | None = None
) -> dict[str, torch.Tensor]:
    """One step on the predictors only: the model is frozen, their input is stop_gradient(x)."""
    out = model(batch[:, :-1])
    loss = out.predictor_loss if pos_weight is None else weighted_bce(out.routing, pos_weight)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    stats = {"predictor_loss": loss.detach()}
    stats.update(out.block_stats)  # per routed block: routed_frac, predictor_acc; moe_*
    accs = [v for k, v in stats.items() if k.startswith(("predictor_acc/", "moe_predictor_acc/"))]
    stats["predictor_acc/mean"] = torch.stack(accs).mean()
    return {k: v.detach() for k, v in stats.items() if not k.startswith("routed_frac")}


def weighted_bce(routing, pos_weight: float) -> torch.Tensor:
    """Predictor BCE against top-k membership with the routed class weighted, mean over
    routed blocks (a Python float weight: no tensor to create inside the compiled step)."""
    losses = []
    for info in routing:
        p, y = info.predictor_logits, info.topk_mask
        losses.append(-(pos_weight * y * F.logsigmoid(p) + (1 - y) * F.logsigmoid(-p)).mean())
    return torch.stack(losses).mean()


def _is_predictor(name: str) -> bool:
    return ".predictor." in name


def _expert_choice(cfg) -> bool:
    return cfg.model.expert_choice


def trained_predictors(cfg) -> list[str]:
    """The kinds of predictor the run trained jointly: 'mod' (routed blocks), 'moe'."""
    m = cfg.model
    kinds = [("mod", bool(m.routed_layers) and m.mod.predictor)]
    kinds.append(("moe", _expert_choice(cfg) and m.moe.predictor))
    return [k for k, on in kinds if on]


def has_predictors(cfg) -> bool:
    """Whether every causal rule of the run's model has its predictor: each routed block's
    (model.mod.predictor) and each expert-choice MoE layer's (model.moe.predictor)."""
    m = cfg.model
    return (not m.routed_layers or m.mod.predictor) and (not _expert_choice(cfg) or m.moe.predictor)


class PredictorTrainer(Loop):
    """The frozen model with trainable predictors, its optimizer, data and checkpoints."""

    def __init__(self, run_dir: str, opts: PredictorOptions, stop: StopRequest | None = None):
        if opts.init not in INITS:
            raise UserError(f"--init must be one of {', '.join(INITS)}, got {opts.init!r}")
        if opts.restart and opts.resume:
            raise UserError("--restart and --resume exclude each other")
        # run-dir file access: config.yaml in, predictor/ out (kept to these lines)
        self.run_dir = str(run_dir)  # a path or URL (gs://...)
        self.out_dir = rundir.join(self.run_dir, rundir.PREDICTOR)
        run_cfg = rundir.load_config(self.run_dir)
        if not run_cfg.model.routed_layers and not _expert_choice(run_cfg):
            raise UserError(
                f"{run_dir} trains a model without routed blocks or expert-choice MoE layers: "
                "no predictor"
            )
        self.opts = opts
        self.init = opts.init
        # continue: the jointly trained predictors go on, any other starts fresh (a staged
        # MoDE may have trained MoD's predictors but not its expert-choice MoE's)
        m = run_cfg.model
        trained = trained_predictors(run_cfg)
        needed = [k for k, on in (("mod", m.routed_layers), ("moe", _expert_choice(run_cfg))) if on]
        if opts.init == "auto":
            self.init = "continue" if trained else "fresh"
        self.fresh_kinds = (
            [k for k in needed if k not in trained] if self.init == "continue" else []
        )
        if self.init == "continue" and not trained:
            key = "mod" if m.routed_layers and not m.mod.predictor else "moe"
            raise UserError(
                f"{run_dir} was trained with model.{key}.predictor: false: there are no "
                "predictors to continue from (use --init fresh)"
            )
        self.cfg: Config = copy.deepcopy(run_cfg)
        self.cfg.model.mod.predictor = True  # fresh predictors are added to such a model
        self.cfg.model.moe.predictor = _expert_choice(run_cfg)  # and to expert-choice MoE
        self._ablation(run_cfg)
        self.base_dir = rundir.checkpoints(self.run_dir, run_cfg)
        if not list_checkpoints(self.base_dir, warn=say):  # before any costly setup
            raise CheckpointError(f"{run_dir} has no complete checkpoint to load")

        self.rt = rt = setup_runtime(self.cfg)
        streams = build_streams(self.cfg.data, self.cfg.model.vocab_size, progress=False)
        self.train_seqs = streams.sequences("train", self.cfg.data.seq_len)
        self.val_seqs = streams.sequences("val", self.cfg.data.seq_len)
        self.loader = BatchLoader(
            self.train_seqs,
            self.cfg.train.batch_size,
            self.cfg.data.seed + 1,  # another order than the model saw
        )
        model = build_model(self.cfg.model, seed=self.cfg.train.seed)  # fresh predictors
        ckpt_dir = predictor_ckpt_dir(self.run_dir)
        super().__init__(rt, ckpt_dir, opts.steps, opts.checkpoint_every, opts.keep, stop=stop)
        if opts.restart and rt.is_main:
            self.ckpt.clear()  # asked for: a complete step is otherwise never rewritten
        found = load_newest(self.base_dir, lambda path: self._load_base(model, path), say)
        if found is None:
            raise CheckpointError(f"{run_dir} has no checkpoint that passes its checksums")
        self.base = found[0]
        self.base_id = checkpoint_id(self.base)  # recorded by every predictor checkpoint
        for name, p in model.named_parameters():
            p.requires_grad_(_is_predictor(name))
        self.ocfg = OptimizerConfig(lr=opts.lr, weight_decay=0.0, warmup_steps=0)
        mode = "must" if opts.resume else "auto"
        read = functools.partial(self._load_resume, model=model)
        restored = None if opts.restart else self.resume(mode, read)
        self.model = model.to(rt.device)
        specs = rt.shard_model(self.model)
        self.opt = build_optimizer(self.model, self.ocfg)
        if restored:
            restore_state(
                self.opt, self.model, restored, lambda t, n: rt.shard_like(t, specs.get(n))
            )
        step = functools.partial(predictor_step, pos_weight=self.pos_weight)
        self._step = rt.compile(step, "predictor_step")
        self._eval_copy = None  # a CPU model for evals during XLA training
        if rt.is_main:
            rundir.makedirs(self.out_dir)
            rundir.save_config(self.cfg, self.out_dir)  # what loads the checkpoints

    def _ablation(self, run_cfg: Config) -> None:
        """--hidden, --input, --pos-weight: a predictor unlike the run's starts fresh."""
        mod, opts = self.cfg.model.mod, self.opts
        for name, value in (("hidden", opts.hidden), ("input", opts.input)):
            key = "predictor_hidden" if name == "hidden" else "predictor_input"
            if value and value != getattr(run_cfg.model.mod, key):
                if opts.init == "continue":
                    raise UserError(
                        f"--{name} {value} differs from the run's predictors "
                        f"({getattr(run_cfg.model.mod, key)}): pass --init fresh or auto"
                    )
                self.init = "fresh"  # auto: nothing of that shape to continue from
                setattr(mod, key, value)
        if opts.input and opts.input not in ("x", "normed"):
            raise UserError(f"--input must be x or normed, got {opts.input!r}")
        self.pos_weight = None
        if opts.pos_weight:
            c = mod.capacity
            try:
                w = (1 - c) / c if opts.pos_weight == "balanced" else float(opts.pos_weight)
            except ValueError:
                w = 0.0
            if not w > 0:
                raise UserError(f"--pos-weight must be > 0 or 'balanced', got {opts.pos_weight}")
            if self.cfg.model.scan:
                raise UserError("--pos-weight needs model.scan: false (per-block logits)")
            if _expert_choice(self.cfg):  # its balance is MoD's capacity; top-C's is another
                raise UserError("--pos-weight weighs MoD's predictors only: not with expert choice")
            self.pos_weight = w

    def _load_base(self, model: Transformer, path: str) -> None:
        """The training checkpoint's weights; its predictors too when continuing."""
        saved = {k[len("model.") :] for k in read_metadata(path) if k.startswith("model.")}
        state = model.state_dict()
        keep = {
            k: v
            for k, v in state.items()
            if k in saved and (self.init == "continue" or not _is_predictor(k))
        }
        missing = sorted(k for k in state if k not in keep and not _is_predictor(k))
        if missing:
            raise CheckpointError(f"{path} does not match the run's config: missing {missing[:5]}")
        loaded = load(path, {"model": keep})  # checksums verified as it reads
        model.load_state_dict(loaded["model"], strict=False)
        how = {
            "fresh": "fresh predictors (new initialisation)",
            "continue": "continuing from the jointly trained predictors",
        }[self.init]
        if self.fresh_kinds:
            how += "; fresh: " + ", ".join(f"model.{k} predictors" for k in self.fresh_kinds)
        say(f"{how}; frozen model from {path}")

    def marker(self) -> dict:
        return {"base": self.base_id}

    def _load_resume(self, path: str, model: Transformer) -> dict:
        base = read_marker(path).get("base")
        if base is not None and base != self.base_id:
            raise UserError(
                f"{path} holds predictors trained on the run's checkpoint of step "
                f"{base['step']}; its newest is now step {self.base_id['step']} ({self.base}): "
                "pass --restart to train predictors on it"
            )
        template = {
            "model": model.state_dict(),
            "optim": state_template(model, self.ocfg),
            "meta": {"step": 0, "loader": self.loader.state_dict(), "init": ""},
        }
        loaded = load(path, template)
        if loaded["meta"]["init"] != self.init:
            raise UserError(
                f"{path} holds predictors trained with --init {loaded['meta']['init']}, not "
                f"{self.init}: pass --restart to start over"
            )
        model.load_state_dict(loaded["model"])
        self.step = int(loaded["meta"]["step"])
        self.loader.load_state_dict(loaded["meta"]["loader"])
        say(f"resuming predictor training from {path} (step {self.step})")
        return loaded["optim"]

    def state(self) -> dict:
        # one batch per step; the device feed reads ahead of the loader's own counter
        loader = {**self.loader.state_dict(), "batch": self.step}
        meta = {"step": self.step, "loader": loader, "init": self.init}
        return {"model": self.model.state_dict(), "optim": optimizer_state(self.opt), "meta": meta}

    def val_batches(self) -> list[torch.Tensor]:
        """The first --eval-batches validation batches."""
        val = BatchLoader(self.val_seqs, self.cfg.train.batch_size, 0, shuffle=False)
        return [next(val) for _ in range(self.opts.eval_batches)]

    def eval_record(self, batches) -> dict[str, float]:
        """Predictor quality on validation batches, as metrics.jsonl keys (val/...)."""
        model = self.model
        if self.rt.xla:  # evaluate a CPU copy: no graph of its own to compile
            if self._eval_copy is None:
                self._eval_copy = build_model(self.cfg.model).eval()
            state = {k: v.cpu() for k, v in self.model.state_dict().items()}
            self._eval_copy.load_state_dict(state)
            model = self._eval_copy
        q = predictor_quality(model, batches)
        rec = {f"val/{k}": q[k] for k in ("predictor_acc", "precision", "recall")}
        rec["val/always_skip_acc"] = q["always_skip_accuracy"]
        rec |= {f"val/predictor_acc/block{n}": a for n, a in q["blocks"].items()}
        rec |= {f"val/moe_predictor_acc/block{n}": a for n, a in q["moe_blocks"].items()}
        return rec

    def fit(self, logger) -> bool:
        """Train the predictors to --steps; False when a signal stopped it first."""
        rt, opts = self.rt, self.opts
        batches = rt.feed(self.loader, 0)
        val = self.val_batches() if opts.eval_every else []

        def record(step: int, stats: dict) -> None:
            logger.log({"step": step, **{k: float(v) for k, v in stats.items()}})

        def step(n: int) -> None:
            stats = self._step(self.model, self.opt, next(batches))
            if n % opts.log_every == 0 or n == opts.steps:
                rt.after_step(record, n, stats)

        def evaluate(n: int) -> None:  # reads the weights: after the step ran
            if val and (n % opts.eval_every == 0 or n == opts.steps):
                logger.log({"step": n, **self.eval_record(val)})

        return self.run(step, after=evaluate)

    def evaluate(self) -> dict:
        """Routing evaluation on the first --eval-batches validation batches (every host
        evaluates the same ones)."""
        model = self.model.cpu().eval()
        result = evaluate_routing(model, self.val_batches())
        return result | {
            "base_checkpoint": self.base,
            "base_step": self.base_id["step"],
            "capacity": self.cfg.model.mod.capacity,
            "predictor_init": self.init,
            "fresh_predictors": [f"model.{k}" for k in self.fresh_kinds],  # when continuing
            "predictor_hidden": self.cfg.model.mod.predictor_hidden,
            "predictor_input": self.cfg.model.mod.predictor_input,
            "pos_weight": self.pos_weight or 1.0,
        }


def train_predictors(run_dir: str, opts: PredictorOptions) -> dict | None:
    """Train (or resume) the predictors of a run, then evaluate routing; returns eval.json,
    or None when a signal stopped the training (its step is saved: run it again)."""
    with StopRequest().on_sigterm() as stop:
        trainer = PredictorTrainer(run_dir, opts, stop)
        logger = MetricsLogger(
            trainer.out_dir, opts.steps, trainer.step, trainer.rt.is_main, desc="predictor"
        )
        trainer.on_checkpoint.append(logger.sync)
        try:
            finished = trainer.fit(logger)
        finally:
            logger.close()
    if not finished:
        return None
    result = trainer.evaluate()
    if trainer.rt.is_main:
        rundir.write_text(rundir.join(trainer.out_dir, rundir.EVAL), json.dumps(result, indent=2))
    return result
