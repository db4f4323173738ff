"""The logical device mesh (data, fsdp, expert, tensor) built from config.

The batch is split over data x fsdp x expert (data-major): the expert axis carries batch
like data does outside the MoE layers (GShard, MaxText), and shards the experts inside them.
"""

from __future__ import annotations

import math

import numpy as np

from modxla.config import MeshConfig
from modxla.errors import UserError

AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # the batch dimension's sharding, in this order

Shape = tuple[int, int, int, int]  # (data, fsdp, expert, tensor)


class MeshError(UserError, ValueError):
    """The mesh does not match the devices, or the batch does not divide over it."""


def resolve_mesh_shape(cfg: MeshConfig, num_devices: int) -> Shape:
    """(data, fsdp, expert, tensor) with a -1 axis filled in from the device count."""
    shape = [getattr(cfg, axis) for axis in AXES]
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise MeshError(
                f"mesh: {num_devices} devices do not divide by the fixed axes "
                f"{dict(zip(AXES, shape, strict=True))} (product {known})"
            )
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise MeshError(
            f"mesh: {' x '.join(AXES)} = {' x '.join(map(str, shape))} = {math.prod(shape)} "
            f"but there are {num_devices} devices"
        )
    if shape[0] % cfg.dcn_data:
        raise MeshError(f"mesh.dcn_data {cfg.dcn_data} does not divide mesh.data {shape[0]}")
    return tuple(shape)


def batch_shards(shape: Shape) -> int:
    """How many ways the batch is split: data x fsdp x expert."""
    return shape[0] * shape[1] * shape[2]


def check_batch(global_batch: int, shape: Shape) -> None:
    shards = batch_shards(shape)
    if global_batch % shards:
        raise MeshError(
            f"train.batch_size {global_batch} is not divisible by the batch shards "
            f"{' x '.join(BATCH_AXES)} = {shards}"
        )


def device_rows(global_batch: int, shape: Shape) -> np.ndarray:
    """(data, fsdp, expert, tensor, 2): the [start, stop) rows of the global batch that the
    device at each mesh position holds. The batch axis is split over data x fsdp x expert
    (data-major) and replicated over tensor, as the input sharding BATCH_AXES places it."""
    check_batch(global_batch, shape)
    shards = batch_shards(shape)
    per = global_batch // shards
    shard = np.arange(shards).reshape(*shape[:3], 1)
    start = np.broadcast_to(shard * per, shape)
    return np.stack([start, start + per], axis=-1)


def build_mesh(cfg: MeshConfig, num_devices: int | None = None):
    """An SPMD mesh over all devices; HybridMesh across TPU slices when dcn_data > 1."""
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr

    n = num_devices or xr.global_runtime_device_count()  # not world_size(): 1 under SPMD
    shape = resolve_mesh_shape(cfg, n)
    if cfg.dcn_data > 1:
        if xr.device_type() != "TPU":
            raise MeshError("mesh.dcn_data > 1 (multislice) needs TPU devices")
        ici = (shape[0] // cfg.dcn_data, *shape[1:])
        dcn = (cfg.dcn_data,) + (1,) * (len(AXES) - 1)
        return xs.HybridMesh(ici_mesh_shape=ici, dcn_mesh_shape=dcn, axis_names=AXES)
    return xs.Mesh(np.arange(n), shape, AXES)
