"""Where each run of a sweep stands: the one state machine, from run.json, launch.json and the
scheduler's view of the run's last job.

    run's state        when
    not launched       never submitted
    waiting            a cooldown branch whose trunk has not committed its branch point
    pending, running   its job is queued, running
    requeued           its job is back in the queue after a notice (or queued after one)
    preempted          it saved and stopped on a notice, and no job is queued for it
    interrupted        a rank was lost; it resumes from its last committed checkpoint
    stopped            a user stopped it (Ctrl-C); saved and resumable
    cancelled          its job was cancelled
    completed, failed  run.json says so (or the job ended without the run finishing or saving)

``sweep launch`` continues every state but completed, in flight and failed (``--retry-failed``
continues those too).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from nepa_scale.engine.checkpoint_store import committed_checkpoints
from nepa_scale.errors import RunRecordError
from nepa_scale.launch.branches import branch_point_committed
from nepa_scale.launch.executors import FAILED_SLURM_STATES, LIVE_SLURM_STATES, scheduler
from nepa_scale.launch.submission import read_launch
from nepa_scale.launch.sweep import PlannedRun, Sweep
from nepa_scale.rundir import RunDir, RunRecord

NOT_DONE = ("failed", "cancelled", "interrupted", "preempted", "stopped")  # stopped, no job continues them
IN_FLIGHT = ("pending", "running", "requeued")


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    model: str
    state: str  # see the module's docstring
    progress: float | None
    step: int | None
    loss: float | None
    restarts: int
    timeouts: int
    job_id: str
    error: str | None
    idle_timeouts: int = 0  # time-limit attempts that trained no step
    design: str = ""  # trunk | branch@STEP | "" (independent)
    committed: int | None = None  # the step of its newest committed checkpoint (where it resumes)
    invalid: bool = False  # its config is invalid: nothing to resume


def job_states(launches: dict[str, dict]) -> dict[str, str]:
    """run id -> the scheduler's state of its last job ('' if never launched)."""
    by_scheduler: dict[str, list[str]] = {}
    for info in launches.values():
        if info:
            by_scheduler.setdefault(info["executor"], []).append(info["job_id"])
    known = {name: scheduler(name).states(sorted(set(jobs))) for name, jobs in by_scheduler.items()}
    return {
        rid: known[info["executor"]].get(info["job_id"], "UNKNOWN") if info else ""
        for rid, info in launches.items()
    }


def _job_error_line(launch: dict) -> str | None:
    folder = launch.get("folder")
    if not folder:
        return None
    for log_file in sorted(Path(folder).glob(f"{launch['job_id']}*_0_log.err")):
        lines = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line or "error" in line]
        if errors or lines:
            return (errors or lines)[-1].strip()
    return None


def _state(run: PlannedRun, record: RunRecord, launch: dict, job_state: str) -> tuple[str, str | None]:
    """(state, error) of a run: the state machine of the module's docstring."""
    status, error = record.status, record.error or run.error
    interrupted = bool(record.interruptions or record.restarts)
    if run.error or status in ("completed", "failed"):
        return ("failed" if run.error else status), error
    if job_state in ("PENDING", "CONFIGURING"):
        return ("requeued" if interrupted else "pending"), error
    if job_state in ("REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD"):
        return "requeued", error
    if job_state in LIVE_SLURM_STATES:
        return "running", error
    if job_state.startswith("CANCELLED"):
        return "cancelled", error
    if status in ("interrupted", "stopped"):  # a rank was lost, or a user stopped it: resumable
        return status, error
    if job_state in FAILED_SLURM_STATES or (
        job_state in ("ENDED", "COMPLETED", "UNKNOWN") and status in (None, "created", "running")
    ):  # the job is over but the run neither finished nor saved for a requeue
        return "failed", error or _job_error_line(launch) or f"job {launch.get('job_id')} ended {job_state}"
    if status == "preempted":
        return "preempted", error
    if not launch and not branch_point_committed(run):
        return "waiting", error  # for its trunk's branch point
    return ("not launched" if not launch else (status or "unknown")), error


def run_status(run: PlannedRun, job_state: str) -> RunStatus:
    rd = RunDir(run.run_dir)
    launch = read_launch(rd)
    try:
        record = rd.record()
    except RunRecordError as exc:  # one unreadable run.json must not hide the sweep's other runs
        record = RunRecord(status="failed", error=str(exc))
    last = rd.last_metric("train")
    step = last["step"] if last else None
    total = record.total_steps
    state, error = _state(run, record, launch, job_state)
    committed = committed_checkpoints(rd.checkpoints)
    return RunStatus(
        run.run_id,
        str(run.config_data.get("model", {}).get("name", "?")),
        state,
        step / total if step is not None and total else (1.0 if state == "completed" else None),
        step,
        last["loss"] if last else None,
        len(record.restarts),
        record.timeouts,
        str(launch.get("job_id", "")),
        error,
        record.idle_timeouts,
        run.design,
        committed[-1].step if committed else None,
        bool(run.error),
    )


def runs_status(runs: list[PlannedRun]) -> list[RunStatus]:
    """Where each run stands now (one question to the scheduler for all of them)."""
    launches = {run.run_id: read_launch(RunDir(run.run_dir)) for run in runs}
    states = job_states(launches)
    return [run_status(run, states[run.run_id]) for run in runs]


def sweep_status(sweep: Sweep) -> list[RunStatus]:
    return runs_status(sweep.runs)


def not_done_lines(rows: list[RunStatus], sweep_file: str | Path) -> list[str]:
    """What a launch or status leaves undone: each stopped run, where it would resume from, and the
    command that resumes it."""
    lines = []
    for r in rows:
        if r.state not in NOT_DONE:
            continue
        if r.invalid:
            lines.append(f"{r.run_id}: {r.state}, its config is invalid ({r.error}): fix the sweep file")
            continue
        start = (
            f"its checkpoint of step {r.committed}"
            if r.committed is not None
            else "the start (nothing committed)"
        )
        retry = " --retry-failed" if r.state == "failed" else ""
        reason = f" ({r.error})" if r.error and r.state == "failed" else ""
        lines.append(
            f"{r.run_id}: {r.state}{reason}; resumes from {start} with: nepa-scale sweep launch {sweep_file}{retry}"
        )
    return lines


def status_table(rows: list[RunStatus]) -> str:
    head = f"{'run id':<46} {'model':<10} {'design':<10} {'state':<12} {'progress':>8} {'step':>7} {'loss':>9} {'restarts':>8} {'job':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        progress = f"{100 * r.progress:.0f}%" if r.progress is not None else "-"
        loss = f"{r.loss:.4f}" if r.loss is not None else "-"
        step = str(r.step) if r.step is not None else "-"
        restarts = f"{r.restarts}" + (f" ({r.timeouts} t/o)" if r.timeouts else "")
        lines.append(
            f"{r.run_id:<46} {r.model:<10} {r.design:<10} {r.state:<12} {progress:>8} {step:>7} {loss:>9} {restarts:>8} {r.job_id:>11}"
        )
        if r.state == "failed" and r.error:
            lines.append(f"    error: {r.error}")
        if r.idle_timeouts:
            lines.append(
                f"    {r.idle_timeouts} time-limit attempt(s) trained no step (start-up took the time): "
                "they count against max_requeues; consider a longer time_min"
            )
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    lines.append(", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    if counts.get("waiting"):
        lines.append("waiting: cooldown branches whose trunk has not yet committed their branch point")
    return "\n".join(lines)


def progress_line(rows: list[RunStatus]) -> str:
    done = sum(r.state == "completed" for r in rows)
    active = [r for r in rows if r.state in ("running", "requeued")]
    parts = [
        f"{r.run_id.rsplit('-', 1)[0]} {100 * (r.progress or 0):.0f}%"
        + (f" loss {r.loss:.3f}" if r.loss is not None else "")
        + (" (requeued)" if r.state == "requeued" else "")
        for r in active
    ]
    return f"[{time.strftime('%H:%M:%S')}] {done}/{len(rows)} completed; " + ("; ".join(parts) or "waiting")


def ended_line(run: PlannedRun) -> str:
    row = run_status(run, "ENDED")
    restarts = RunDir(run.run_dir).record().restarts
    text = f"[{time.strftime('%H:%M:%S')}] {run.run_id}: {row.state}"
    if row.loss is not None:
        text += f", final loss {row.loss:.4f}"
    if restarts:
        text += f", resumed {len(restarts)}x (from step {', '.join(str(r.from_step) for r in restarts)})"
    return text + (f" ({row.error})" if row.error else "")
