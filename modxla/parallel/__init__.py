"""SPMD: the device mesh and the sharding rules for parameters and inputs."""

from modxla.parallel.mesh import MeshError, build_mesh, resolve_mesh_shape
from modxla.parallel.sharding import param_spec, shard_model

__all__ = ["MeshError", "build_mesh", "param_spec", "resolve_mesh_shape", "shard_model"]
