"""Resumable global batches of packed sequences.

Global batch b holds sequences [b*B, (b+1)*B) of an endless stream of epochs, each epoch a
permutation of all sequences seeded by (seed, epoch); the state is a single counter.

Every host loads the whole global batch. The input sharding (modxla.xla.runtime.feed) takes
the tensor a host passes as the global tensor and puts on each of the host's devices its own
rows (modxla.parallel.mesh.device_rows): a host passing only "its" B/P rows would make the
step train on B/P rows. Loading just a host's rows needs torch_xla's minibatch inputs, which
hold for a batch on dim 0 over a 1-D device layout only (not with a tensor axis, nor the
(A, B, T+1) gradient-accumulation layout); the packed tokens cost a host little to read.
"""

from __future__ import annotations

import numpy as np
import torch

from modxla.data.sources import DataError


class BatchLoader:
    def __init__(
        self,
        sequences: np.ndarray,
        global_batch: int,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.sequences = sequences  # (N, T+1)
        self.global_batch = global_batch
        self.seed, self.shuffle = seed, shuffle
        self.batch = 0  # global batches produced so far
        self._epoch, self._perm = -1, np.arange(0)

    @property
    def num_sequences(self) -> int:
        return len(self.sequences)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            n = self.num_sequences
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(n) if self.shuffle else np.arange(n)
            self._epoch = epoch
        return self._perm

    def global_indices(self, batch: int) -> np.ndarray:
        """Sequence indices of global batch `batch`, (B,)."""
        n = self.num_sequences
        pos = np.arange(batch * self.global_batch, (batch + 1) * self.global_batch)
        out = np.empty_like(pos)
        for epoch in np.unique(pos // n):  # a batch may straddle two epochs
            sel = pos // n == epoch
            out[sel] = self._order(int(epoch))[pos[sel] % n]
        return out

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        idx = self.global_indices(self.batch)
        self.batch += 1
        return torch.from_numpy(self.sequences[idx].astype(np.int64))  # (B, T+1)

    def state_dict(self) -> dict:
        return {
            "batch": self.batch,
            "seed": self.seed,
            "num_sequences": self.num_sequences,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_sequences", "global_batch"):
            if state[key] != getattr(self, key):
                raise DataError(
                    f"loader state has {key}={state[key]} but this run has "
                    f"{getattr(self, key)}: the data or batch size changed since the checkpoint"
                )
        self.batch = int(state["batch"])
