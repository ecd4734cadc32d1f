"""Submit a sweep's runs through submitit (SLURM or local processes) and follow them.

Each run directory gets ``config.yaml`` (what the job trains) and ``launch.json`` (executor, job
ids, code snapshot) at submission; the engine owns ``run.json``. Whether a run needs submitting
is decided from those files and the scheduler's view of its last job, so ``launch`` is
idempotent: completed and in-flight runs are skipped, preempted or cancelled ones continue from
their checkpoints, failed ones only with ``retry_failed``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import submitit

import nepa_scale
from nepa_scale.config import dump_yaml
from nepa_scale.errors import RunRecordError, SweepError
from nepa_scale.launch.design import training_flops
from nepa_scale.launch.job import RunJob, job_python
from nepa_scale.launch.profiles import ClusterProfile
from nepa_scale.launch.sweep import PlannedRun, Sweep
from nepa_scale.rundir import RunDir, RunRecord, write_json_atomic

log = logging.getLogger("nepa_scale.launch")

LIVE_SLURM_STATES = {
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
    "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "STOPPED",
}  # fmt: skip
FAILED_SLURM_STATES = {
    "FAILED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


# ----------------------------------------------------------------------------- code snapshot


def snapshot_code(root: Path) -> Path:
    """Copy the nepa_scale package into ``root/.code/<content hash>/`` (once per distinct code), so
    that queued and requeued jobs run the code they were submitted with."""
    package = Path(nepa_scale.__file__).resolve().parent
    files = sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    target = root / ".code" / digest.hexdigest()[:12]
    if not (target / "SNAPSHOT.json").is_file():
        staging = target.with_name(target.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(package, staging / "nepa_scale", ignore=shutil.ignore_patterns("__pycache__"))
        from nepa_scale.engine.provenance import git_revision

        write_json_atomic(
            staging / "SNAPSHOT.json",
            {
                "source": str(package),
                "git_revision": git_revision(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


# ----------------------------------------------------------------------------- executors


def make_executor(profile: ClusterProfile, folder: Path, code_dir: Path, job_name: str) -> submitit.Executor:
    # The snapshot first on the path; PYTHONSAFEPATH (Python >= 3.11) keeps `python -m` from putting
    # the submission directory (often a checkout of this repository) in front of it.
    setup = [
        f"export PYTHONPATH={shlex.quote(str(code_dir))}${{PYTHONPATH:+:$PYTHONPATH}} PYTHONSAFEPATH=1",
        *profile.setup,
    ]
    if profile.executor == "local":
        executor = submitit.LocalExecutor(folder=folder, python=job_python())
        executor.update_parameters(
            timeout_min=profile.time_min,
            tasks_per_node=profile.tasks_per_node,
            gpus_per_node=profile.gpus_per_node,
            signal_delay_s=profile.signal_delay_s,
            setup=setup,
        )
        return executor
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
        "setup": setup,
        "array_parallelism": profile.array_parallelism,
        "additional_parameters": dict(profile.sbatch_extra),
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


def run_job(run: PlannedRun) -> RunJob:
    r = run.resources
    return RunJob(str(run.run_dir), r.max_requeues, r.signal_delay_s, r.time_min, r.cpus_per_task)


# ----------------------------------------------------------------------------- job state


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """Current state of each job: squeue for live jobs, then sacct (accounting) for the rest."""
    states: dict[str, str] = {}
    if not job_ids:
        return states
    ids = ",".join(job_ids)
    live = subprocess.run(["squeue", "-h", "-j", ids, "-o", "%i %T"], capture_output=True, text=True)
    for line in live.stdout.splitlines():
        job, state = line.split()
        states[job] = state
    missing = [j for j in job_ids if j not in states]
    if missing:
        done = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-j", ",".join(missing), "-o", "JobID,State"],
            capture_output=True,
            text=True,
        )
        for line in done.stdout.splitlines():
            job, state = line.split("|")[:2]
            states.setdefault(job, state.split()[0])  # "CANCELLED by 0" -> CANCELLED
    return states


def local_alive(job_id: str) -> bool:
    import psutil

    try:
        return "submitit" in " ".join(psutil.Process(int(job_id)).cmdline())
    except (psutil.Error, ValueError):
        return False


def job_states(launches: dict[str, dict]) -> dict[str, str]:
    """run id -> scheduler state of its last job (RUNNING/ENDED for local jobs; '' if never launched)."""
    slurm = {rid: info["job_id"] for rid, info in launches.items() if info.get("executor") == "slurm"}
    by_job = slurm_states(sorted(set(slurm.values())))
    states = {}
    for rid, info in launches.items():
        if not info:
            states[rid] = ""
        elif info.get("executor") == "slurm":
            states[rid] = by_job.get(info["job_id"], "UNKNOWN")
        else:
            states[rid] = "RUNNING" if local_alive(info["job_id"]) else "ENDED"
    return states


def read_launch(run: RunDir) -> dict:
    path = run.launch_json
    return json.loads(path.read_text()) if path.is_file() else {}


# ----------------------------------------------------------------------------- status


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    model: str
    state: str  # not launched | pending | running | requeued | preempted | cancelled | completed | failed
    progress: float | None
    step: int | None
    loss: float | None
    restarts: int
    timeouts: int
    job_id: str
    error: str | None
    idle_timeouts: int = 0  # time-limit attempts that trained no step


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


def run_status(run: PlannedRun, job_state: str) -> RunStatus:
    rd = RunDir(run.run_dir)
    launch = read_launch(rd)
    try:
        record = rd.record()
    except RunRecordError as exc:  # one unreadable run.json must not hide the sweep's other runs
        record = RunRecord(status="failed", error=str(exc))
    train = [m for m in rd.read_metrics() if m.get("kind") == "train"]
    step = train[-1]["step"] if train else None
    total = record.total_steps
    status = record.status
    error = record.error or run.error
    interrupted = bool(record.interruptions or record.restarts)
    if run.error or status in ("completed", "failed"):
        state = "failed" if run.error else status
    elif job_state in ("PENDING", "CONFIGURING"):
        state = "requeued" if interrupted else "pending"
    elif job_state in ("REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD"):
        state = "requeued"
    elif job_state in LIVE_SLURM_STATES:
        state = "running"
    elif job_state.startswith("CANCELLED"):
        state = "cancelled"
    elif job_state in FAILED_SLURM_STATES or (
        job_state in ("ENDED", "COMPLETED", "UNKNOWN") and status in (None, "created", "running")
    ):  # the job is over but the run neither finished nor saved for a requeue
        state, error = (
            "failed",
            error or _job_error_line(launch) or f"job {launch.get('job_id')} ended {job_state}",
        )
    elif status == "preempted":
        state = "preempted"
    else:
        state = "not launched" if not launch else (status or "unknown")
    return RunStatus(
        run.run_id,
        str(run.config_data.get("model", {}).get("name", "?")),
        state,
        step / total if step is not None and total else (1.0 if state == "completed" else None),
        step,
        train[-1]["loss"] if train else None,
        len(record.restarts),
        record.timeouts,
        str(launch.get("job_id", "")),
        error,
        record.idle_timeouts,
    )


def sweep_status(sweep: Sweep) -> list[RunStatus]:
    launches = {run.run_id: read_launch(RunDir(run.run_dir)) for run in sweep.runs}
    states = job_states(launches)
    return [run_status(run, states[run.run_id]) for run in sweep.runs]


def status_table(rows: list[RunStatus]) -> str:
    head = f"{'run id':<46} {'model':<10} {'state':<12} {'progress':>8} {'step':>7} {'loss':>9} {'restarts':>8} {'job':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        progress = f"{100 * r.progress:.0f}%" if r.progress is not None else "-"
        loss = f"{r.loss:.4f}" if r.loss is not None else "-"
        step = str(r.step) if r.step is not None else "-"
        restarts = f"{r.restarts}" + (f" ({r.timeouts} t/o)" if r.timeouts else "")
        lines.append(
            f"{r.run_id:<46} {r.model:<10} {r.state:<12} {progress:>8} {step:>7} {loss:>9} {restarts:>8} {r.job_id:>9}"
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
    return "\n".join(lines)


# ----------------------------------------------------------------------------- launch


def _prepare(run: PlannedRun) -> None:
    rd = RunDir(run.run_dir)
    rd.root.mkdir(parents=True, exist_ok=True)
    if run.error:
        rd.invalid(run.config_data, run.error)
        return
    rd.config_yaml.write_text(dump_yaml(run.config))
    if not rd.run_json.is_file():
        rd.created(run.config)


def _record_submission(run: PlannedRun, job: submitit.Job, folder: Path, code_dir: Path) -> None:
    rd = RunDir(run.run_dir)
    previous = read_launch(rd)
    entry = {"job_id": str(job.job_id), "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json_atomic(
        rd.launch_json,
        {
            "executor": run.resources.executor,
            "job_id": str(job.job_id),
            "folder": str(folder),
            "code": str(code_dir),
            "resources": run.resources.to_dict(),
            "jobs": [*previous.get("jobs", []), entry],
        },
    )


def to_submit(sweep: Sweep, retry_failed: bool = False) -> tuple[list[PlannedRun], list[RunStatus]]:
    """The runs ``launch`` would submit now, and the status of every run."""
    rows = sweep_status(sweep)
    pending = []
    for run, row in zip(sweep.runs, rows, strict=True):
        if run.error:
            continue
        if row.state in ("completed", "pending", "running", "requeued"):
            continue
        if row.state == "failed" and not retry_failed:
            continue
        pending.append(run)
    return pending, rows


def submit(sweep: Sweep, runs: list[PlannedRun], code_dir: Path | None = None) -> dict[str, submitit.Job]:
    """Submit ``runs`` now (one job each) and record them; returns run id -> job."""
    code_dir = code_dir or snapshot_code(sweep.output_root)
    # SLURM replaces %j with the job id; the local executor keeps one folder (files carry the pid).
    folder = (
        sweep.output_root
        / ".submitit"
        / ("%j" if runs and runs[0].resources.executor == "slurm" else "local")
    )
    jobs = {}
    for run in runs:
        rd = RunDir(run.run_dir)
        if rd.record().status == "failed":  # --retry-failed: continue from its checkpoint
            rd.retried()
        executor = make_executor(run.resources, folder, code_dir, f"nepa:{sweep.name}:{run.run_id}")
        job = executor.submit(run_job(run))
        _record_submission(run, job, Path(str(folder).replace("%j", str(job.job_id))), code_dir)
        jobs[run.run_id] = job
        log.info("submitted %s as %s job %s", run.run_id, run.resources.executor, job.job_id)
    return jobs


def launch(
    sweep: Sweep, retry_failed: bool = False, dry_run: bool = False, preempt_at: PreemptOnce | None = None
) -> list[PlannedRun]:
    """Prepare every run directory and submit what is neither done nor in flight (SLURM: returns
    once submitted; local executor: runs them here, ``array_parallelism`` at a time, and returns
    when they are done)."""
    pending, _ = to_submit(sweep, retry_failed)
    if dry_run:
        return pending
    for run in sweep.runs:
        if run.error or run in pending:
            _prepare(run)
    if any(run.resources.executor == "local" for run in pending):
        run_local(sweep, pending, preempt_at)
    else:
        submit(sweep, pending)
    return pending


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


class PreemptOnce:
    """Sends one run a preemption notice once it has logged ``step`` (the demo's "preemption")."""

    def __init__(self, sweep: Sweep, run_id: str, step: int):
        self.sweep, self.run_id, self.step, self.sent = sweep, run_id, step, False

    def poll(self, out) -> None:
        if self.sent:
            return
        train = [
            m for m in RunDir(self.sweep.run(self.run_id).run_dir).read_metrics() if m.get("kind") == "train"
        ]
        if train and train[-1]["step"] >= self.step:
            preempt(self.sweep, self.run_id)
            self.sent = True
            print(
                f"[{time.strftime('%H:%M:%S')}] preempting {self.run_id} at step {train[-1]['step']} (SIGUSR2, as a "
                "cluster would): it saves a checkpoint, exits for requeue and resumes from it",
                file=out,
                flush=True,
            )


def _ended_line(run: PlannedRun) -> str:
    row = run_status(run, "ENDED")
    restarts = RunDir(run.run_dir).record().restarts
    text = f"[{time.strftime('%H:%M:%S')}] {run.run_id}: {row.state}"
    if row.loss is not None:
        text += f", final loss {row.loss:.4f}"
    if restarts:
        text += f", resumed {len(restarts)}x (from step {', '.join(str(r.from_step) for r in restarts)})"
    return text + (f" ({row.error})" if row.error else "")


def run_local(
    sweep: Sweep,
    runs: list[PlannedRun],
    preempt_at: PreemptOnce | None = None,
    poll_s: float = 1.0,
    report_every_s: float = 15.0,
    out=sys.stdout,
) -> None:
    """Run ``runs`` with submitit's LocalExecutor, at most ``array_parallelism`` at once, the most
    expensive first (so that the last one to finish is a short one and no core idles long)."""
    queue, active = sorted(runs, key=lambda run: training_flops(run.config), reverse=True), {}
    code_dir = snapshot_code(sweep.output_root)  # one launch, one code version
    parallel = min((r.resources.array_parallelism for r in runs), default=1)
    last_report = time.time()
    while queue or active:
        while queue and len(active) < parallel:
            run = queue.pop(0)
            active[run.run_id] = submit(sweep, [run], code_dir)[run.run_id]
        for run_id, job in list(active.items()):
            if job.done():
                del active[run_id]
                print(_ended_line(sweep.run(run_id)), file=out, flush=True)
        if preempt_at is not None and preempt_at.run_id in active:
            preempt_at.poll(out)
        if time.time() - last_report >= report_every_s and active:
            print(progress_line(sweep_status(sweep)), file=out, flush=True)
            last_report = time.time()
        time.sleep(poll_s)


def wait(
    sweep: Sweep,
    preempt_at: PreemptOnce | None = None,
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
                print(_ended_line(sweep.run(row.run_id)), file=out, flush=True)
        active = [r for r in rows if r.state in ("pending", "running", "requeued")]
        if not active:
            return rows
        if preempt_at is not None and any(
            r.run_id == preempt_at.run_id and r.state == "running" for r in rows
        ):
            preempt_at.poll(out)
        if time.time() - last_report >= report_every_s:
            print(progress_line(rows), file=out, flush=True)
            last_report = time.time()
        time.sleep(poll_s)


# ----------------------------------------------------------------------------- control


def cancel(sweep: Sweep) -> list[str]:
    """Stop every in-flight job of the sweep (they save on SIGTERM when there is time)."""
    cancelled = []
    for run, row in zip(sweep.runs, sweep_status(sweep), strict=True):
        if row.state not in ("pending", "running", "requeued"):
            continue
        launch_info = read_launch(RunDir(run.run_dir))
        if launch_info["executor"] == "slurm":
            subprocess.run(["scancel", launch_info["job_id"]], check=True)
        else:
            _signal_local(launch_info["job_id"], signal.SIGTERM, controller=True)
        cancelled.append(run.run_id)
    return cancelled


def _signal_local(job_id: str, sig: signal.Signals, controller: bool = False) -> int:
    """Signal a local job's task processes (or its controller, which forwards SIGTERM to them)."""
    import psutil

    root = psutil.Process(int(job_id))
    targets = [root] if controller else []
    if not controller:
        targets = [
            p for p in root.children(recursive=True) if "submitit.core._submit" in " ".join(p.cmdline())
        ]
    for process in targets:
        process.send_signal(sig)
    return len(targets)


def preempt(sweep: Sweep, run_id: str) -> str:
    """Send a run's job the preemption notice a cluster sends (SIGUSR2 to every task)."""
    launch_info = read_launch(RunDir(sweep.run(run_id).run_dir))
    if not launch_info:
        raise SweepError(f"run {run_id} was never launched")
    if launch_info["executor"] == "slurm":
        subprocess.run(["scancel", "--signal=USR2", launch_info["job_id"]], check=True)
    elif _signal_local(launch_info["job_id"], signal.SIGUSR2) == 0:
        raise SweepError(f"run {run_id}: local job {launch_info['job_id']} has no running task")
    return launch_info["job_id"]
