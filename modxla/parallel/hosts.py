"""The hosts of a run as one group: which host writes the run's own files, and decisions every
host must take alike (stop after this step or not).

On a TPU pod the group is torch_xla's processes, one per host (the runtime starts it with
xla://). A launcher such as torchrun can give it instead through env:// (MASTER_ADDR,
MASTER_PORT, RANK, WORLD_SIZE): each process then runs its own single-host XLA program, which
is how the tests run several hosts on one machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Hosts:
    index: int = 0
    count: int = 1

    @property
    def is_writer(self) -> bool:
        """The one host that writes run-level files (config, metrics, markers)."""
        return self.index == 0

    def agree(self, flag: bool) -> bool:
        """True on every host when it is True on any: a collective, so every host must call
        it at the same point (after the same step)."""
        if self.count == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the gloo group: host tensors
        return bool(t.item())


def from_default_group() -> Hosts:
    """The hosts of an initialized default process group."""
    import torch.distributed as dist

    return Hosts(dist.get_rank(), dist.get_world_size())


def from_env() -> Hosts:
    """A group from env:// when the environment names one (WORLD_SIZE > 1), else one host."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Hosts()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="env://")
    return from_default_group()
