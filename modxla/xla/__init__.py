"""Everything that calls torch_xla: the runtime (devices, SPMD mesh, compiled steps, input
feed, collectives), graph replay, and XLA's compiled-memory reports."""
