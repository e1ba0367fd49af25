"""The training library: ranks and devices, the DeepSpeed config and engine, checkpoints, the loss guard,
one training step, periodic validation, metrics, the trainer, and weights in and out of runs."""
