"""Sweeps -> runs with stable ids -> submitit jobs (SLURM or local), preemption-safe."""
