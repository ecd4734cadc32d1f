"""The optimizer and its learning-rate schedule.

One rule for every task: AdamW over the task's parameter groups, the peak lr from ``optim`` (scaled
by the global batch unless set), a linear warmup from 0 (``optim.warmup_steps``, or
``optim.warmup_fraction`` of the run), then ``optim.schedule``:

- ``cosine``: cosine decay to ``optim.min_lr`` over the rest of the run (Hugging Face's
  convention, which the official code uses; the paper's schedule).
- ``wsd``: warmup-stable-decay. Constant until the last ``optim.cooldown_fraction`` of the run,
  then down to ``optim.min_lr`` with ``optim.cooldown_shape`` (``linear``, or ``1-sqrt``: Hägele et
  al. 2024 found it the better cooldown). Until its cooldown starts, a run's lr does not depend on
  its length, which is what lets the runs of a study branch from one trunk.
- ``constant``: the peak lr after warmup.
- ``poly``: mmsegmentation's segmentation schedule: a linear (power 1) decay from the peak to
  ``optim.min_lr`` over the whole run, scaled by the linear warmup while it lasts.

DeepSpeed steps the schedule once per optimizer step and checkpoints its state.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from nepa_scale.config import OptimConfig
from nepa_scale.errors import ConfigError


def warmup_steps(optim: OptimConfig, total_steps: int) -> int:
    """The warmup length: fixed steps when set, else a fraction of the run."""
    return (
        optim.warmup_steps if optim.warmup_steps is not None else round(optim.warmup_fraction * total_steps)
    )


def cooldown_start(optim: OptimConfig, total_steps: int) -> int:
    """The step a WSD run's cooldown starts at (the branch point of its budget); the run's end otherwise."""
    if optim.schedule != "wsd":
        return total_steps
    return total_steps - max(1, round(optim.cooldown_fraction * total_steps))


def check_schedule(optim: OptimConfig, total_steps: int) -> None:
    """The warmup ends before the run does, and a WSD run's before its cooldown starts (a ConfigError
    naming the key otherwise)."""

    start, warmup = cooldown_start(optim, total_steps), warmup_steps(optim, total_steps)
    if optim.warmup_steps is not None and warmup >= total_steps > 1:
        raise ConfigError(
            f"optim.warmup_steps: {warmup} steps of warmup, but the run has {total_steps} steps: the lr would "
            "never reach its peak; shorten the warmup or lengthen the run"
        )
    if optim.schedule == "wsd" and warmup > start:
        raise ConfigError(
            f"optim.warmup_steps: the warmup ({warmup} steps) runs into the cooldown, which starts at step "
            f"{start} of {total_steps}: shorten the warmup or lengthen the run"
        )


def lr_factor(optim: OptimConfig, total_steps: int, peak_lr: float) -> Callable[[int], float]:
    """The lr as a fraction of the peak at each step."""
    warmup = warmup_steps(optim, total_steps)
    min_ratio = optim.min_lr / peak_lr
    decay_start = cooldown_start(optim, total_steps) if optim.schedule == "wsd" else warmup

    def factor(step: int) -> float:
        if optim.schedule == "poly":  # over the whole run, warmup included, as mmcv's PolyLrUpdater
            poly = min_ratio + (1 - min_ratio) * (1 - min(step, total_steps) / max(1, total_steps))
            return poly * min(1.0, step / max(1, warmup))
        if step < warmup:
            return step / max(1, warmup)
        if optim.schedule == "constant" or step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        if optim.schedule == "cosine":
            return min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        # WSD cooldown; written so that its first step is exactly 1.0, as in the stable phase.
        shape = progress if optim.cooldown_shape == "linear" else math.sqrt(progress)
        return 1.0 - (1.0 - min_ratio) * shape

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
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(optim, total_steps, peak_lr))
