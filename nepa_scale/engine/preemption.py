"""Preemption: a signal only sets a flag; the train loop acts on it at a step boundary.

SIGUSR2 (SLURM/submitit's preemption and time-limit notice) and SIGTERM (``scontrol requeue``,
``kill``) set the flag on whichever ranks receive them. At every step boundary the ranks agree on
it with an all-reduce (MAX), so all of them save the same checkpoint together, then exit with
``REQUEUE_EXIT_CODE``. Nothing is saved inside the handler: a ZeRO checkpoint is collective.

A notice can come at any moment, also before Python has installed any handler (SIGUSR2's default
action ends the process). Launched jobs therefore start with these signals blocked
(``nepa_scale.launch.job``): a blocked signal stays pending, and ``install`` unblocks them once its
handler is in place, so a notice sent while the job was starting is delivered to the flag then.
"""

from __future__ import annotations

import logging
import signal
import time

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

PREEMPT_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class PreemptionFlag:
    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPT_SIGNALS):
        self.signals = signals
        self.received: signal.Signals | None = None
        self.received_at: float | None = None
        self._previous: dict[signal.Signals, object] = {}

    def install(self) -> PreemptionFlag:
        """Handle the signals, then unblock them: one that arrived while blocked is handled now."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self.received is None:
            self.received = signal.Signals(signum)
            self.received_at = time.time()

    def agreed(self, group: dist.ProcessGroup | None) -> bool:
        """True on every rank if any rank received a signal (a collective call on ``group``, a CPU
        (gloo) group, so that asking every step never waits for the GPU; None: a single process)."""
        if group is None:
            return self.received is not None
        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item() > 0)
