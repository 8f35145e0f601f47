"""Training: optimizers, sharding, the jitted step, checkpoints and the host loop."""
