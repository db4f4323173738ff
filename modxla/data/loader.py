"""Resumable, host-sharded batches of packed sequences.

Global batch b holds sequences [b*B, (b+1)*B) of an endless stream of epochs, each epoch a
permutation of all sequences seeded by (seed, epoch). Host p of P takes rows
[p*B/P, (p+1)*B/P) of every global batch, so the global batch a step sees does not depend on
the number of hosts, and the state is a single counter.
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
        process_index: int = 0,
        process_count: int = 1,
        shuffle: bool = True,
    ) -> None:
        if global_batch % process_count:
            raise DataError(
                f"train.batch_size {global_batch} is not divisible by {process_count} hosts"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.sequences = sequences  # (N, T+1)
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.seed, self.shuffle = seed, shuffle
        self.process_index = process_index
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

    def local_indices(self, batch: int) -> np.ndarray:
        lo = self.process_index * self.local_batch
        return self.global_indices(batch)[lo : lo + self.local_batch]

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        idx = self.local_indices(self.batch)
        self.batch += 1
        return torch.from_numpy(self.sequences[idx].astype(np.int64))  # (B/P, T+1)

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
