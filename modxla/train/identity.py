"""What makes a run the same run. Each checkpoint records the resolved config; a resume
compares it with the run's:

- a change to what the run is (the model, the data and tokenizer, the batch, the seeds, the
  optimizer's kind) is refused, naming the keys: that is another run;
- a change to the optimisation's schedule (steps under the cosine, learning rate, warmup,
  decay, clipping) needs checkpoint.allow_schedule_change (modxla-train
  --allow-schedule-change): extending a run is common, doing it by accident is not;
- anything else (logging, evaluation and checkpoint cadence, the mesh, remat, the device) is
  free.
Allowed changes are recorded in metrics.jsonl at the step they took effect.
"""

from __future__ import annotations

import hashlib
import json

from modxla.config import Config, to_dict

SCHEDULE = (
    "train.steps",
    "train.dtype",
    "optimizer.lr",
    "optimizer.min_lr_ratio",
    "optimizer.warmup_steps",
    "optimizer.weight_decay",
    "optimizer.beta1",
    "optimizer.beta2",
    "optimizer.eps",
    "optimizer.grad_clip",
)
FREE_PREFIXES = ("mesh.", "checkpoint.")
FREE = (
    "model.scan",  # a layout: either loads into the other
    "data.cache_dir",
    "data.num_proc",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.peak_flops",
    "train.compile_cache",
    "train.remat",
    "train.device",
    "train.on_divergence",
    "train.divergence_factor",
    "train.divergence_window",
    "train.hang_timeout_s",
    "train.hang_first_step_s",
)


def flat(cfg: Config | dict) -> dict:
    """{"model.mod.capacity": 0.125, ...}: every leaf of the config by its dotted key."""
    out = {}

    def walk(prefix: str, node) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                out[f"{prefix}{k}"] = v

    walk("", to_dict(cfg) if isinstance(cfg, Config) else cfg)
    return out


def kind(key: str) -> str:
    """identity | schedule | free."""
    if key in SCHEDULE:
        return "schedule"
    if key in FREE or key.startswith(FREE_PREFIXES):
        return "free"
    return "identity"


def identity_hash(cfg: Config) -> str:
    """A short hash of the keys that define the run (kind == identity)."""
    keys = {k: v for k, v in flat(cfg).items() if kind(k) == "identity"}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def changes(saved: dict, cfg: Config) -> dict[str, dict[str, list]]:
    """{kind: {key: [saved value, this run's value]}} for every key that differs. A key the
    checkpoint does not know (added to the config since) counts as unchanged."""
    now = flat(cfg)
    out: dict[str, dict[str, list]] = {"identity": {}, "schedule": {}, "free": {}}
    for key, value in now.items():
        if key in saved and saved[key] != value:
            out[kind(key)][key] = [saved[key], value]
    return out


def describe(diff: dict[str, list]) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(diff.items()))
