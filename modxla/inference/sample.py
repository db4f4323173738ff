"""Sampling text from a trained model: one decode step per token (on XLA traced once)."""

from __future__ import annotations

import torch

from modxla.inference.load import InferenceError
from modxla.model import Transformer
from modxla.model.decode import KVCache, decode_step


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


def trained_length_bound(model: Transformer) -> bool:
    """Whether the model's capacities hold at the trained length only: routed blocks'
    k = round(C * T), MoE experts' C slots per sequence of T tokens."""
    return bool(model.cfg.routed_layers or model.cfg.moe_layers)


def context_length(model: Transformer, seq_len: int | None = None) -> int:
    """The longest prompt + new tokens the model serves: the trained length `seq_len` (the
    run's data.seq_len; a bare model's default is model.cfg.max_seq_len) when it has routed
    blocks or MoE layers, since their k = round(C * seq_len) (or expert capacity) is only the
    trained capacity up to there; else the model's max_seq_len."""
    if not trained_length_bound(model):
        return model.cfg.max_seq_len
    return model.cfg.max_seq_len if seq_len is None else min(seq_len, model.cfg.max_seq_len)


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
    seq_len: int | None = None,
) -> tuple[list[int], KVCache]:
    """Sample `max_tokens` after `prompt`, one compiled decode step per token.

    `seq_len` is the length the model was trained at (data.seq_len of its run, as load_run's
    config gives it): the routed blocks keep k = round(C * seq_len) slots whatever the prompt
    and `max_tokens`, so the logits at position t are those of the full forward at the
    trained length and do not depend on how many tokens are asked for. Without it a bare
    model is taken to be trained at model.cfg.max_seq_len. Prompt + `max_tokens` beyond the
    trained length is refused (no capacity there matches training)."""
    if not prompt:
        raise InferenceError("the prompt encodes to no tokens")
    cfg = model.cfg
    if cfg.expert_choice and not cfg.moe_predictor_layers:
        raise InferenceError(
            "expert-choice MoE routing (model.moe.routing: expert) is not causal without its "
            "top-C predictor: train one with modxla-train-predictor (or train with "
            "model.moe.predictor: true)"
        )
    if cfg.moe_predictor_layers and routing not in ("predictor", "router"):
        raise InferenceError(
            f"routing {routing!r} is not causal: an expert-choice MoE samples with --routing "
            "predictor (its experts' top-C predictor decides)"
        )
    length = len(prompt) + max_tokens
    context = context_length(model, seq_len)
    if length > context:
        if model.cfg.routed_layers:
            what = (
                f"the trained length {context} (data.seq_len: routed blocks keep "
                f"k = round(C * {context}) slots)"
            )
        elif model.cfg.moe_layers:
            what = f"the trained length {context} (data.seq_len: the MoE's expert capacity)"
        else:
            what = f"the model's max_seq_len {context}"
        raise InferenceError(
            f"prompt ({len(prompt)} tokens) + max tokens ({max_tokens}) exceed {what}"
        )
    if device is not None and device.type == "xla":
        from modxla.xla.decode import Decoder

        # a cache of the whole context: one graph for every prompt and --max-tokens
        step, length = Decoder(model, routing), context
    else:
        step = lambda cache, tok, pos: decode_step(model, cache, tok, pos, routing)  # noqa: E731
    cache = KVCache.empty(model, 1, length, device, seq_len=context)
    gen = torch.Generator().manual_seed(seed)
    out = list(prompt)
    for t in range(len(prompt) + max_tokens - 1):
        tok = torch.tensor([out[t]]).to(device)  # host-made: device data, not a traced op
        logits = step(cache, tok, torch.tensor([t]).to(device))
        if t + 1 < len(prompt):
            continue  # still reading the prompt
        nxt = int(sample_next(logits.cpu(), temperature, top_k, top_p, gen)[0])
        out.append(nxt)
        if stop_id is not None and nxt == stop_id:
            break
    return out, cache


def routed_fraction(model: Transformer, cache: KVCache, fed: int) -> dict[int, float]:
    """Per routed block: the share of the `fed` tokens decoded so far that it processed."""
    return {i: float(cache.count[i][0]) / max(fed, 1) for i in model.cfg.routed_layers}


def expert_fraction(model: Transformer, cache: KVCache, fed: int) -> dict[int, float]:
    """Per MoE block: the share of its expert choices (top_k a token it saw: `fed` tokens,
    or in a routed block the ones it processed) that an expert processed; the rest were
    dropped on overflow or sent to a no-op expert. Expert choice: a token's E choices are
    whether each expert took it."""
    moe = model.cfg.moe
    k = moe.experts if moe.routing == "expert" else moe.top_k
    out = {}
    for i in model.cfg.moe_layers:
        seen = int(cache.count[i][0]) if cache.count[i] is not None else fed
        used = float(cache.experts[i][0].sum())
        out[i] = used / max(seen * k, 1)
    return out


def xla_device():
    from modxla.xla.runtime import xla_device

    return xla_device()


def default_device():
    """XLA where there is a TPU, else None (eager on the CPU: no compile before the first
    token, and a routed block skips a token's work there too)."""
    from modxla.xla.runtime import tpu_present

    return xla_device() if tpu_present() else None
