"""Where a run's results come from: the code's git revision and the versions of what it ran on."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch

import nepa_scale
from nepa_scale.config import RunConfig, dump_yaml
from nepa_scale.data.resize import MANIFEST as RESIZE_MANIFEST
from nepa_scale.data.resize import resized_copy_settings
from nepa_scale.data.shards import MANIFEST as SHARDS_MANIFEST
from nepa_scale.engine.checkpoint import ResumePlan
from nepa_scale.engine.fingerprint import resume_digest
from nepa_scale.rundir import Restart, RunDir, now


def git_revision() -> str | None:
    """The commit of the checkout this package was imported from (None outside a git checkout)."""
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--verify", "-q", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    import deepspeed  # heavy: the launcher reads this module (git_revision) without DeepSpeed
    import timm  # heavy, likewise

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "timm": timm.__version__,
        "nepa_scale": nepa_scale.__version__,
        "cuda": torch.version.cuda or "",
    }


def package_dir() -> str:
    """The nepa_scale package this process imported (a launched job's is the code snapshot)."""
    return str(Path(__file__).resolve().parents[1])


def record_start(
    run: RunDir,
    config: RunConfig,
    plan: ResumePlan | None,
    start_step: int,
    probe_subsets: dict | None,
    **facts,
) -> None:
    """Rank 0, as an attempt of a run starts: its config.yaml; in run.json the restart (or, for a
    cooldown branch, where it left its trunk, with the trunk's log up to there) and this attempt's
    facts: the versions and code it ran, and ``facts`` (world, precision, step settings, size)."""
    run.root.mkdir(parents=True, exist_ok=True)
    run.config_yaml.write_text(dump_yaml(config))
    restart, branch = None, None
    if plan is not None and plan.branch:  # a fresh start from the trunk: its log up to here
        copied = run.copy_metrics_from(RunDir(config.branch.parent), start_step)
        branch = {
            "parent": config.branch.parent,
            "step": start_step,
            "checkpoint": str(plan.source.path),
            "copied_metric_lines": copied,
        }
    elif plan is not None:
        record = run.record()  # the probe's images were checked against it when the resume was planned
        dropped = run.truncate_metrics(start_step, len(record.restarts))
        restart = Restart(
            from_step=start_step,
            world_size=facts["world_size"],
            time=now(),
            unix_time=time.time(),
            discarded_metric_lines=dropped,
            changes=plan.changes,
        )
    else:
        run.truncate_metrics(0, 0)
    fresh = {} if restart is not None else {"branch": branch}  # a resume keeps the record's
    data = config.data
    copy = {"imagefolder": RESIZE_MANIFEST, "shards": SHARDS_MANIFEST}.get(data.kind)
    run.started(
        restart,
        **fresh,
        config=config.to_dict(),
        resume_digest=resume_digest(config),
        versions=package_versions(),
        git_revision=git_revision(),
        code=package_dir(),
        data_resized=resized_copy_settings(data.root, data.train_split, copy) if copy else None,
        probe_subsets=probe_subsets,
        **facts,
    )
