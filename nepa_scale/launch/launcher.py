"""Submit a sweep's runs through submitit (SLURM or local processes) and follow them.

Each run directory gets ``config.yaml`` (what the job trains) and ``launch.json`` (executor, job
ids, code snapshot) at submission; the engine owns ``run.json``. Whether a run needs submitting
is decided from those files and the scheduler's view of its last job, so ``launch`` is
idempotent: completed and in-flight runs are skipped, preempted or cancelled ones continue from
their checkpoints, failed ones only with ``retry_failed``.

On SLURM, the runs of one launch that share their resources go in as one job array (submitit's
batch submission), at most the profile's ``array_parallelism`` running at once, so a study of
hundreds of runs stays within a cluster's per-user job limits. Each array task is a run like any
other: its own requeues, preemptions, status and cancel (job ids ``ARRAY_TASK``).

Cooldown branches (nepa_scale/launch/design.py) wait for their trunk's branch-point checkpoint,
and no allocation waits for them: on SLURM the trunk's own job submits each branch the moment that
checkpoint commits (``submit_ready_branches``, from the engine's on-commit hook). The trunk's job is
the one process that knows that moment, and ``sweep launch`` returns once it has submitted, so
nothing else is watching. A launch also submits any branch whose point is already committed (a
trunk that finished, or one killed between commit and submission). Under the local executor the
launching process is watching anyway, and starts a branch when a slot is free and its point is
committed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
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
from nepa_scale.config import check_input_paths, dump_yaml
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


def _run_job(run_dir: Path, r: ClusterProfile) -> RunJob:
    """A trunk (its run directory holds BRANCHES_FILE) gets the branch submitter for its job."""
    trunk = (run_dir / BRANCHES_FILE).is_file()
    return RunJob(
        str(run_dir),
        r.max_requeues,
        r.signal_delay_s,
        r.time_min,
        r.cpus_per_task,
        submit_ready_branches if trunk and r.executor == "slurm" else None,
    )


# ----------------------------------------------------------------------------- job state


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """Current state of each job: squeue for live jobs, then sacct (accounting) for the rest."""
    states: dict[str, str] = {}
    if not job_ids:
        return states
    ids = ",".join(job_ids)
    # -r: one line per array task, also for tasks still pending inside their array's record.
    live = subprocess.run(["squeue", "-h", "-r", "-j", ids, "-o", "%i %T"], capture_output=True, text=True)
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
    # not launched | waiting | pending | running | requeued | preempted | interrupted | cancelled |
    # completed | failed
    state: str
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


def branch_point_committed(run: PlannedRun) -> bool:
    """A branch's start, its trunk's checkpoint at the branch step, is committed (True for other runs)."""
    if run.parent is None:
        return True
    return RunDir(run.config_data["branch"]["parent"]).has_committed(run.branch_step)


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
    elif status in ("interrupted", "stopped"):  # a rank was lost, or a user stopped it: resumable
        state = status
    elif job_state in FAILED_SLURM_STATES or (
        job_state in ("ENDED", "COMPLETED", "UNKNOWN") and status in (None, "created", "running")
    ):  # the job is over but the run neither finished nor saved for a requeue
        state, error = (
            "failed",
            error or _job_error_line(launch) or f"job {launch.get('job_id')} ended {job_state}",
        )
    elif status == "preempted":
        state = "preempted"
    elif not launch and not branch_point_committed(run):
        state = "waiting"  # for its trunk's branch point
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
        run.design,
        _newest_committed(rd),
        bool(run.error),
    )


def _newest_committed(run: RunDir) -> int | None:
    from nepa_scale.engine.checkpoint import committed_checkpoints

    found = committed_checkpoints(run.checkpoints) if run.checkpoints.is_dir() else []
    return found[-1].step if found else None


NOT_DONE = (
    "failed",
    "cancelled",
    "interrupted",
    "preempted",
    "stopped",
)  # stopped, and no job will continue them


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


def sweep_status(sweep: Sweep) -> list[RunStatus]:
    launches = {run.run_id: read_launch(RunDir(run.run_dir)) for run in sweep.runs}
    states = job_states(launches)
    return [run_status(run, states[run.run_id]) for run in sweep.runs]


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


# ----------------------------------------------------------------------------- launch


BRANCHES_FILE = "branches.json"  # in a trunk's run directory: its branches and how to submit them


def _prepare(run: PlannedRun) -> None:
    rd = RunDir(run.run_dir)
    rd.root.mkdir(parents=True, exist_ok=True)
    if run.error:
        rd.invalid(run.config_data, run.error)
        return
    rd.config_yaml.write_text(dump_yaml(run.config))
    if not rd.run_json.is_file():
        rd.created(run.config)


def _record_branches(sweep: Sweep, trunk: PlannedRun, folder: Path, code_dir: Path) -> None:
    """What the trunk's job needs to submit its branches: their run directories, branch steps and
    resources, the submitit folder and the code snapshot of this launch."""
    branches = [sweep.run(run_id) for run_id in trunk.trunk_of]
    write_json_atomic(
        trunk.run_dir / BRANCHES_FILE,
        {
            "sweep": sweep.name,
            "folder": str(folder),
            "code": str(code_dir),
            "branches": [
                {
                    "run_id": b.run_id,
                    "run_dir": str(b.run_dir),
                    "step": b.branch_step,
                    "resources": b.resources.to_dict(),
                }
                for b in branches
            ],
        },
    )


def _record_submission(
    run_dir: Path, resources: ClusterProfile, job: submitit.Job, folder: Path, code_dir: Path
) -> None:
    rd = RunDir(run_dir)
    previous = read_launch(rd)
    entry = {"job_id": str(job.job_id), "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json_atomic(
        rd.launch_json,
        {
            "executor": resources.executor,
            "job_id": str(job.job_id),
            "folder": str(folder),
            "code": str(code_dir),
            "resources": resources.to_dict(),
            "jobs": [*previous.get("jobs", []), entry],
        },
    )


def to_submit(sweep: Sweep, retry_failed: bool = False) -> tuple[list[PlannedRun], list[RunStatus]]:
    """The runs ``launch`` would submit now (branches included once their point is committed), and
    the status of every run."""
    rows = sweep_status(sweep)
    pending = []
    for run, row in zip(sweep.runs, rows, strict=True):
        if run.error:
            continue
        if row.state in ("completed", "pending", "running", "requeued", "waiting"):
            continue
        if row.state == "failed" and not retry_failed:
            continue
        pending.append(run)
    return pending, rows


def submission_folder(sweep: Sweep, executor: str) -> Path:
    """submitit's folder: SLURM replaces %j with the job id (ARRAY_TASK for array tasks); the local
    executor keeps one folder (its files carry the pid)."""
    return sweep.output_root / ".submitit" / ("%j" if executor == "slurm" else "local")


SUBMIT_LOCK = ".submitting"  # beside run.json while a run is checked and submitted


def _claim(run_dir: Path) -> bool:
    """Take the run's submit lock, so that a launch and a trunk's job never both submit the same
    branch (an exclusively created file; one older than five minutes was left by a killed submitter)."""
    lock = run_dir / SUBMIT_LOCK
    try:
        lock.touch(exist_ok=False)
        return True
    except FileExistsError:
        if time.time() - lock.stat().st_mtime > 300:
            lock.touch()
            return True
        return False


def _release(run_dir: Path) -> None:
    (run_dir / SUBMIT_LOCK).unlink(missing_ok=True)


def _submit_group(
    sweep_name: str, runs: list[tuple[Path, ClusterProfile]], folder: Path, code_dir: Path
) -> list[submitit.Job]:
    """Submit runs that share their resources: one job each, or one job array on SLURM."""
    profile = runs[0][1]
    name = f"nepa:{sweep_name}" if len(runs) > 1 else f"nepa:{sweep_name}:{runs[0][0].name}"
    executor = make_executor(profile, folder, code_dir, name)
    if profile.executor == "slurm" and len(runs) > 1:
        with executor.batch():
            jobs = [executor.submit(_run_job(run_dir, r)) for run_dir, r in runs]
    else:
        jobs = [executor.submit(_run_job(run_dir, r)) for run_dir, r in runs]
    for (run_dir, resources), job in zip(runs, jobs, strict=True):
        where = Path(str(folder).replace("%j", str(job.job_id)))
        _record_submission(run_dir, resources, job, where, code_dir)
        log.info("submitted %s as %s job %s", run_dir.name, resources.executor, job.job_id)
    return jobs


def submit(sweep: Sweep, runs: list[PlannedRun], code_dir: Path | None = None) -> dict[str, submitit.Job]:
    """Submit ``runs`` now and record them; returns run id -> job. On SLURM, runs with the same
    resources go in as one job array."""
    code_dir = code_dir or snapshot_code(sweep.output_root)
    groups: dict[str, list[PlannedRun]] = {}
    claimed = [run for run in runs if _claim(run.run_dir)]
    jobs = {}
    try:
        for run in claimed:
            rd = RunDir(run.run_dir)
            if run.parent is not None and _in_flight(rd):  # its trunk's job was quicker
                continue
            if rd.record().status == "failed":  # --retry-failed: continue from its checkpoint
                rd.retried()
            if run.trunk_of:
                _record_branches(sweep, run, submission_folder(sweep, run.resources.executor), code_dir)
            groups.setdefault(json.dumps(run.resources.to_dict(), sort_keys=True), []).append(run)
        for group in groups.values():
            folder = submission_folder(sweep, group[0].resources.executor)
            submitted = _submit_group(sweep.name, [(r.run_dir, r.resources) for r in group], folder, code_dir)
            jobs.update({run.run_id: job for run, job in zip(group, submitted, strict=True)})
    finally:
        for run in claimed:
            _release(run.run_dir)
    return jobs


def _in_flight(rd: RunDir) -> bool:
    launch_info = read_launch(rd)
    return bool(launch_info) and job_states({"run": launch_info})["run"] in LIVE_SLURM_STATES


def submit_ready_branches(trunk_dir: str | Path) -> list[str]:
    """Submit the trunk's branches whose branch point is committed and that were never submitted
    (called by the trunk's job after each commit, on SLURM). Returns the submitted run ids."""
    trunk_dir = Path(trunk_dir)
    spec = json.loads((trunk_dir / BRANCHES_FILE).read_text())
    submitted = []
    for branch in spec["branches"]:
        run_dir = Path(branch["run_dir"])
        committed = RunDir(trunk_dir).has_committed(branch["step"])
        if not committed or RunDir(run_dir).launch_json.is_file() or not _claim(run_dir):
            continue
        try:
            if not RunDir(run_dir).launch_json.is_file():  # a launch may have been quicker
                resources = ClusterProfile(**branch["resources"])
                with _outside_this_job():
                    _submit_group(
                        spec["sweep"], [(run_dir, resources)], Path(spec["folder"]), Path(spec["code"])
                    )
                submitted.append(branch["run_id"])
        finally:
            _release(run_dir)
    return submitted


JOB_ENV_PREFIXES = ("SLURM_", "SUBMITIT_")
JOB_ENV_NAMES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def _outside_this_job():
    """sbatch passes its environment on: a job submitted from inside a job must not inherit that
    job's identity (an array task's SLURM_ARRAY_* would make submitit misname the new job)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(JOB_ENV_PREFIXES) or k in JOB_ENV_NAMES}
    for key in saved:
        del os.environ[key]
    try:
        yield
    finally:
        os.environ.update(saved)


def launch(
    sweep: Sweep, retry_failed: bool = False, dry_run: bool = False, preempt_at: PreemptOnce | None = None
) -> list[PlannedRun]:
    """Prepare every run directory and submit what is neither done nor in flight (SLURM: returns
    once submitted; local executor: runs them here, ``array_parallelism`` at a time, and returns
    when they are done). Branches still waiting for their trunk are prepared, not submitted."""
    pending, rows = to_submit(sweep, retry_failed)
    waiting = [run for run, row in zip(sweep.runs, rows, strict=True) if row.state == "waiting"]
    if dry_run:
        return pending
    for run in pending + waiting:
        check_input_paths(run.config)  # the data must be there now (plan only warned)
    for run in sweep.runs:
        if run.error or run in pending or run in waiting:
            _prepare(run)
    if any(run.resources.executor == "local" for run in pending + waiting):
        run_local(sweep, pending + waiting, preempt_at)
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
        ready = [run for run in queue if branch_point_committed(run)]  # a branch once its point is
        if not ready and not active:
            for run in queue:
                print(
                    f"{run.run_id}: not started, its trunk {run.parent} ended before step {run.branch_step}",
                    file=out,
                )
            return
        while ready and len(active) < parallel:
            run = ready.pop(0)
            queue.remove(run)
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
    cancelled, slurm_jobs = [], []
    for run, row in zip(sweep.runs, sweep_status(sweep), strict=True):
        if row.state not in ("pending", "running", "requeued"):
            continue
        launch_info = read_launch(RunDir(run.run_dir))
        if launch_info["executor"] == "slurm":
            slurm_jobs.append(launch_info["job_id"])  # a job, or one task of an array (ARRAY_TASK)
        else:
            _signal_local(launch_info["job_id"], signal.SIGTERM, controller=True)
        cancelled.append(run.run_id)
    if slurm_jobs:
        subprocess.run(["scancel", *slurm_jobs], check=True)
    return cancelled


def _notify_slurm_job(job_id: str, run: RunDir, timeout_s: float = 120.0) -> None:
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
        _notify_slurm_job(launch_info["job_id"], RunDir(sweep.run(run_id).run_dir))
    elif _signal_local(launch_info["job_id"], signal.SIGUSR2) == 0:
        raise SweepError(f"run {run_id}: local job {launch_info['job_id']} has no running task")
    return launch_info["job_id"]
