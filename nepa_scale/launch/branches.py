"""Cooldown branches of a WSD trunk (nepa_scale/launch/design.py): who submits them, and when.

A branch waits for its trunk's branch-point checkpoint, and no allocation waits for it: where the
scheduler lets jobs submit (SLURM), the trunk's own job submits each branch the moment that
checkpoint commits (``submit_ready_branches``, from the engine's on-commit hook, rank 0 only). The
trunk's job is the one process that knows that moment, and ``sweep launch`` returns once it has
submitted, so nothing else is watching. A launch also submits any branch whose point is already
committed (a trunk that finished, or one killed between a commit and the submission). The run's
lock (``nepa_scale/ownership.py``) keeps the two from submitting the same branch twice. Under the local executor the
launching process watches anyway, and starts a branch when a slot is free and its point is
committed.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from nepa_scale.errors import RunBusy
from nepa_scale.launch.executors import scheduler
from nepa_scale.launch.job import RunJob
from nepa_scale.launch.profiles import ClusterProfile
from nepa_scale.launch.submission import submit_group
from nepa_scale.launch.sweep import PlannedRun, Sweep
from nepa_scale.ownership import acquire
from nepa_scale.rundir import RunDir, write_json_atomic

BRANCHES_FILE = "branches.json"  # in a trunk's run directory: its branches and how to submit them
JOB_ENV_PREFIXES = ("SLURM_", "SUBMITIT_")
JOB_ENV_NAMES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def branch_point_committed(run: PlannedRun) -> bool:
    """A branch's start, its trunk's checkpoint at the branch step, is committed (True for other runs)."""
    if run.parent is None:
        return True
    return RunDir(run.config_data["branch"]["parent"]).has_committed(run.branch_step)


def run_job(run_dir: Path, resources: ClusterProfile) -> RunJob:
    """The callable a run's job runs: a trunk (its run directory holds BRANCHES_FILE) gets the
    branch submitter, where the scheduler lets jobs submit."""
    trunk = (run_dir / BRANCHES_FILE).is_file()
    return RunJob(
        str(run_dir),
        resources.max_requeues,
        resources.signal_delay_s,
        resources.time_min,
        resources.cpus_per_task,
        submit_ready_branches if trunk and scheduler(resources.executor).jobs_submit_branches else None,
    )


def record_branches(sweep: Sweep, trunk: PlannedRun, folder: Path, code_dir: Path) -> None:
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
                    "resources": b.resources.model_dump(),
                }
                for b in branches
            ],
        },
    )


def submit_ready_branches(trunk_dir: str | Path) -> list[str]:
    """Submit the trunk's branches whose branch point is committed and that were never submitted
    (called by the trunk's job after each commit). Returns the submitted run ids."""
    trunk_dir = Path(trunk_dir)
    spec = json.loads((trunk_dir / BRANCHES_FILE).read_text())
    submitted = []
    for branch in spec["branches"]:
        run_dir = Path(branch["run_dir"])
        committed = RunDir(trunk_dir).has_committed(branch["step"])
        if not committed or RunDir(run_dir).launch_json.is_file():
            continue
        try:
            ownership = acquire(run_dir, "launch")
        except RunBusy:  # a launch is submitting it, or its job runs already
            continue
        with ownership:
            if not RunDir(run_dir).launch_json.is_file():  # a launch may have been quicker
                resources = ClusterProfile.model_construct(**branch["resources"])  # checked at launch
                with _outside_this_job():
                    submit_group(
                        spec["sweep"],
                        [(run_dir, resources)],
                        Path(spec["folder"]),
                        Path(spec["code"]),
                        run_job,
                    )
                submitted.append(branch["run_id"])
    return submitted


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
