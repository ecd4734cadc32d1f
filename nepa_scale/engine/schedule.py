"""The optimizer and its learning-rate schedule.

One rule for every task: AdamW over the task's parameter groups, the peak lr from ``optim`` (scaled
by the global batch unless set), a linear warmup from 0 over ``optim.warmup_fraction`` of the run,
then a cosine decay to ``optim.min_lr`` (Hugging Face's convention, which the official code uses).
DeepSpeed steps the schedule once per optimizer step and checkpoints its state.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from nepa_scale.config import OptimConfig


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """The lr factor at each step: linear warmup from 0, then cosine to ``min_ratio`` of the peak."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(
    groups: list[dict], optim: OptimConfig, peak_lr: float, total_steps: int, device: torch.device
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``groups`` (a group may carry its own ``lr``) and the run's lr schedule."""
    optimizer = torch.optim.AdamW(
        groups,
        lr=peak_lr,
        betas=optim.betas,
        eps=optim.eps,
        fused=device.type == "cuda",  # one kernel for the whole update on GPUs
    )
    warmup_steps = round(optim.warmup_fraction * total_steps)
    schedule = warmup_cosine(total_steps, warmup_steps, optim.min_lr / peak_lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
