"""TPU accelerator names as gcloud spells them (v5p-64, v5litepod-16; v5e-16 is accepted):
family, chips, hosts and HBM per chip. v4 and v5p names count TensorCores (2 per chip)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from modxla.errors import UserError

GiB = 1024**3
HBM_PER_CHIP = {"v4": 32 * GiB, "v5litepod": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}


class AcceleratorError(UserError, ValueError):
    """A name that is no TPU slice."""


@dataclass(frozen=True)
class Accelerator:
    name: str  # gcloud's: v5litepod-16, v5p-64
    family: str  # v4 | v5litepod | v5p | v6e
    chips: int

    @property
    def kind(self) -> str:
        """The short family name: v5e for v5litepod."""
        return "v5e" if self.family == "v5litepod" else self.family

    @property
    def hbm_per_chip(self) -> int:
        return HBM_PER_CHIP[self.family]

    @property
    def hosts(self) -> int:
        """TPU VMs: 4 chips each (v5e/v6e slices of up to 8 chips sit on one host)."""
        per_host = 4 if self.family in ("v4", "v5p") or self.chips > 8 else self.chips
        return max(1, self.chips // per_host)


def parse_accelerator(name: str) -> Accelerator:
    m = re.fullmatch(r"(v4|v5e|v5litepod|v5p|v6e)-(\d+)", name)
    if m is None:
        raise AcceleratorError(f"accelerator {name!r}: expected e.g. v5p-64, v5e-16, v6e-8, v4-32")
    family = "v5litepod" if m.group(1) == "v5e" else m.group(1)
    n = int(m.group(2))
    chips = n // 2 if family in ("v4", "v5p") else n
    if chips < 1:
        raise AcceleratorError(f"accelerator {name!r}: fewer than one chip")
    return Accelerator(f"{family}-{n}", family, chips)
