"""Loading a trained run: its model (the predictor checkpoint when there is one), routing
thresholds, tokenizer and validation batches."""

from __future__ import annotations

import copy
import json

import torch

from modxla.config import Config, ConfigError
from modxla.errors import UserError
from modxla.io import rundir
from modxla.io.checkpoint import (
    CheckpointError,
    checkpoint_id,
    latest_checkpoint,
    list_checkpoints,
    load_newest,
    read_marker,
)
from modxla.io.checkpoint import load as load_checkpoint
from modxla.io.layout import to_unrolled
from modxla.model import Transformer, build_model

PREDICTOR_DIR = rundir.PREDICTOR


class InferenceError(UserError, ValueError):
    """A request the model cannot serve: an empty prompt, too many tokens, no routed blocks."""


def predictor_ckpt_dir(run_dir: str) -> str:
    return rundir.join(run_dir, rundir.PREDICTOR, rundir.CHECKPOINTS)


def calibration_path(run_dir: str) -> str:
    return rundir.join(run_dir, rundir.PREDICTOR, rundir.CALIBRATION)


def load_run(
    run_dir: str,
    prefer_predictor: bool = True,
    warn=print,
    calibrated: bool = True,
    unrolled: bool = False,
    stale_predictor: bool = False,
) -> tuple[Config, Transformer, str]:
    """The run's config and model (CPU, eval mode) with the newest weights.

    With `prefer_predictor`, a checkpoint written by modxla-train-predictor wins over the
    training one (it holds the same frozen model plus the trained predictors). With
    `calibrated`, the causal routing thresholds of <run>/predictor/calibration.json are set
    when they were fitted on the checkpoint loaded and at the run's data.seq_len (else
    ignored, with a warning). A scanned model is unrolled when asked or when thresholds are
    set (they are per block). The trained length routed decoding needs is cfg.data.seq_len
    (pass it to inference.sample.generate as `seq_len`).
    Predictors trained on an older training checkpoint than the run's newest are refused
    (their frozen model is not the run's any more) unless `stale_predictor`.
    """
    run_dir = str(run_dir)  # a path or URL
    try:
        cfg = rundir.load_config(run_dir)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None

    def read(path: str, cfg: Config, predictor: bool) -> Transformer:  # verified as read
        if predictor:
            _check_base(run_dir, cfg, path, stale_predictor, warn)
        model = build_model(cfg.model)
        model.load_state_dict(load_checkpoint(path, {"model": model.state_dict()})["model"])
        return model

    run_cfg, found = cfg, None
    pred_dir = rundir.join(run_dir, rundir.PREDICTOR)
    if prefer_predictor and list_checkpoints(predictor_ckpt_dir(run_dir), warn):
        # predictors even when the run was trained without them (absent in older runs)
        if rundir.exists(rundir.join(pred_dir, rundir.CONFIG)):
            cfg = rundir.load_config(pred_dir)
        found = load_newest(predictor_ckpt_dir(run_dir), lambda p: read(p, cfg, True), warn)
    if found is None:
        cfg = run_cfg
        found = load_newest(rundir.checkpoints(run_dir, cfg), lambda p: read(p, cfg, False), warn)
    if found is None:
        raise CheckpointError(f"{run_dir} has no complete checkpoint to load")
    path, model = found
    cal = read_calibration(run_dir, path, warn, cfg.data.seq_len) if calibrated else None
    if cfg.model.scan and (unrolled or cal):
        cfg = copy.deepcopy(cfg)
        cfg.model.scan = False
        state = to_unrolled(model.state_dict(), cfg.model.scan_unit)
        model = build_model(cfg.model)
        model.load_state_dict(state)
    if cal:
        set_thresholds(model, cal["thresholds"])
    return cfg, model.eval(), path


def _check_base(run_dir: str, cfg: Config, path: str, stale_ok: bool, warn) -> None:
    base = read_marker(path).get("base")
    # which checkpoint is newest needs its marker only: the checksums are read when it loads
    newest = latest_checkpoint(rundir.checkpoints(run_dir, cfg), warn, verify=False)
    if base is None or newest is None or base == checkpoint_id(newest):
        return  # written before predictor checkpoints named their base; or it is current
    msg = (
        f"{path} holds predictors trained on the run's checkpoint of step {base['step']}, "
        f"but the run's newest is {newest}"
    )
    if not stale_ok:
        raise InferenceError(
            f"{msg}: retrain them (modxla-train-predictor --run-dir {run_dir} --restart), "
            "or ask for the old pair explicitly (--stale-predictor)"
        )
    warn(f"warning: {msg}; using the old pair, as asked")


def read_calibration(
    run_dir: str, checkpoint: str, warn=print, seq_len: int | None = None
) -> dict | None:
    """The run's calibration.json when it was fitted on `checkpoint` and, given `seq_len`,
    at that sequence length; else None, with a warning.

    Thresholds are quantiles of logits fitted for k = round(C * T) slots at length T: at
    another length the routed share they give is not the one fitted for, and decoding always
    runs at the trained length. So thresholds fitted at another length are ignored, like
    those of another checkpoint (refit them: they are cheap). A file from before the length
    was recorded was fitted at the run's data.seq_len (the only length the tool used)."""
    path = calibration_path(run_dir)
    if not rundir.exists(path):
        return None
    cal = json.loads(rundir.read_text(path))
    if cal.get("checkpoint") != checkpoint:
        warn(
            f"{path} was fitted on {cal.get('checkpoint')}, not {checkpoint}: ignored "
            "(run modxla-calibrate-routing again)"
        )
        return None
    fitted = cal.get("seq_len")
    if seq_len is not None and fitted is not None and fitted != seq_len:
        warn(
            f"{path} was fitted for sequences of {fitted} tokens, not the {seq_len} "
            f"(data.seq_len) this run was trained and decodes at: ignored "
            f"(run modxla-calibrate-routing --run-dir {run_dir} again)"
        )
        return None
    return cal


def set_thresholds(model: Transformer, thresholds: dict) -> None:
    """Causal routing thresholds per routed block: {"<layer>": {"predictor": t, "router": t}};
    blocks or modes not named keep 0 (logit > 0). Each block remembers which modes were
    named (`calibrated`), for `uncalibrated_router`."""
    if model.cfg.scan:
        raise InferenceError("routing thresholds need an unrolled model (model.scan: false)")
    for layer in model.cfg.routed_layers:
        block = model.blocks[layer]
        named = thresholds.get(str(layer), {})
        block.thresholds = {"predictor": 0.0, "router": 0.0}
        block.thresholds.update({m: float(t) for m, t in named.items()})
        block.calibrated = frozenset(named)


def uncalibrated_router(cfg: Config, model: Transformer, run_dir: str) -> str | None:
    """A warning when causal `router` routing would apply threshold 0 to a logit that was
    never trained as a classifier: a learned router, model.mod.aux_loss_weight 0 (no BCE on
    top-k membership) and no calibrated router threshold on some routed block. Such a
    logit's sign says nothing about top-k membership: `logit > 0` can route far more than
    the capacity and overflow most sequences. None when the routing is sound."""
    mod = cfg.model.mod
    if not cfg.model.routed_layers or mod.router != "learned" or mod.aux_loss_weight > 0:
        return None
    blocks = [] if model.cfg.scan else [model.blocks[i] for i in model.cfg.routed_layers]
    if blocks and all("router" in getattr(b, "calibrated", ()) for b in blocks):
        return None
    return (
        f"warning: --routing router: {run_dir} was trained with model.mod.aux_loss_weight 0, "
        "so its router logit was never trained to predict top-k membership, and it has no "
        "calibrated thresholds: `logit > 0` decides, which can route far more tokens than "
        "the capacity (overflow). Calibrate it first: "
        f"modxla-calibrate-routing --run-dir {run_dir} (or use --routing predictor)"
    )


def get_thresholds(model: Transformer) -> dict:
    """{"<layer>": {"predictor": t, "router": t}} as set on the blocks."""
    return {str(i): dict(model.blocks[i].thresholds) for i in model.cfg.routed_layers}


def tokenizer_path(run_dir: str) -> str:
    """A local file with the run's tokenizer (downloaded when the run is on a URL)."""
    path = rundir.join(str(run_dir), rundir.TOKENIZER)
    if not rundir.isfile(path):
        raise CheckpointError(f"{run_dir} has no {rundir.TOKENIZER}")
    return rundir.local_copy(path, suffix=".model")


def validation_batches(cfg: Config, n: int, offset: int = 0) -> list[torch.Tensor]:
    """Up to `n` batches (B, T+1) of the run's validation split in order, from batch `offset`
    (fewer when the split is smaller; an error when it holds none)."""
    from modxla.data import build_streams

    streams = build_streams(cfg.data, cfg.model.vocab_size, progress=False)
    seqs = streams.sequences("val", cfg.data.seq_len)  # (N, T+1)
    b = cfg.train.batch_size
    total = len(seqs) // b
    if total == 0:
        raise InferenceError(
            f"the validation split holds {len(seqs)} sequences, fewer than one batch of {b} "
            "(raise data.val_fraction)"
        )
    return [
        torch.from_numpy(seqs[i * b : (i + 1) * b].astype("int64"))
        for i in range(offset, min(total, offset + n))
    ]
