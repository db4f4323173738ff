"""Using a trained run: load it, evaluate causal routing against top-k, and sample text."""

from __future__ import annotations

import copy
import json

import torch

from modxla import rundir
from modxla.checkpoint import CheckpointError, latest_checkpoint
from modxla.checkpoint import load as load_checkpoint
from modxla.config import Config, ConfigError
from modxla.errors import UserError
from modxla.model import Transformer, build_model, lm_loss
from modxla.model.decode import KVCache, decode_step
from modxla.model.stacking import to_unrolled

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
) -> tuple[Config, Transformer, str]:
    """The run's config and model (CPU, eval mode) with the newest weights.

    With `prefer_predictor`, a checkpoint written by tools/train_predictor.py wins over the
    training one (it holds the same frozen model plus the trained predictors). With
    `calibrated`, the causal routing thresholds of <run>/predictor/calibration.json are set
    when they were fitted on the checkpoint loaded (else ignored, with a warning). A scanned
    model is unrolled when asked or when thresholds are set (they are per block).
    """
    run_dir = str(run_dir)  # a path or URL
    try:
        cfg = rundir.load_config(run_dir)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    path = latest_checkpoint(predictor_ckpt_dir(run_dir), warn) if prefer_predictor else None
    pred_dir = rundir.join(run_dir, rundir.PREDICTOR)
    # predictors even when the run was trained without them (absent in older runs)
    if path and rundir.exists(rundir.join(pred_dir, rundir.CONFIG)):
        cfg = rundir.load_config(pred_dir)
    path = path or latest_checkpoint(rundir.checkpoints(run_dir, cfg), warn)
    if path is None:
        raise CheckpointError(f"{run_dir} has no complete checkpoint to load")
    model = build_model(cfg.model)
    state = load_checkpoint(path, {"model": model.state_dict()})
    model.load_state_dict(state["model"])
    cal = read_calibration(run_dir, path, warn) if calibrated else None
    if cfg.model.scan and (unrolled or cal):
        cfg = copy.deepcopy(cfg)
        cfg.model.scan = False
        state = to_unrolled(model.state_dict(), cfg.model.scan_unit)
        model = build_model(cfg.model)
        model.load_state_dict(state)
    if cal:
        set_thresholds(model, cal["thresholds"])
    return cfg, model.eval(), path


def read_calibration(run_dir: str, checkpoint: str, warn=print) -> dict | None:
    """The run's calibration.json when it was fitted on `checkpoint`, else None."""
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
    return cal


def set_thresholds(model: Transformer, thresholds: dict) -> None:
    """Causal routing thresholds per routed block: {"<layer>": {"predictor": t, "router": t}};
    blocks or modes not named keep 0 (logit > 0)."""
    if model.cfg.scan:
        raise InferenceError("routing thresholds need an unrolled model (model.scan: false)")
    for layer in model.cfg.routed_layers:
        block = model.blocks[layer]
        block.thresholds = {"predictor": 0.0, "router": 0.0}
        block.thresholds.update({m: float(t) for m, t in thresholds.get(str(layer), {}).items()})


def get_thresholds(model: Transformer) -> dict:
    """{"<layer>": {"predictor": t, "router": t}} as set on the blocks."""
    return {str(i): dict(model.blocks[i].thresholds) for i in model.cfg.routed_layers}


def tokenizer_path(run_dir: str) -> str:
    """A local file with the run's tokenizer (downloaded when the run is on a URL)."""
    path = rundir.join(str(run_dir), rundir.TOKENIZER)
    if not rundir.isfile(path):
        raise CheckpointError(f"{run_dir} has no {rundir.TOKENIZER}")
    return rundir.local_copy(path, suffix=".model")


@torch.no_grad()
def evaluate_routing(
    model: Transformer, batches, modes=("topk", "predictor", "router")
) -> dict[str, dict]:
    """Per routing mode: mean NLL, fraction routed, overflow rate; and predictor quality.

    Overflow: the share of (sequence, routed block) pairs whose causal decisions wanted more
    tokens than the capacity buffer holds. Predictor quality is measured against top-k
    membership, next to the accuracy of always answering "skip" (1 - capacity).
    """
    if not model.cfg.routed_layers:
        raise InferenceError("the model has no routed blocks: nothing to evaluate")
    if model.cfg.mod.router == "random":
        modes = tuple(m for m in modes if m != "router")
    has_predictor = model.cfg.mod.predictor
    if not has_predictor:  # trained without predictors: nothing to score them on
        modes = tuple(m for m in modes if m != "predictor")
    acc = {m: {"nll": 0.0, "routed": 0.0, "overflow": 0.0} for m in modes}
    tp = fp = fn = tn = 0.0
    n = 0
    for batch in batches:
        n += 1
        for mode in modes:
            out = model(batch[:, :-1], routing=mode)
            acc[mode]["nll"] += float(lm_loss(out.logits, batch[:, 1:]))
            acc[mode]["routed"] += float(
                torch.stack([i.routed_mask.mean() for i in out.routing]).mean()
            )
            k = out.routing[0].idx.shape[1]
            acc[mode]["overflow"] += float(
                torch.stack([(i.decided > k).float().mean() for i in out.routing]).mean()
            )
            if mode == "topk" and has_predictor:
                for info in out.routing:
                    pred = info.predictor_logits > 0
                    target = info.topk_mask > 0.5
                    tp += float((pred & target).sum())
                    fp += float((pred & ~target).sum())
                    fn += float((~pred & target).sum())
                    tn += float((~pred & ~target).sum())
    if n == 0:
        raise InferenceError("no evaluation batches")
    result = {m: {k: v / n for k, v in d.items()} for m, d in acc.items()}
    for m in modes:
        result[m]["normalized_ll"] = result["topk"]["nll"] / result[m]["nll"]
    if "predictor" in result:
        result["predictor"] |= _predictor_quality(tp, fp, fn, tn)
    result["batches"] = n
    return result


@torch.no_grad()
def predictor_quality(model: Transformer, batches) -> dict:
    """The predictors against top-k membership (top-k routing): accuracy, precision and
    recall of the routed class, the always-skip accuracy; and the accuracy per routed block."""
    counts = {layer: torch.zeros(4) for layer in model.cfg.routed_layers}
    for batch in batches:
        out = model(batch[:, :-1], routing="topk")
        for layer, info in zip(model.cfg.routed_layers, out.routing, strict=True):
            pred, target = info.predictor_logits > 0, info.topk_mask > 0.5
            counts[layer] += (
                torch.stack(
                    [
                        (pred & target).sum(),
                        (pred & ~target).sum(),
                        (~pred & target).sum(),
                        (~pred & ~target).sum(),
                    ]
                )
                .float()
                .cpu()
            )
    total = _predictor_quality(*[float(x) for x in sum(counts.values())])
    total["predictor_acc"] = total["topk_accuracy"]
    total["blocks"] = {layer: float(c[0] + c[3]) / float(c.sum()) for layer, c in counts.items()}
    return total


def _predictor_quality(tp: float, fp: float, fn: float, tn: float) -> dict:
    total = tp + fp + fn + tn
    return {
        "topk_accuracy": (tp + tn) / total,
        "precision": tp / max(1.0, tp + fp),
        "recall": tp / max(1.0, tp + fn),
        "always_skip_accuracy": (fp + tn) / total,  # every non-top-k token
        "counts": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
    }


def merge_routing_results(parts: list[dict]) -> dict:
    """One result from `evaluate_routing` on each host's rows (equal batch counts)."""
    out = {}
    for mode in ("topk", "predictor", "router"):
        if mode in parts[0]:
            keys = ("nll", "routed", "overflow")
            out[mode] = {k: sum(p[mode][k] for p in parts) / len(parts) for k in keys}
    for mode in out:
        out[mode]["normalized_ll"] = out["topk"]["nll"] / out[mode]["nll"]
    if "predictor" in out:
        c = [sum(p["predictor"]["counts"][k] for p in parts) for k in ("tp", "fp", "fn", "tn")]
        out["predictor"] |= _predictor_quality(*c)
    out["batches"] = sum(p["batches"] for p in parts)
    return out


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V): temperature, then top-k, then nucleus (top-p)."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: list[int],
    max_tokens: int,
    routing: str = "predictor",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    device=None,
    stop_id: int | None = None,
) -> tuple[list[int], KVCache]:
    """Sample `max_tokens` after `prompt`, one compiled decode step per token."""
    if not prompt:
        raise InferenceError("the prompt encodes to no tokens")
    length = len(prompt) + max_tokens
    if length > model.cfg.max_seq_len:
        raise InferenceError(
            f"prompt ({len(prompt)} tokens) + max tokens ({max_tokens}) exceed the model's "
            f"max_seq_len {model.cfg.max_seq_len}"
        )
    step = decode_step
    if device is not None and device.type == "xla":
        import torch_xla

        step = torch_xla.compile(decode_step, full_graph=True, name="decode_step")
    cache = KVCache.empty(model, 1, length, device)
    gen = torch.Generator().manual_seed(seed)
    out = list(prompt)
    for t in range(length - 1):
        tok = torch.tensor([out[t]]).to(device)  # host-made: device data, not a traced op
        logits = step(model, cache, tok, torch.tensor([t]).to(device), routing)
        if t + 1 < len(prompt):
            continue  # still reading the prompt
        nxt = int(sample_next(logits.cpu(), temperature, top_k, top_p, gen)[0])
        out.append(nxt)
        if stop_id is not None and nxt == stop_id:
            break
    return out, cache


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
