"""Preemption: a notice only sets a flag; the train loop acts on it at a step boundary.

SIGUSR2 (SLURM/submitit's preemption and time-limit notice) and SIGTERM (``scontrol requeue``,
``kill``) set the flag on whichever ranks receive them. At every step boundary the ranks agree on
it with an all-reduce (MAX), so all of them save the same checkpoint together, then exit with
``REQUEUE_EXIT_CODE``. Nothing is saved when the signal arrives: a ZeRO checkpoint is collective.

**Notices reach only what handles them.** SLURM signals every process of a job step
(``scancel --signal=USR2``), children included: a compiler the job started, a DataLoader worker
started with spawn, a subprocess. Their default action for SIGUSR2 is to die, and a dead child
fails the run. So the notices stay *blocked* in every thread of the process, and one thread waits
for them (``sigtimedwait``) and sets the flag. A blocked mask is inherited through fork and exec,
so every child started afterwards ignores the notices as well: they stay pending there, harmless,
and only the flag's thread acts. A notice can also come before Python has installed anything (its
default action would end the process): launched jobs start with these signals already blocked
(``nepa_scale.launch.job``), and a notice pending from then is taken by the thread at ``install``.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from multiprocessing import resource_tracker

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# SIGUSR2: SLURM's preemption and time-limit notice; SIGTERM: scontrol requeue, scancel, kill;
# SIGINT: Ctrl-C, a user stopping the run (saved, and recorded as stopped).
PREEMPT_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
POLL_S = 0.2  # how often the waiting thread checks that it should go on


class PreemptionFlag:
    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPT_SIGNALS):
        self.signals = signals
        self.received: signal.Signals | None = None
        self.received_at: float | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._mask: set[signal.Signals] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def install(self) -> PreemptionFlag:
        """Block the notices in this thread (and so in every thread and child started from now on),
        and start the thread that takes them. A Python handler stays as a fallback for a thread that
        existed before and does not block them.

        multiprocessing's resource tracker is started here, under the mask: starting it unblocks
        SIGTERM in the calling thread (Python 3.11, bpo-33613's fix), which the first spawn or
        forkserver child (a DataLoader worker) would otherwise do after the mask is set."""

        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        resource_tracker.ensure_running()  # inherits the block (it ignores SIGTERM itself) ...
        signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)  # ... and unblocked SIGTERM here
        while set(signal.sigpending()) & set(self.signals):  # one that came while starting: taken now
            info = signal.sigtimedwait(self.signals, 0)
            if info is None:
                break
            if self._set(info.si_signo):
                log.warning("received %s while starting: stopping before the first step", self.received.name)
        self._stop.clear()
        self._thread = threading.Thread(target=self._wait, name="nepa-preemption-notices", daemon=True)
        self._thread.start()
        return self

    def uninstall(self) -> None:
        """Stop taking notices: the waiting thread ends, handlers and the signal mask are restored
        (a notice that arrives after this is the caller's again)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
            self._mask = None

    def _wait(self) -> None:
        while not self._stop.is_set():
            info = signal.sigtimedwait(self.signals, POLL_S)
            if info is not None and self._set(info.si_signo):
                # On every rank (a warning): which processes a notice reached is worth knowing.
                log.warning("received %s: saving at the next step boundary", self.received.name)

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        self._set(signum)  # nothing else in a handler: it may interrupt a held logging lock

    def _set(self, signum: int) -> bool:
        """Record the first notice; True when this one was it."""
        if self.received is not None:
            return False
        self.received, self.received_at = signal.Signals(signum), time.time()
        return True

    def agreed(self, group: dist.ProcessGroup | None) -> bool:
        """True on every rank if any rank received a signal (a collective call on ``group``, a CPU
        (gloo) group, so that asking every step never waits for the GPU; None: a single process)."""
        if group is None:
            return self.received is not None
        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item() > 0)
