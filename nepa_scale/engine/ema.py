"""An exponential moving average of the weights, for evaluation and export (never a teacher)."""

from __future__ import annotations

import torch


class Ema:
    """fp32 shadow weights, updated after every optimizer step: shadow += (1 - decay) (w - shadow).

    ``warmup``: timm's ModelEmaV3 warmup, decay_t = min(decay, 1 - (1 + t)^(-2/3)) after t updates.
    Without it the initial weights keep a share decay^steps of the average: after 144 steps at 0.99
    that is 23%, which made a short fine-tune's EMA far worse than its weights (docs/demo.md)."""

    WARMUP_POWER = 2.0 / 3.0  # timm's default (warmup_gamma 1)

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = False):
        self.decay, self.warmup = decay, warmup
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    def decay_at(self, step: int) -> float:
        """The decay of the update after optimizer step ``step`` (0-based): a pure function of the
        step, so that a resumed run averages exactly as an uninterrupted one."""
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + step) ** -self.WARMUP_POWER)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int = 0) -> None:
        weight = 1.0 - self.decay_at(step)
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                self.shadow[key].lerp_(value.float(), weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            self.shadow[key].copy_(value)
