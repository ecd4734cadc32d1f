"""Submit a sweep's runs and follow them: ``launch``, ``wait``, ``cancel``, ``preempt``.

Whether a run needs submitting is decided from its run directory and the scheduler's view of its
last job (``status.py``), so ``launch`` is idempotent: completed and in-flight runs are skipped,
preempted, interrupted, stopped or cancelled ones continue from their checkpoints, failed ones only
with ``retry_failed``. That decision is made again for each run right before it is submitted, while
the launcher holds the run's lock (``nepa_scale/ownership.py``): another launch of the same sweep
may have submitted it meanwhile, or a process may be training it. Runs that share their resources
go in together (on SLURM as one job array, at most the profile's ``array_parallelism`` running at
once); each is a run like any other, with its own requeues, preemptions, status and cancel. The schedulers: ``executors.py``; what a
submission writes: ``submission.py``; cooldown branches: ``branches.py``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable

import submitit

from nepa_scale.config.files import check_output_folder
from nepa_scale.data import check_input_paths
from nepa_scale.errors import RunBusy, SweepError
from nepa_scale.launch.branches import branch_point_committed, record_branches, run_job
from nepa_scale.launch.design import training_flops
from nepa_scale.launch.executors import scheduler
from nepa_scale.launch.status import (
    IN_FLIGHT,
    RunStatus,
    ended_line,
    progress_line,
    runs_status,
    sweep_status,
)
from nepa_scale.launch.submission import prepare, read_launch, snapshot_code, submit_group
from nepa_scale.launch.sweep import PlannedRun, Sweep
from nepa_scale.ownership import Ownership, acquire
from nepa_scale.rundir import RunDir

log = logging.getLogger("nepa_scale.launch")

# Called with the ids of the runs in flight at every poll of a waiting launch (the demo preempts
# one of them from such a hook).
Watch = Callable[[set[str]], None]


def skip_reason(run: PlannedRun, row: RunStatus, retry_failed: bool) -> str | None:
    """Why ``launch`` leaves ``run`` alone (None: it submits it)."""
    if run.error:
        return "its config is invalid"
    if row.state in ("completed", "waiting", *IN_FLIGHT):
        return row.state + (f" (job {row.job_id})" if row.state in IN_FLIGHT and row.job_id else "")
    if row.state == "failed" and not retry_failed:
        return "failed (--retry-failed continues it)"
    return None


def to_submit(sweep: Sweep, retry_failed: bool = False) -> tuple[list[PlannedRun], list[RunStatus]]:
    """The runs ``launch`` would submit now (branches included once their point is committed), and
    the status of every run."""
    rows = sweep_status(sweep)
    pending = [
        run for run, row in zip(sweep.runs, rows, strict=True) if skip_reason(run, row, retry_failed) is None
    ]
    return pending, rows


def own(runs: list[PlannedRun]) -> list[tuple[PlannedRun, Ownership]]:
    """Take each run's lock as a launcher (waiting for another launcher's submission to end);
    a run another process owns (its job trains it, someone's `nepa-scale train`) is left, and said."""
    owned = []
    for run in runs:
        try:
            owned.append((run, acquire(run.run_dir, "launch")))
        except RunBusy as exc:
            log.warning("%s: not submitted: %s", run.run_id, exc)
    return owned


def submit(
    sweep: Sweep, runs: list[PlannedRun], code_dir=None, retry_failed: bool = False
) -> dict[str, submitit.Job]:
    """Submit ``runs`` now and record them; returns run id -> job. Each run is checked again while
    its lock is held (another launch may have submitted it since this one looked), prepared, and
    its lock given up once its job is recorded: the job's own `train` takes it when it starts."""
    code_dir = code_dir or snapshot_code(sweep.output_root)
    groups: dict[str, list[PlannedRun]] = {}
    owned = own(runs)
    jobs = {}
    try:
        rows = runs_status([run for run, _ in owned])
        for (run, _), row in zip(owned, rows, strict=True):
            reason = skip_reason(run, row, retry_failed)
            if reason is not None:
                log.warning("%s: not submitted: it is %s now", run.run_id, reason)
                continue
            prepare(run)
            rd = RunDir(run.run_dir)
            if rd.record().status == "failed":  # --retry-failed: continue from its checkpoint
                rd.retried()
            folder = scheduler(run.resources.executor).folder(sweep.output_root)
            if run.trunk_of:
                record_branches(sweep, run, folder, code_dir)
            groups.setdefault(json.dumps(run.resources.model_dump(), sort_keys=True), []).append(run)
        for group in groups.values():
            folder = scheduler(group[0].resources.executor).folder(sweep.output_root)
            pairs = [(r.run_dir, r.resources) for r in group]
            submitted = submit_group(sweep.name, pairs, folder, code_dir, run_job)
            jobs.update({run.run_id: job for run, job in zip(group, submitted, strict=True)})
    finally:
        for _, ownership in owned:
            ownership.release()
    return jobs


def launch(
    sweep: Sweep, retry_failed: bool = False, dry_run: bool = False, watch: Watch | None = None
) -> list[PlannedRun]:
    """Prepare every run directory and submit what is neither done nor in flight (SLURM: returns
    once submitted; the local scheduler: runs them here, ``array_parallelism`` at a time, and
    returns when they are done). Branches still waiting for their trunk are prepared, not submitted.
    Returns the runs it submitted (``dry_run``: would submit)."""
    pending, rows = to_submit(sweep, retry_failed)
    waiting = [run for run, row in zip(sweep.runs, rows, strict=True) if row.state == "waiting"]
    if dry_run:
        return pending
    check_output_folder(sweep.output_root, "output_root")
    for run in pending + waiting:
        check_input_paths(run.config)  # the data must be there now (plan only warned)
    for run, ownership in own([run for run in sweep.runs if run.error or run in waiting]):
        with ownership:  # an invalid run's record, a waiting branch's config (its trunk's job submits it)
            prepare(run)
    if any(scheduler(run.resources.executor).runs_here for run in pending + waiting):
        submitted = run_here(sweep, pending + waiting, watch, retry_failed=retry_failed)
    else:
        submitted = set(submit(sweep, pending, retry_failed=retry_failed))
    return [run for run in pending if run.run_id in submitted]


def run_here(
    sweep: Sweep,
    runs: list[PlannedRun],
    watch: Watch | None = None,
    poll_s: float = 1.0,
    report_every_s: float = 15.0,
    out=sys.stdout,
    retry_failed: bool = False,
) -> set[str]:
    """Run ``runs`` on this machine, at most ``array_parallelism`` at once, the most expensive
    first (so that the last one to finish is a short one and no core idles long). Each is checked
    again as its turn comes (``submit``): one another launch took meanwhile is left to it. Returns
    the ids of the runs it submitted."""
    queue, active = sorted(runs, key=lambda run: training_flops(run.config), reverse=True), {}
    code_dir = snapshot_code(sweep.output_root)  # one launch, one code version
    parallel = min((r.resources.array_parallelism for r in runs), default=1)
    last_report, submitted = time.time(), set()
    while queue or active:
        ready = [run for run in queue if branch_point_committed(run)]  # a branch once its point is
        if not ready and not active:
            for run in queue:
                print(
                    f"{run.run_id}: not started, its trunk {run.parent} ended before step {run.branch_step}",
                    file=out,
                )
            return submitted
        while ready and len(active) < parallel:
            run = ready.pop(0)
            queue.remove(run)
            job = submit(sweep, [run], code_dir, retry_failed).get(run.run_id)
            if job is not None:
                active[run.run_id] = job
                submitted.add(run.run_id)
        for run_id, job in list(active.items()):
            if job.done():
                del active[run_id]
                print(ended_line(sweep.run(run_id)), file=out, flush=True)
        if watch is not None:
            watch(set(active))
        if time.time() - last_report >= report_every_s and active:
            print(progress_line(sweep_status(sweep)), file=out, flush=True)
            last_report = time.time()
        time.sleep(poll_s)
    return submitted


def wait(
    sweep: Sweep,
    watch: Watch | None = None,
    poll_s: float = 2.0,
    report_every_s: float = 15.0,
    out=sys.stdout,
) -> list[RunStatus]:
    """Block until no run of the sweep is pending, running or requeued; print progress meanwhile."""
    finished = ("completed", "failed", "cancelled")
    last_report = time.time()
    ended = {r.run_id for r in sweep_status(sweep) if r.state in finished}  # before this wait
    while True:
        rows = sweep_status(sweep)
        for row in rows:
            if row.state in finished and row.run_id not in ended:
                ended.add(row.run_id)
                print(ended_line(sweep.run(row.run_id)), file=out, flush=True)
        active = [r for r in rows if r.state in IN_FLIGHT]
        if not active:
            return rows
        if watch is not None:
            watch({r.run_id for r in rows if r.state == "running"})
        if time.time() - last_report >= report_every_s:
            print(progress_line(rows), file=out, flush=True)
            last_report = time.time()
        time.sleep(poll_s)


def cancel(sweep: Sweep) -> list[str]:
    """Stop every in-flight job of the sweep (they save on SIGTERM when there is time)."""
    cancelled, by_scheduler = [], {}
    for run, row in zip(sweep.runs, sweep_status(sweep), strict=True):
        if row.state in IN_FLIGHT:
            launch_info = read_launch(RunDir(run.run_dir))
            by_scheduler.setdefault(launch_info["executor"], []).append(launch_info["job_id"])
            cancelled.append(run.run_id)
    for name, jobs in by_scheduler.items():
        scheduler(name).cancel(jobs)
    return cancelled


def preempt(sweep: Sweep, run_id: str) -> str:
    """Send a run's job the preemption notice a cluster sends (SIGUSR2 to every task)."""
    run = RunDir(sweep.run(run_id).run_dir)
    launch_info = read_launch(run)
    if not launch_info:
        raise SweepError(f"run {run_id} was never launched")
    scheduler(launch_info["executor"]).notify(launch_info["job_id"], run)
    return launch_info["job_id"]
