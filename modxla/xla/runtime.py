"""Where a run executes: XLA SPMD over every device (or a native device), and its peak."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modxla.analysis.flops import measure_matmul_peak, tpu_peak_flops
from modxla.config import Config, ConfigError
from modxla.parallel import hosts
from modxla.parallel.hosts import Hosts
from modxla.parallel.mesh import BATCH_AXES, check_batch, resolve_mesh_shape


@dataclass
class Runtime:
    """Where the run executes: device, mesh, and this host's place among the hosts.

    Everything the training loop does differently on XLA goes through here (compile, step
    closures, sync, RNG state, sharding), so the loop itself has no device branches.
    """

    device: torch.device
    xla: bool
    mesh: object = None
    num_devices: int = 1
    hosts: Hosts = field(default_factory=Hosts)

    @property
    def is_main(self) -> bool:
        """This host writes the run's own files."""
        return self.hosts.is_writer

    def compile(self, fn, name: str, state=None):
        """One compiled graph per call site on XLA; the plain function elsewhere.

        `state()`: the tensors `fn` reads and updates in place (modxla.train.optim.step_state).
        With it the step is traced once and then replayed (modxla/xla/replay.py); without it,
        every call is traced again."""
        if not self.xla:
            return fn
        import torch_xla

        if state is not None:
            from modxla.xla.replay import TracedStep

            return TracedStep(fn, state, name)
        return torch_xla.compile(fn, full_graph=True, name=name)

    def after_step(self, fn, *args) -> None:
        """Run `fn(*args)` once the step's tensors exist, without forcing a sync per step."""
        if not self.xla:
            fn(*args)
            return
        import torch_xla.core.xla_model as xm

        xm.add_step_closure(fn, args=args)

    def sync(self) -> None:
        """End of a step: launch the pending graph and run the step closures."""
        if self.xla:
            import torch_xla

            torch_xla.sync()

    def rng_state(self) -> int:
        if not self.xla:
            return 0
        import torch_xla.core.xla_model as xm

        return int(xm.get_rng_state())

    def set_rng_state(self, seed: int) -> None:
        if self.xla:
            import torch_xla.core.xla_model as xm

            xm.set_rng_state(int(seed))

    def shard_model(self, model: torch.nn.Module) -> dict[str, tuple | None]:
        """Annotate a model already on the device; returns each parameter's spec."""
        if not self.xla:
            return {}
        from modxla.parallel import shard_model

        return shard_model(model, self.mesh)

    def shard_like(self, t: torch.Tensor, spec: tuple | None) -> None:
        """Shard a tensor (e.g. an optimizer moment) like its parameter; no-op off XLA."""
        if self.xla and spec is not None:
            import torch_xla.distributed.spmd as xs

            xs.mark_sharding(t, self.mesh, spec)

    def compile_count(self) -> int:
        return compile_count() if self.xla else 0

    def feed(self, batches, batch_dim: int):
        return feed(batches, self, batch_dim)


_CACHE_READY = False


def setup_runtime(cfg: Config) -> Runtime:
    """SPMD over every XLA device (or a native device); validates mesh against batch."""
    global _CACHE_READY
    if cfg.train.device != "xla":
        if cfg.train.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("train.device: cuda requested but no CUDA device is available")
        return Runtime(torch.device(cfg.train.device), xla=False, hosts=hosts.from_env())
    import torch_xla
    import torch_xla.runtime as xr

    from modxla.parallel import build_mesh

    # XLA:CPU cannot load cached executables ("Deserializing serialized executable not
    # supported"), so the persistent cache is for TPU and GPU only.
    if cfg.train.compile_cache and not _CACHE_READY and xr.device_type() != "CPU":
        cache = os.path.expanduser(cfg.train.compile_cache)
        os.makedirs(cache, exist_ok=True)
        xr.initialize_cache(cache, readonly=False)  # must precede the first compile
        _CACHE_READY = True
    # bad mesh or batch input is refused before SPMD mode changes this process's devices
    n = xr.global_runtime_device_count()
    shape = resolve_mesh_shape(cfg.mesh, n)
    check_batch(cfg.train.batch_size, shape)
    xr.use_spmd()
    if xr.process_count() > 1:  # one XLA program over the hosts: its processes are the group
        import torch.distributed as dist
        import torch_xla.distributed.xla_backend  # noqa: F401 (registers xla:// init)

        if not dist.is_initialized():  # checkpoints and the stop agreement go through it
            dist.init_process_group("gloo", init_method="xla://")
        group = hosts.from_default_group()
    else:
        group = hosts.from_env()
    return Runtime(
        device=torch_xla.device(),
        xla=True,
        mesh=build_mesh(cfg.mesh, n),
        num_devices=n,
        hosts=group,
    )


def peak_flops_per_device(cfg: Config, rt: Runtime) -> float:
    """Config value, else the TPU table, else the CPU's matmul rate shared among devices."""
    if cfg.train.peak_flops > 0:
        return cfg.train.peak_flops
    if rt.xla:
        import torch_xla.runtime as xr

        if xr.device_type() == "TPU":
            kind = os.environ.get("TPU_ACCELERATOR_TYPE", "")
            peak = tpu_peak_flops(kind)
            if peak:
                return peak
    cache = Path(os.path.expanduser(cfg.data.cache_dir)) / "cpu_peak_flops.json"
    if cache.exists():
        total = json.loads(cache.read_text())["flops"]
    else:
        total = measure_matmul_peak()
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"flops": total}))
    return total / rt.num_devices


def feed(batches, rt: Runtime, batch_dim: int):
    """Iterator of device batches, the batch axis sharded over (data, fsdp, expert) under SPMD.

    Each host passes the whole global batch (modxla.data.loader): without minibatch, the
    tensor is the global one and each device takes its rows (parallel.mesh.device_rows)."""
    if not rt.xla:
        return (b.to(rt.device) for b in batches)
    import torch_xla.distributed.parallel_loader as pl
    import torch_xla.distributed.spmd as xs

    spec = [None] * (batch_dim + 2)
    spec[batch_dim] = BATCH_AXES
    return iter(
        pl.MpDeviceLoader(batches, rt.device, input_sharding=xs.ShardingSpec(rt.mesh, tuple(spec)))
    )


def xla_device() -> torch.device:
    import torch_xla

    return torch_xla.device()


def tpu_present() -> bool:
    """A TPU is what XLA would run on: PJRT_DEVICE=TPU, or unset with libtpu installed."""
    import importlib.util

    device = os.environ.get("PJRT_DEVICE")
    return device == "TPU" or (device is None and importlib.util.find_spec("libtpu") is not None)


def compile_count() -> int:
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0
