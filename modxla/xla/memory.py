"""Memory of a compiled train step, as XLA allocated it.

`compiled_memory` reads what XLA allocated for a compiled module (the buffer-assignment
report that `XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_as_text` writes): entry parameters,
outputs, constants and the preallocated temp buffer (activations and scratch, after XLA's heap
simulation). modxla.analysis.memory_plan predicts the same split.
"""

from __future__ import annotations

import glob
import os
import re

_ALLOC = re.compile(r"^allocation \d+: size (\d+), (.*)$")


def dump_flags(dump_dir: str) -> str:
    """XLA_FLAGS value that makes XLA write buffer assignments (set before torch_xla starts)."""
    return f"--xla_dump_to={dump_dir} --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=^$"


def buffer_assignment(path: str) -> dict[str, int]:
    """Bytes by kind (parameter, output, temp, constant) in one buffer-assignment report."""
    out = {"parameter": 0, "output": 0, "temp": 0, "constant": 0}
    with open(path) as f:
        for line in f:
            m = _ALLOC.match(line)
            if m is None:
                continue
            size, kinds = int(m.group(1)), m.group(2)
            if "parameter" in kinds:
                out["parameter"] += size  # an aliased (donated) output shares this buffer
            elif "preallocated-temp" in kinds:
                out["temp"] += size
            elif "constant" in kinds:
                out["constant"] += size
            elif "thread-local" not in kinds:
                out["output"] += size
    out["total"] = sum(out.values())
    return out


def reports(dump_dir: str) -> set[str]:
    return set(glob.glob(os.path.join(dump_dir, "*buffer-assignment.txt")))


def compiled_memory(dump_dir: str, before: set[str] = frozenset()) -> dict[str, int]:
    """The largest module compiled since `before` (a `reports()` snapshot): the train step."""
    new = sorted(reports(dump_dir) - set(before))
    if not new:
        raise RuntimeError(f"no XLA buffer assignment in {dump_dir}: was XLA_FLAGS set?")
    return max((buffer_assignment(p) for p in new), key=lambda r: r["total"])


# ---------------------------------------------------------------------------------------------
# The analytic plan.
