"""Typed experiment configuration: YAML files plus dotted `key=value` overrides.

Every section is a dataclass; loading checks types, rejects unknown keys and validates values,
raising `ConfigError` with the dotted name of the offending key.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from modxla.errors import UserError

REMAT = ("none", "block")  # activation checkpointing policies (train.remat)


ROOT = Path(__file__).resolve().parent.parent  # the repository (configs/ lives here)


class ConfigError(UserError, ValueError):
    """A configuration key is unknown, mistyped or out of range."""


@dataclass
class ModConfig:
    capacity: float = 1.0  # fraction of tokens a routed block processes; 1.0 = baseline
    every: int = 2  # every `every`-th block routes (blocks every-1, 2*every-1, ...); 0 = none
    # learned | random (Gaussian router weights drawn each step). Was `routing`, which still
    # loads: that name now means only forward(routing=topk|predictor|router), the mode.
    router: str = "learned"
    aux_loss_weight: float = 0.0  # BCE of router logits vs top-k membership; 0 = off
    predictor: bool = True  # a small MLP per routed block on stop_gradient(x)
    predictor_hidden: int = 64
    predictor_input: str = "x"  # x | normed: the block's input, or it RMS-normalized
    predictor_loss_weight: float = 1.0  # predictor BCE; cannot touch the model (stop-gradient)


@dataclass
class MoEConfig:
    """Mixture-of-Experts MLP (Switch/GShard), and with noop_experts the integrated MoDE."""

    experts: int = 0  # E experts with parameters per MoE layer; 0 = off (dense MLPs)
    every: int = 1  # every `every`-th block's MLP is the MoE (blocks every-1, 2*every-1, ...)
    top_k: int = 1  # experts per token (token choice): 1 = Switch, 2 = GShard
    # per-sequence buffer of C = round(capacity_factor * n * top_k / (experts + noop_experts))
    # slots per expert, n the tokens the MLP sees (T, or MoD's k in a routed block)
    capacity_factor: float = 1.25
    routing: str = "token"  # token: each token picks top_k experts | expert: each picks top-C
    load_balance_weight: float = 0.01  # Switch: E * sum_e f_e * P_e
    z_loss_weight: float = 0.001  # mean logsumexp(router logits)^2
    noop_experts: int = 0  # integrated MoDE: parameter-free experts a token may choose (skip)
    # expert choice: a small MLP per MoE layer on stop_gradient(h) predicting, per expert,
    # membership of its top-C (what causal routing and decoding decide by); its width, input
    # and loss weight are model.mod's predictor_hidden, predictor_input, predictor_loss_weight
    predictor: bool = False


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    d_model: int = 256
    num_layers: int = 8
    num_heads: int = 4
    d_ff: int = 0  # 0 = derived: 8/3 d_model rounded up to 64 for swiglu, 4 d_model for gelu
    mlp: str = "swiglu"  # swiglu | gelu
    max_seq_len: int = 1024
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    scan: bool = False  # stack each period's blocks and run them with XLA scan (compiles once)
    mod: ModConfig = field(default_factory=ModConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def ffn_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.mlp == "swiglu":
            return -(-(8 * self.d_model // 3) // 64) * 64
        return 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def scan_unit(self) -> int:
        """Blocks in the repeating unit a scan iterates: one period of `every`, or one block."""
        return self.mod.every if self.routed_layers else 1

    @property
    def routed_layers(self) -> list[int]:
        """Indices of the blocks that route; empty for the dense baseline."""
        if self.mod.capacity >= 1.0 or self.mod.every == 0:
            return []
        e = self.mod.every
        return [i for i in range(self.num_layers) if i % e == e - 1]

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the blocks whose MLP is the MoE; empty when model.moe is off."""
        if self.moe.experts == 0 or self.moe.every == 0:
            return []
        e = self.moe.every
        return [i for i in range(self.num_layers) if i % e == e - 1]

    @property
    def expert_choice(self) -> bool:
        """MoE layers with expert-choice routing: not causal without their top-C predictor."""
        return bool(self.moe_layers) and self.moe.routing == "expert"

    @property
    def moe_predictor_layers(self) -> list[int]:
        """The MoE layers with a top-C predictor (expert choice with model.moe.predictor)."""
        return self.moe_layers if self.expert_choice and self.moe.predictor else []


@dataclass
class DataConfig:
    source: str = "stdlib"  # stdlib | path, glob or gs:// URL (txt, jsonl, parquet) | hub name
    hub_config: str = ""  # dataset config name, for hub sources
    text_field: str = "text"
    split: str = "train"
    streaming: bool = False  # hub sources only
    tokenizer: str = ""  # sentencepiece .model path; empty = train one on the source and cache it
    tokenizer_type: str = "bpe"  # bpe | unigram, when the tokenizer is trained here
    seq_len: int = 256
    val_fraction: float = 0.01
    cache_dir: str = "~/.cache/modxla"
    num_proc: int = 2
    max_chars: int = 0  # cap on corpus characters read (0 = all); keeps demos small
    seed: int = 0


@dataclass
class MeshConfig:
    data: int = -1  # -1 = fill from the device count
    fsdp: int = 1
    expert: int = 1  # expert parallelism: MoE experts split over it; it also carries batch
    tensor: int = 1
    dcn_data: int = 1  # data parallelism across TPU slices (multislice)


@dataclass
class OptimizerConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off
    moment_dtype: str = "float32"  # float32 | bfloat16: AdamW moments (params stay float32)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # global sequences per micro-step
    grad_accum: int = 1
    seed: int = 0
    dtype: str = "float32"  # float32 | bfloat16 (autocast)
    remat: str = "none"  # none | block: recompute each block's activations in the backward
    device: str = "xla"  # xla | cpu | cuda
    log_every: int = 10
    eval_every: int = 100  # 0 = off
    eval_batches: int = 4
    peak_flops: float = 0.0  # per device; 0 = table for TPUs, measured once on CPU
    compile_cache: str = "~/.cache/modxla/xla"  # persistent XLA cache (TPU/GPU); empty = off
    # A non-finite loss, or one above divergence_factor x the median of the last
    # divergence_window logged losses (0 = non-finite only), is a diverged step.
    # stop: end the run before any checkpoint | skip: undo the step on the device (twice the
    # parameter + moment memory during the step), counted as skipped_steps | off
    on_divergence: str = "stop"
    divergence_factor: float = 10.0
    divergence_window: int = 20
    # no step completing for this long = hung: stacks dumped, exit 124 (modxla.train.watchdog);
    # 0 = measured: max(10 x the median step, 10 min); hang_first_step_s until the first step
    # completes and during the first save
    hang_timeout_s: float = 0.0
    hang_first_step_s: float = 1800.0


@dataclass
class CheckpointConfig:
    dir: str = ""  # local path or fsspec URL (gs://...); empty = <run-dir>/checkpoints
    every: int = 0  # steps between checkpoints; 0 = only at the end (and on SIGTERM)
    keep: int = 3
    async_save: bool = False
    resume: str = "auto"  # auto: newest complete checkpoint if any | must: fail if none | never
    # resume with another schedule (train.steps, lr, warmup...; modxla.train.identity)
    allow_schedule_change: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, checking keys and types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(raw).__name__}")
    raw = _renamed(cls, raw, prefix)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(hints[name], value, key)
    return cls(**kwargs)


RENAMED = {"ModConfig": {"routing": "router"}}  # old key -> new key, still loaded


def _renamed(cls: type, raw: dict, prefix: str) -> dict:
    for old, new in RENAMED.get(cls.__name__, {}).items():
        if old in raw:
            if new in raw:
                raise ConfigError(f"{prefix}.{old}: old name of {prefix}.{new}; give one of them")
            raw = {(new if k == old else k): v for k, v in raw.items()}
    return raw


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if isinstance(tp, types.UnionType):
        tp = next(t for t in typing.get_args(tp) if t is not type(None))
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }[tp](value)
    if not ok:
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return float(value) if tp is float else value


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: Config) -> Config:
    """Check value ranges and cross-field constraints; returns cfg for chaining."""
    m, mod, d, t, o = cfg.model, cfg.model.mod, cfg.data, cfg.train, cfg.optimizer
    cap = mod.capacity
    _check(0.0 < cap <= 1.0, "model.mod.capacity", f"must be in (0, 1], got {cap}")
    _check(mod.every >= 0, "model.mod.every", f"must be >= 0, got {mod.every}")
    _check(
        mod.router in ("learned", "random"),
        "model.mod.router",
        f"must be learned or random, got {mod.router!r}",
    )
    _check(mod.aux_loss_weight >= 0, "model.mod.aux_loss_weight", "must be >= 0")
    _check(mod.predictor_loss_weight >= 0, "model.mod.predictor_loss_weight", "must be >= 0")
    _check(mod.predictor_hidden > 0, "model.mod.predictor_hidden", "must be > 0")
    _check(mod.predictor_input in ("x", "normed"), "model.mod.predictor_input", "x or normed")
    _check_moe(m)
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "max_seq_len"):
        _check(getattr(m, name) > 0, f"model.{name}", f"must be > 0, got {getattr(m, name)}")
    _check(
        m.d_model % m.num_heads == 0,
        "model.num_heads",
        f"{m.num_heads} heads do not divide d_model {m.d_model}",
    )
    _check(m.head_dim % 2 == 0, "model.num_heads", f"head_dim {m.head_dim} must be even for RoPE")
    _check(m.d_ff >= 0, "model.d_ff", "must be >= 0")
    _check(m.mlp in ("swiglu", "gelu"), "model.mlp", f"must be swiglu or gelu, got {m.mlp!r}")
    _check(d.seq_len > 1, "data.seq_len", f"must be > 1, got {d.seq_len}")
    _check(
        d.seq_len <= m.max_seq_len,
        "data.seq_len",
        f"{d.seq_len} exceeds model.max_seq_len {m.max_seq_len}",
    )
    _check(0.0 <= d.val_fraction < 1.0, "data.val_fraction", "must be in [0, 1)")
    _check(d.tokenizer_type in ("bpe", "unigram"), "data.tokenizer_type", "must be bpe or unigram")
    _check(d.num_proc >= 1, "data.num_proc", "must be >= 1")
    for name in ("data", "fsdp", "expert", "tensor"):
        v = getattr(cfg.mesh, name)
        _check(v == -1 or v >= 1, f"mesh.{name}", f"must be -1 or >= 1, got {v}")
    _check(cfg.mesh.dcn_data >= 1, "mesh.dcn_data", "must be >= 1")
    _check(
        [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.expert, cfg.mesh.tensor].count(-1) <= 1,
        "mesh",
        "at most one axis may be -1",
    )
    ep = cfg.mesh.expert
    _check(
        ep in (-1, 1) or not m.moe_layers or m.moe.experts % ep == 0,
        "mesh.expert",
        f"{ep} does not divide model.moe.experts {m.moe.experts} (experts are split over it)",
    )
    _check(o.lr > 0, "optimizer.lr", f"must be > 0, got {o.lr}")
    _check(0.0 <= o.min_lr_ratio <= 1.0, "optimizer.min_lr_ratio", "must be in [0, 1]")
    _check(o.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
    _check(o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    _check(0 <= o.beta1 < 1, "optimizer.beta1", f"must be in [0, 1), got {o.beta1}")
    _check(0 <= o.beta2 < 1, "optimizer.beta2", f"must be in [0, 1), got {o.beta2}")
    _check(o.eps > 0, "optimizer.eps", f"must be > 0, got {o.eps}")
    _check(o.grad_clip >= 0, "optimizer.grad_clip", "must be >= 0")
    _check(
        not m.scan or m.num_layers % m.scan_unit == 0,
        "model.scan",
        f"needs num_layers ({m.num_layers}) divisible by the scanned unit of {m.scan_unit} blocks",
    )
    _check(
        not (m.scan and t.remat != "none" and mod.router == "random"),
        "train.remat",
        "with model.scan, random routing cannot be recomputed (the draw would differ); "
        "use train.remat=none or model.scan=false",
    )
    _check(
        o.moment_dtype in ("float32", "bfloat16"),
        "optimizer.moment_dtype",
        f"must be float32 or bfloat16, got {o.moment_dtype!r}",
    )
    _check(
        not (m.moe_layers and t.remat != "none"),
        "train.remat",
        "with model.moe, only none yet (the recomputed block would lose the MoE's losses)",
    )
    _check(t.remat in REMAT, "train.remat", f"must be one of {', '.join(REMAT)}, got {t.remat!r}")
    _check(t.steps > 0, "train.steps", f"must be > 0, got {t.steps}")
    _check(t.batch_size > 0, "train.batch_size", f"must be > 0, got {t.batch_size}")
    _check(t.grad_accum > 0, "train.grad_accum", f"must be > 0, got {t.grad_accum}")
    _check(t.dtype in ("float32", "bfloat16"), "train.dtype", "must be float32 or bfloat16")
    _check(t.device in ("xla", "cpu", "cuda"), "train.device", "must be xla, cpu or cuda")
    _check(t.log_every > 0, "train.log_every", "must be > 0")
    _check(t.eval_every >= 0, "train.eval_every", f"must be >= 0, got {t.eval_every}")
    _check(t.eval_batches > 0, "train.eval_batches", f"must be > 0, got {t.eval_batches}")
    _check(
        t.on_divergence in ("stop", "skip", "off"),
        "train.on_divergence",
        f"must be stop, skip or off, got {t.on_divergence!r}",
    )
    _check(t.divergence_factor >= 0, "train.divergence_factor", "must be >= 0 (0 = off)")
    _check(t.divergence_window >= 1, "train.divergence_window", "must be >= 1")
    _check(cfg.checkpoint.every >= 0, "checkpoint.every", "must be >= 0")
    _check(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    _check(
        cfg.checkpoint.resume in ("auto", "must", "never"),
        "checkpoint.resume",
        f"must be auto, must or never, got {cfg.checkpoint.resume!r}",
    )
    return cfg


def _check_moe(m: ModelConfig) -> None:
    moe = m.moe
    _check(moe.experts >= 0, "model.moe.experts", f"must be >= 0, got {moe.experts}")
    _check(moe.every >= 0, "model.moe.every", f"must be >= 0, got {moe.every}")
    _check(moe.noop_experts >= 0, "model.moe.noop_experts", "must be >= 0")
    _check(moe.capacity_factor > 0, "model.moe.capacity_factor", "must be > 0")
    _check(moe.load_balance_weight >= 0, "model.moe.load_balance_weight", "must be >= 0")
    _check(moe.z_loss_weight >= 0, "model.moe.z_loss_weight", "must be >= 0")
    _check(
        moe.routing in ("token", "expert"),
        "model.moe.routing",
        f"must be token or expert, got {moe.routing!r}",
    )
    if not m.moe_layers:
        return
    total = moe.experts + moe.noop_experts
    _check(1 <= moe.top_k <= total, "model.moe.top_k", f"must be in [1, {total}]")
    _check(
        moe.routing == "token" or moe.noop_experts == 0,
        "model.moe.noop_experts",
        "needs model.moe.routing=token (a no-op expert cannot choose tokens)",
    )
    _check(
        moe.routing == "expert" or not moe.predictor,
        "model.moe.predictor",
        "needs model.moe.routing=expert (token choice is causal already: nothing to predict)",
    )
    # The MoE reports its losses and stats outside the (out, RoutingInfo) block interface
    # that scan and the XLA checkpoint carry: neither is wired for it yet.
    _check(not m.scan, "model.scan", "not supported with model.moe yet")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a', 'b', 'c'], value), the value parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    return key.split("."), yaml.safe_load(raw) if raw.strip() else ""


def from_dict(raw: dict, overrides: list[str] = ()) -> Config:
    raw = copy.deepcopy(raw or {})
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
        node[path[-1]] = value
    return validate(_build(Config, raw, ""))


def read_config_file(path: str | Path) -> dict:
    """A YAML config file's contents, unvalidated (from_dict builds and checks them)."""
    p = resolve_config_path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (None = defaults), apply `key=value` overrides and validate."""
    return from_dict({} if path is None else read_config_file(path), overrides)


def resolve_config_path(path: str | Path) -> Path:
    """A path as given; a relative one that does not exist from the working directory is
    looked up in the repository (so `configs/tiny.yaml` works from any folder)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    in_repo = ROOT / p
    return in_repo if in_repo.exists() else p


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
