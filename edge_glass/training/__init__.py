"""The DeepSpeed training loop, checkpoints, metrics, progress and logging."""
