"""Training: objectives, optimiser and schedule, checkpoints, the training loop."""
