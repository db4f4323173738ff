"""Causal routing after training: the predictor trainer, threshold calibration, routing
evaluation and the per-block report."""
