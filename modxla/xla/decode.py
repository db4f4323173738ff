"""The per-token decode step on XLA: traced once and replayed on the current cache.

A lazy-tensor decode step is traced again op by op at every token, and that host time
dominated XLA decoding (modxla/model/decode.py). `Decoder` runs `decode_step` through
`TracedStep` (modxla/xla/replay.py): the model's tensors and the KV cache are its state,
the tokens and positions (B,) its tensor arguments, so one graph serves every token,
position and prompt of a (batch, cache length) and is then replayed without tracing. With
`skip="cond"` routed blocks run inside HLO conditionals (modxla/xla/cond.py): a token a
block does not route runs none of that block's work. `replay=False` traces every token, as
before, for benchmarks; `skip="where"` computes every row and selects.
"""

from __future__ import annotations

import torch
import torch_xla

from modxla.model.decode import KVCache, decode_step
from modxla.model.transformer import Transformer
from modxla.xla.cond import cond
from modxla.xla.replay import TracedStep

SKIPS = ("cond", "where")


class Decoder:
    """`decoder(cache, tokens, pos)` -> logits (B, V), as decode_step on XLA."""

    def __init__(self, model: Transformer, routing: str, skip: str = "cond", replay=True):
        if skip not in SKIPS:
            raise ValueError(f"skip must be one of {SKIPS}, got {skip!r}")
        self.model, self.routing, self.replay = model, routing, replay
        self.cond = cond if skip == "cond" else None
        self.cache: KVCache | None = None
        self.calls = 0
        self._weights = list(model.parameters()) + list(model.buffers())
        # no random numbers, no step closures: no sync after each token (modxla/xla/replay.py)
        self._step = TracedStep(self._decode, self._state, "decode_step", sync=False)
        self._compiled = torch_xla.compile(self._decode, full_graph=True, name="decode_step")

    @property
    def traces(self) -> int:
        """Calls that traced the step in Python (replayed calls did not)."""
        return self._step.traces if self.replay else self.calls

    def __call__(self, cache: KVCache, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.cache = cache
        self.calls += 1
        # the cache's shape keys the graph: state shapes are not part of TracedStep's key
        shape = (tuple(cache.k[0].shape), cache.length, cache.seq_len)
        if not self.replay:
            return self._compiled(tokens, pos, shape)
        return self._step(tokens, pos, shape)

    def _decode(self, tokens, pos, shape):
        return decode_step(self.model, self.cache, tokens, pos, self.routing, self.cond)

    def _state(self) -> list[torch.Tensor]:
        c = self.cache
        lists = (c.k, c.v, c.pos, c.count, c.experts or [])
        held = [t for ts in lists for t in ts if t is not None]
        return self._weights + held
