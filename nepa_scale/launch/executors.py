"""The schedulers a sweep's runs go to, behind one interface: SLURM through submitit's
SlurmExecutor, or processes on this machine through its LocalExecutor.

``scheduler(name)`` is the one place that maps a profile's ``executor`` to its scheduler; every
caller (submission, status, cancel, the preemption notice) goes through the ``Scheduler`` methods
and never branches on the name.
"""

from __future__ import annotations

import logging
import shlex
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import psutil
import submitit

from nepa_scale.errors import SweepError
from nepa_scale.launch.profiles import ClusterProfile
from nepa_scale.ownership import SLURM_LIVE_STATES, slurm_states
from nepa_scale.rundir import RunDir

log = logging.getLogger("nepa_scale.launch")

LIVE_SLURM_STATES = SLURM_LIVE_STATES  # a job SLURM still runs or will run again
FAILED_SLURM_STATES = {
    "FAILED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


# Block the notices, then become submitit's job process (its arguments follow the code).
BLOCK_NOTICES_THEN_EXEC = (
    "import os, signal, sys; "
    "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2, signal.SIGTERM, signal.SIGINT}); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def job_python() -> str:
    """The ``python`` command submitit runs a job with: this interpreter, notices blocked first
    (``-S``: the few milliseconds before the mask is set load nothing but the interpreter)."""
    return f"{shlex.quote(sys.executable)} -S -c {shlex.quote(BLOCK_NOTICES_THEN_EXEC)}"


def _setup(profile: ClusterProfile, code_dir: Path) -> list[str]:
    """Shell lines before a job: the code snapshot first on the path (PYTHONSAFEPATH, Python >= 3.11,
    keeps `python -m` from putting the submission directory, often a checkout of this repository,
    in front of it), then the profile's own."""
    return [
        f"export PYTHONPATH={shlex.quote(str(code_dir))}${{PYTHONPATH:+:$PYTHONPATH}} PYTHONSAFEPATH=1",
        *profile.setup,
    ]


def requeueable(sbatch_extra: dict) -> dict:
    """sbatch's extra flags with ``--requeue``, whatever the site's JobRequeue: a job whose node fails
    (NODE_FAIL) goes back in the queue by SLURM's own doing, and resumes from its last committed
    checkpoint (unless the profile says ``no_requeue``)."""
    return dict(sbatch_extra) if "no_requeue" in sbatch_extra else {"requeue": True, **sbatch_extra}


class Scheduler:
    """What the launcher asks of a scheduler."""

    name = ""
    runs_here = False  # the launching process runs the jobs itself, and returns when they are done
    jobs_submit_branches = False  # a WSD trunk's own job submits its branches as their points commit

    def executor(
        self, profile: ClusterProfile, folder: Path, code_dir: Path, job_name: str
    ) -> submitit.Executor:
        raise NotImplementedError

    def submit(self, executor: submitit.Executor, jobs: list) -> list[submitit.Job]:
        """Submit the callables ``jobs`` (runs that share their resources)."""
        return [executor.submit(job) for job in jobs]

    def folder(self, output_root: Path) -> Path:
        """submitit's folder for this scheduler's jobs."""
        raise NotImplementedError

    def states(self, job_ids: list[str]) -> dict[str, str]:
        """Each job's state, as SLURM names them (a local job is RUNNING or ENDED)."""
        raise NotImplementedError

    def notify(self, job_id: str, run: RunDir) -> None:
        """The preemption notice a cluster sends: SIGUSR2 to every task of the job."""
        raise NotImplementedError

    def cancel(self, job_ids: list[str]) -> None:
        """Stop the jobs (their tasks save on SIGTERM when there is time)."""
        raise NotImplementedError

    def end_time(self, job_id: str) -> float | None:
        """When the job's time limit ends (epoch seconds); None when the scheduler does not say."""
        return None


class SlurmScheduler(Scheduler):
    name = "slurm"
    jobs_submit_branches = True

    def executor(
        self, profile: ClusterProfile, folder: Path, code_dir: Path, job_name: str
    ) -> submitit.Executor:
        executor = submitit.SlurmExecutor(
            folder=folder, max_num_timeout=profile.max_requeues, python=job_python()
        )
        params: dict = {
            "job_name": job_name,
            "time": profile.time_min,
            "nodes": profile.nodes,
            "ntasks_per_node": profile.tasks_per_node,
            "cpus_per_task": profile.cpus_per_task,
            "signal_delay_s": profile.signal_delay_s,
            "setup": _setup(profile, code_dir),
            "array_parallelism": profile.array_parallelism,
            "additional_parameters": requeueable(profile.sbatch_extra),
        }
        if profile.gpus_per_node:
            params["gpus_per_node"] = profile.gpus_per_node
        if profile.mem_gb:
            params["mem"] = f"{int(profile.mem_gb * 1024)}M"
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(profile, key):
                params[key] = getattr(profile, key)
        executor.update_parameters(**params)
        return executor

    def submit(self, executor: submitit.Executor, jobs: list) -> list[submitit.Job]:
        """Several runs go in as one job array: within a cluster's per-user job limits."""
        if len(jobs) == 1:
            return [executor.submit(jobs[0])]
        with executor.batch():
            submitted = [executor.submit(job) for job in jobs]
        return submitted

    def folder(self, output_root: Path) -> Path:
        return output_root / ".submitit" / "%j"  # SLURM fills in the job id (ARRAY_TASK for array tasks)

    def states(self, job_ids: list[str]) -> dict[str, str]:
        """squeue for live jobs, then sacct (accounting) for the rest."""
        return slurm_states(job_ids)

    def notify(self, job_id: str, run: RunDir, timeout_s: float = 120.0) -> None:
        """``scancel --signal=USR2``, stopped once the run has recorded the interruption.

        For an array task, SLURM 22.05 sometimes delivers the signal yet answers "Job can not be
        altered now, try again later", and scancel then retries every few seconds until it succeeds:
        into the same task after its requeue, a second notice nobody sent (seen on the local
        cluster). The run's record says when the first one arrived."""
        before = len(run.record().interruptions)
        scancel = subprocess.Popen(
            ["scancel", "--signal=USR2", job_id], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.time() + timeout_s
        while scancel.poll() is None:
            if len(run.record().interruptions) > before:
                scancel.terminate()
                log.info("job %s recorded the notice; stopped scancel's retries", job_id)
                scancel.wait()
                return
            if time.time() > deadline:
                scancel.kill()
                raise SweepError(f"scancel --signal=USR2 {job_id}: no answer within {timeout_s:.0f} s")
            time.sleep(0.2)
        if scancel.returncode:
            raise SweepError(f"scancel --signal=USR2 {job_id}: {scancel.stderr.read().strip()}")

    def cancel(self, job_ids: list[str]) -> None:
        if job_ids:  # jobs, or tasks of an array (ARRAY_TASK)
            subprocess.run(["scancel", *job_ids], check=True)

    def end_time(self, job_id: str) -> float | None:
        """From squeue; None when SLURM does not say."""
        try:
            text = subprocess.run(
                ["squeue", "-h", "-j", job_id, "-o", "%e"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.strip()
            return datetime.fromisoformat(text.splitlines()[0]).timestamp()
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None


class LocalScheduler(Scheduler):
    name = "local"
    runs_here = True

    def executor(
        self, profile: ClusterProfile, folder: Path, code_dir: Path, job_name: str
    ) -> submitit.Executor:
        executor = submitit.LocalExecutor(folder=folder, python=job_python())
        executor.update_parameters(
            timeout_min=profile.time_min,
            tasks_per_node=profile.tasks_per_node,
            gpus_per_node=profile.gpus_per_node,
            signal_delay_s=profile.signal_delay_s,
            setup=_setup(profile, code_dir),
        )
        return executor

    def folder(self, output_root: Path) -> Path:
        return output_root / ".submitit" / "local"  # one folder: its files carry the pid

    def states(self, job_ids: list[str]) -> dict[str, str]:
        return {job: "RUNNING" if _local_alive(job) else "ENDED" for job in job_ids}

    def notify(self, job_id: str, run: RunDir) -> None:
        if _signal_local(job_id, signal.SIGUSR2) == 0:
            raise SweepError(f"run {run.root.name}: local job {job_id} has no running task")

    def cancel(self, job_ids: list[str]) -> None:
        for job in job_ids:  # the controller forwards SIGTERM to its tasks
            _signal_local(job, signal.SIGTERM, controller=True)


def _local_alive(job_id: str) -> bool:
    try:
        return "submitit" in " ".join(psutil.Process(int(job_id)).cmdline())
    except (psutil.Error, ValueError):
        return False


def _signal_local(job_id: str, sig: signal.Signals, controller: bool = False) -> int:
    """Signal a local job's task processes (or its controller, which forwards SIGTERM to them)."""
    root = psutil.Process(int(job_id))
    targets = (
        [root]
        if controller
        else [p for p in root.children(recursive=True) if "submitit.core._submit" in " ".join(p.cmdline())]
    )
    for process in targets:
        process.send_signal(sig)
    return len(targets)


SCHEDULERS: dict[str, Scheduler] = {s.name: s for s in (SlurmScheduler(), LocalScheduler())}


def scheduler(name: str) -> Scheduler:
    """The scheduler of a profile's ``executor`` (profiles are checked to name one of SCHEDULERS)."""
    return SCHEDULERS[name]
