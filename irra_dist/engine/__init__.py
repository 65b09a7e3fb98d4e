"""The training engine: Accelerate/DeepSpeed trainer, evaluation loop, checkpoints, tracking."""
