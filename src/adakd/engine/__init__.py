"""Engine (how): config, data wiring, optimiser, AMP, DDP, checkpoints, logs and the training loop."""
