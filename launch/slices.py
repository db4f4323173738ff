"""TPU slice shapes, GKE topologies, and the checks made before anything is created."""

from __future__ import annotations

import math
from dataclasses import dataclass

from modxla.config import Config
from modxla.parallel import tpus
from modxla.parallel.mesh import AXES, MeshError, check_batch, resolve_mesh_shape

RUNTIME = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
GKE_ACCEL = {
    "v4": "tpu-v4-podslice",
    "v5litepod": "tpu-v5-lite-podslice",
    "v5p": "tpu-v5p-slice",
    "v6e": "tpu-v6e-slice",
}
# GKE's cloud.google.com/gke-tpu-topology per accelerator, as in xpk's system characteristics
# table (the copy in apple/axlearn, axlearn/cloud/gcp/system_characteristics.py). Note v4-8
# and v5p-8: 2x2x1, not 1x2x2. An accelerator missing here is refused for GKE.
GKE_TOPOLOGY = {
    "v4-8": "2x2x1", "v4-16": "2x2x2", "v4-32": "2x2x4", "v4-64": "2x4x4", "v4-128": "4x4x4",
    "v4-256": "4x4x8", "v4-512": "4x8x8", "v4-1024": "8x8x8", "v4-2048": "8x8x16",
    "v4-4096": "8x16x16",
    "v5p-8": "2x2x1", "v5p-16": "2x2x2", "v5p-32": "2x2x4", "v5p-64": "2x4x4",
    "v5p-128": "4x4x4", "v5p-256": "4x4x8", "v5p-512": "4x8x8", "v5p-1024": "8x8x8",
    "v5p-2048": "8x8x16", "v5p-4096": "8x16x16", "v5p-8192": "16x16x16",
    "v5litepod-1": "1x1", "v5litepod-4": "2x2", "v5litepod-8": "2x4", "v5litepod-16": "4x4",
    "v5litepod-32": "4x8", "v5litepod-64": "8x8", "v5litepod-128": "8x16",
    "v5litepod-256": "16x16",
    "v6e-4": "2x2", "v6e-8": "2x4", "v6e-16": "4x4", "v6e-32": "4x8", "v6e-64": "8x8",
    "v6e-128": "8x16", "v6e-256": "16x16",
}  # fmt: skip


class LaunchError(ValueError):
    """The launch cannot work: bad accelerator, mesh, batch, run directory or checkout."""


@dataclass(frozen=True)
class Slice:
    """One TPU slice's shape: accelerator type, chips and hosts (TPU VMs)."""

    accelerator: str  # gcloud's name, e.g. v5litepod-8, v5p-64
    family: str
    chips: int
    hosts: int

    @property
    def topology(self) -> str:
        """The chip layout, as GKE's gke-tpu-topology label spells it."""
        if self.family in ("v5litepod", "v6e"):
            side = 2 ** (int(math.log2(self.chips)) // 2)
            return f"{side}x{self.chips // side}"
        dims = [1, 1, 1]
        for i in range(int(math.log2(self.chips))):
            dims[i % 3] *= 2
        return "x".join(map(str, sorted(dims, reverse=self.chips < 8)))

    def gke_topology(self) -> str:
        if self.accelerator not in GKE_TOPOLOGY:
            raise LaunchError(
                f"{self.accelerator}: not in GKE's TPU topology table "
                f"({', '.join(sorted(GKE_TOPOLOGY))})"
            )
        return GKE_TOPOLOGY[self.accelerator]


def parse_accelerator(name: str) -> Slice:
    try:
        acc = tpus.parse_accelerator(name)
    except tpus.AcceleratorError as e:
        raise LaunchError(f"--{e}") from None
    n = int(acc.name.rsplit("-", 1)[1])
    if n & (n - 1):  # the topology rules below are for powers of two
        raise LaunchError(f"--accelerator {name!r}: expected v4-N, v5e-N, v5p-N or v6e-N")
    return Slice(acc.name, acc.family, acc.chips, acc.hosts)


def validate(cfg: Config, sl: Slice, slices: int, run_dir: str) -> tuple[int, ...]:
    """Fail before anything is created: mesh vs chips, batch vs data axes, run dir."""
    devices = sl.chips * slices
    try:
        shape = resolve_mesh_shape(cfg.mesh, devices)
        check_batch(cfg.train.batch_size, shape)
    except MeshError as e:
        raise LaunchError(f"{e} ({slices} x {sl.accelerator} = {devices} chips)") from None
    if slices > 1 and cfg.mesh.dcn_data != slices:
        raise LaunchError(f"mesh.dcn_data is {cfg.mesh.dcn_data} but the job has {slices} slices")
    if sl.hosts * slices > 1 and not run_dir.startswith("gs://"):
        raise LaunchError(
            f"--run-dir {run_dir}: a multi-host job ({sl.hosts * slices} hosts) needs a shared "
            "gs:// run directory that every host can write"
        )
    return shape


def check_multislice(sl: Slice, slices: int) -> None:
    """GKE runs multislice on multi-host slice node pools only."""
    if slices > 1 and sl.hosts == 1:
        raise LaunchError(
            f"multislice of single-host slices ({slices} x {sl.accelerator}): GKE supports "
            "multislice on multi-host TPU slice node pools only; use a larger slice"
        )


def local_overrides(shape: tuple[int, ...], devices: int) -> list[str]:
    """The pod's (data, fsdp, expert, tensor) scaled down to `devices`: each axis halved in
    that order (data first, tensor last) until the mesh fits."""
    dims = list(shape)
    for i in range(len(dims)):
        while math.prod(dims) > devices and dims[i] > 1:
            dims[i] //= 2
    over = [f"mesh.{axis}={n}" for axis, n in zip(AXES, dims, strict=True)]
    return [*over, "mesh.dcn_data=1"]
