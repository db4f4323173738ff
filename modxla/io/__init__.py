"""What a run reads and writes: the run directory (local or gs://), sharded checkpoints,
state-dict layouts, metrics logs and status lines."""
