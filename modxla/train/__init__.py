"""Training: the trainer, its compiled step, divergence guard, optimizer and schedule, and the loop
the trainer and the predictor trainer share. `python -m modxla.train` runs modxla-train."""
