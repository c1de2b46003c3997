"""Data, training loops, the twin runner, controllers, checkpoints."""
