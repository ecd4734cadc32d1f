"""What a submitted job runs: one run of a sweep, started or resumed from its run directory.

Preemption never saves inside submitit's ``checkpoint()`` (rank 0 only, inside a signal handler:
a ZeRO checkpoint needs every rank). Instead the engine's flag is installed before anything
slow starts; at the next step boundary all ranks agree, save collectively, and the trainer
returns "preempted". Then rank 0 decides:

- SIGUSR2 before the time limit (a preemption notice): requeue, as often as it comes.
- SIGUSR2 near the time limit (``signal_delay_s`` before the job's end time): a time-limit
  requeue, counted in run.json against the profile's ``max_requeues``; one too many marks the run
  failed with that reason (``sweep launch --retry-failed`` continues it from its checkpoint).
- SIGTERM (``scontrol requeue``, ``scancel``): SLURM is already requeueing or ending the job.

A rank that dies (its node fails, its task is killed) saves nothing; its peers' next collective
fails (at once on gloo, after ``distributed.timeout_s`` on NCCL), the first survivor records the
run ``interrupted`` at its last committed checkpoint and requeues the job, up to the profile's
``max_requeues`` losses (slurm/README.md: why a requeue and not the next ``sweep launch``).

A notice can arrive at any moment of the job, also while Python is still starting, before any
handler exists. So submitit starts the job's Python through ``BLOCK_NOTICES_THEN_EXEC``: the
notices are blocked first (the mask survives exec, a blocked signal stays pending), and the
engine's flag unblocks them once installed, so such a notice ends in a save-and-requeue too.

A time-limit notice that arrives before the attempt trained a step (start-up took the time)
counts against ``max_requeues`` like any other, or a limit shorter than start-up would requeue
forever; it is not silent: run.json records the attempt's ``steps_done: 0``, the job's log says
that the attempt made no progress and names the fix (a longer ``time_min``), and ``sweep status``
counts such attempts.

Requeueing goes through submitit's job environment (``scontrol requeue`` on SLURM, the requeue
exit code under the local executor); every rank then exits with REQUEUE_EXIT_CODE so that no
task reports success.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import submitit

from nepa_scale.config import load_config
from nepa_scale.data import check_input_paths
from nepa_scale.errors import PeerLost, RunBusy
from nepa_scale.launch.executors import scheduler
from nepa_scale.rundir import REQUEUE_EXIT_CODE, Interruption, RunDir, now

log = logging.getLogger("nepa_scale.launch")

# SLURM may deliver --signal up to 60 s before the requested delay, and a scheduler tick late.
SIGNAL_SLACK_S = 60


@dataclass(frozen=True)
class Decision:
    action: str  # requeue | exit | give_up
    kind: str  # preemption | timeout | termination
    reason: str = ""


def decide(
    signal_name: str | None,
    seconds_left: float | None,
    signal_delay_s: int,
    timeouts: int,
    max_requeues: int,
) -> Decision:
    """What to do after the trainer saved and stopped; ``timeouts`` counts earlier time-limit requeues."""
    if signal_name in ("SIGTERM", "SIGINT"):  # SLURM ends or requeues the job itself; a user stopped it
        return Decision("exit", "termination")
    timed_out = seconds_left is not None and seconds_left <= signal_delay_s + SIGNAL_SLACK_S
    if not timed_out:
        return Decision("requeue", "preemption")
    if timeouts + 1 > max_requeues:
        return Decision(
            "give_up",
            "timeout",
            f"time limit reached {timeouts + 1} times, more than the profile's max_requeues={max_requeues}: "
            "raise time_min or max_requeues and run `nepa-scale sweep launch --retry-failed` to continue from the checkpoint",
        )
    return Decision("requeue", "timeout")


class RunJob(submitit.helpers.Checkpointable):
    """The callable submitted for one run. Stateless: everything it needs is in the run directory,
    so a requeued job simply calls it again (``checkpoint()`` resubmits it unchanged)."""

    def __init__(
        self,
        run_dir: str,
        max_requeues: int,
        signal_delay_s: int,
        time_min: int,
        cpus_per_task: int,
        submit_branches: Callable[[str], list[str]] | None = None,
    ):
        """``submit_branches``: for a WSD trunk on SLURM, called with the run directory after each
        committed checkpoint (``branches.submit_ready_branches``, pickled by reference)."""
        self.run_dir = run_dir
        self.max_requeues = max_requeues
        self.signal_delay_s = signal_delay_s
        self.time_min = time_min
        self.cpus_per_task = cpus_per_task
        self.submit_branches = submit_branches

    def __call__(self) -> dict:
        # heavy (torch): the job imports the engine; the submitting side, which pickles this, does not
        from nepa_scale.engine.preemption import PreemptionFlag

        preempt = PreemptionFlag().install()  # first: a notice during start-up must not be lost
        started = time.time()
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        os.environ.setdefault("OMP_NUM_THREADS", str(self.cpus_per_task))
        run = RunDir(self.run_dir)
        try:
            result = self._train(preempt)
        except PeerLost as exc:  # another rank died: recorded at the last committed checkpoint
            if exc.recorded:
                self._after_peer_loss(env, run)
            raise SystemExit(REQUEUE_EXIT_CODE) from None
        except RunBusy:  # another process owns the run (named in the log): its record is not ours
            raise
        except BaseException as exc:
            if env.global_rank == 0 and run.record().status not in ("failed", "interrupted"):
                run.failed(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            preempt.uninstall()
        if result.status == "completed":
            return {"run_dir": self.run_dir, "status": result.status, "step": result.step}
        if env.global_rank == 0:
            self._after_preemption(env, run, preempt, started, result)
        raise SystemExit(REQUEUE_EXIT_CODE)

    def _train(self, preempt):
        import torch  # heavy, as above: only in the job's process

        from nepa_scale.engine.trainer import train  # heavy: torch, DeepSpeed

        torch.set_num_threads(self.cpus_per_task)
        config = load_config(RunDir(self.run_dir).config_yaml)
        check_input_paths(config)
        return train(config, preempt, self._branch_submitter())

    def _branch_submitter(self):
        """For a WSD trunk on SLURM: after each commit, submit the branches whose point it is."""
        if (
            self.submit_branches is None
            or not scheduler(submitit.JobEnvironment().name()).jobs_submit_branches
        ):
            return None

        def on_commit(step: int) -> None:
            try:
                for run_id in self.submit_branches(self.run_dir):
                    log.info("step %d committed: submitted cooldown branch %s", step, run_id)
            except Exception as exc:  # noqa: BLE001 - never stop the trunk; `sweep launch` submits them too
                log.error(
                    "could not submit the branches of step %d (%s: %s); `nepa-scale sweep launch` "
                    "submits them",
                    step,
                    type(exc).__name__,
                    exc,
                )

        return on_commit

    def _after_peer_loss(self, env, run: RunDir) -> None:
        """The rank that recorded a lost peer requeues the job (SLURM kills what is left of it and
        starts it again, from the last committed checkpoint), up to ``max_requeues`` losses."""
        record = run.record()
        losses = sum(event.kind == "peer_lost" for event in record.interruptions)
        event = record.interruptions[-1]
        event.job_id = env.job_id
        if losses > self.max_requeues:
            event.action = "give_up"
            record.status = "failed"
            record.error = (
                f"a rank was lost {losses} times, more than the profile's max_requeues={self.max_requeues}: "
                "check the nodes, then `nepa-scale sweep launch --retry-failed` continues from step "
                f"{event.step}"
            )
            run.write_record(record)
            log.error("run %s: %s", Path(self.run_dir).name, record.error)
            return
        event.action = "requeue"
        run.write_record(record)
        log.warning(
            "run %s: a rank was lost; requeueing to resume from step %d (%d of %d losses allowed)",
            Path(self.run_dir).name,
            event.step,
            losses,
            self.max_requeues,
        )
        env._requeue(self.max_requeues - record.timeouts)  # submitit's own requeue

    def _after_preemption(self, env, run: RunDir, preempt, started: float, result) -> None:
        received = preempt.received.name if preempt.received else None
        end = scheduler(env.name()).end_time(env.job_id)
        if end is None:  # the local scheduler keeps no end time: the limit counts from the start
            end = started + self.time_min * 60
        at = preempt.received_at or time.time()
        record = run.record()
        decision = decide(
            received,
            None if end is None else end - at,
            self.signal_delay_s,
            record.timeouts,
            self.max_requeues,
        )
        event = Interruption(
            signal=received or "peer rank",
            kind=decision.kind,
            action=decision.action,
            step=result.step,
            job_id=env.job_id,
            time=now(),
            signal_unix_time=at,
            steps_done=result.steps_done,
        )
        record = run.interrupted(event, decision.reason if decision.action == "give_up" else None)
        log.warning(
            "run %s: %s (%s) at step %d after %d steps this attempt -> %s",
            Path(self.run_dir).name,
            decision.kind,
            event.signal,
            result.step,
            result.steps_done,
            decision.action,
        )
        if decision.kind == "timeout" and result.steps_done == 0 and decision.action == "requeue":
            log.warning(
                "run %s: the time-limit notice came %.0f s into the job, before the first step: this attempt "
                "made no progress and still counts against max_requeues (%d of %d used). If start-up keeps "
                "taking the whole time limit, raise the profile's time_min.",
                Path(self.run_dir).name,
                at - started,
                record.timeouts,
                self.max_requeues,
            )
        if decision.action == "give_up":
            raise submitit.core.utils.UncompletedJobError(decision.reason)
        if decision.action == "requeue":
            env._requeue(self.max_requeues - record.timeouts)  # submitit's own requeue
