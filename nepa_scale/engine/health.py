"""Checks that stop a run whose numbers would mean nothing, without making the host wait each step.

``LossWatch`` keeps the first step with a non-finite loss on the device (a ``torch.where`` per
micro-batch, no synchronisation) and checks it at log and checkpoint boundaries, so no checkpoint
is written after a NaN; it also keeps each log interval's loss, and a run whose loss was exactly
the same in every interval learned nothing (every image unreadable, a frozen model) and must not
end as completed. ``report_skipped`` gathers the unreadable files every rank skipped.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from nepa_scale.engine.distributed import World
from nepa_scale.errors import DataError, NonFiniteLoss
from nepa_scale.rundir import RunDir

log = logging.getLogger("nepa_scale.train")
NO_STEP = 2**62  # "no non-finite loss yet"


class LossWatch:
    def __init__(self, world: World, hint: str = ""):
        """``hint``: said after the error (what setting may help)."""
        self.world, self.hint = world, hint
        self.first_nonfinite = torch.full((), NO_STEP, dtype=torch.long, device=world.device)
        self.interval_losses: set[float] = set()

    def update(self, loss: torch.Tensor, step: int) -> None:
        """Per micro-batch of optimizer step ``step`` (0-based); stays on the device."""
        self.first_nonfinite = torch.where(
            ~torch.isfinite(loss) & (self.first_nonfinite == NO_STEP), step + 1, self.first_nonfinite
        )

    def check_finite(self) -> None:
        """Raise NonFiniteLoss naming the first bad step and the ranks (a collective)."""
        gathered = [self.first_nonfinite.clone() for _ in range(self.world.world_size)]
        if self.world.world_size > 1:
            dist.all_gather(gathered, self.first_nonfinite)
        bad = {rank: int(t.item()) for rank, t in enumerate(gathered) if int(t.item()) < NO_STEP}
        if bad:
            first = min(bad.values())
            raise NonFiniteLoss(
                f"non-finite loss at step {first} on rank(s) {sorted(bad)}: stopping "
                f"(no checkpoint written after it){self.hint}",
                step=first,
            )

    def interval(self, loss: float) -> None:
        self.interval_losses.add(loss)

    def check_learned(self, steps: int, log_every: int) -> None:
        """After ``steps`` steps of this attempt: at least three intervals, all of one loss, fail."""
        if steps >= 3 * log_every and len(self.interval_losses) == 1:
            (loss,) = self.interval_losses
            raise DataError(
                f"data: the training loss was exactly {loss} in every log interval of {steps} steps: "
                "nothing was learned (unreadable images or a frozen model?)"
            )


def report_skipped(world: World, run: RunDir, skipped: list[tuple[str, str]]) -> list[str]:
    """Every rank's skipped files, (path, why) (a collective when world_size > 1); rank 0 records each
    path once in run.json and logs them with the reason."""
    gathered: list[list[tuple[str, str]]] = [skipped]
    if world.world_size > 1:
        gathered = [[] for _ in range(world.world_size)]
        dist.all_gather_object(gathered, skipped)
    why = {path: reason for part in gathered for path, reason in part}
    if world.is_main and why:
        run.skipped(list(why))
        shown = [f"{path} ({reason})" for path, reason in list(why.items())[:3]]
        log.warning(
            "skipped %d image file(s) that could not be read: %s",
            len(why),
            "; ".join(shown) + (" ..." if len(why) > 3 else ""),
        )
    return list(why)
