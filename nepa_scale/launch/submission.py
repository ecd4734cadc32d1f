"""What submitting a run leaves behind.

Each run directory gets ``config.yaml`` (what the job trains) and ``launch.json`` (executor, job
ids, submitit folder, code snapshot, resources, every submission) at submission; the engine owns
``run.json``. Jobs run a snapshot of the code taken at submission (``snapshot_code``), so that
queued and requeued jobs run the code they were submitted with. Whoever submits holds the run's
lock meanwhile (``nepa_scale/ownership.py``; the launcher and a trunk's job take it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import submitit

import nepa_scale
from nepa_scale.config import dump_yaml
from nepa_scale.engine.fingerprint import resume_digest
from nepa_scale.engine.provenance import git_revision
from nepa_scale.launch.executors import scheduler
from nepa_scale.launch.profiles import ClusterProfile
from nepa_scale.launch.sweep import PlannedRun
from nepa_scale.rundir import RunDir, write_json_atomic

log = logging.getLogger("nepa_scale.launch")


def snapshot_code(root: Path) -> Path:
    """Copy the nepa_scale package into ``root/.code/<content hash>/`` (once per distinct code)."""
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


def prepare(run: PlannedRun) -> None:
    """The run directory before its job: config.yaml, and run.json (created, or failed for an
    invalid config, which never gets a job)."""
    rd = RunDir(run.run_dir)
    rd.root.mkdir(parents=True, exist_ok=True)
    if run.error:
        rd.invalid(run.config_data, run.error)
        return
    rd.config_yaml.write_text(dump_yaml(run.config))
    if not rd.run_json.is_file():
        rd.created(run.config, resume_digest(run.config))


def read_launch(run: RunDir) -> dict:
    """launch.json ({} for a run never submitted)."""
    path = run.launch_json
    return json.loads(path.read_text()) if path.is_file() else {}


def record_submission(
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
            "resources": resources.model_dump(),
            "jobs": [*previous.get("jobs", []), entry],
        },
    )


def submit_group(
    sweep_name: str,
    runs: list[tuple[Path, ClusterProfile]],
    folder: Path,
    code_dir: Path,
    job_for: Callable[[Path, ClusterProfile], object],
) -> list[submitit.Job]:
    """Submit runs that share their resources (one job each, or a job array where the scheduler
    makes one) and record each submission; ``job_for`` makes the callable a run's job runs."""
    profile = runs[0][1]
    name = f"nepa:{sweep_name}" if len(runs) > 1 else f"nepa:{sweep_name}:{runs[0][0].name}"
    chosen = scheduler(profile.executor)
    executor = chosen.executor(profile, folder, code_dir, name)
    jobs = chosen.submit(executor, [job_for(run_dir, r) for run_dir, r in runs])
    for (run_dir, resources), job in zip(runs, jobs, strict=True):
        where = Path(str(folder).replace("%j", str(job.job_id)))
        record_submission(run_dir, resources, job, where, code_dir)
        log.info("submitted %s as %s job %s", run_dir.name, resources.executor, job.job_id)
    return jobs
