"""Sampling text from a trained model: one compiled decode step per token."""

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
