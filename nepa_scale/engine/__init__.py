"""The DeepSpeed training engine: train loop, checkpoints, preemption, metrics, export."""
