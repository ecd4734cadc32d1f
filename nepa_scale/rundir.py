"""The run directory: the one contract between the engine, the launcher and the analysis.

    <run>/run.json          resolved config, versions, git revision, world size, restarts, status
    <run>/metrics.jsonl     one JSON object per log interval (rank 0), schema below
    <run>/config.yaml       the resolved config as YAML (what `nepa-scale train` can be re-run with)
    <run>/checkpoints/step_XXXXXXXX/   DeepSpeed checkpoint + rng_rank*.pt + COMMITTED (written last)
    <run>/export/           consolidated weights (ours and the official layout)
    <run>/logs/             per-rank logs, discarded metrics of work redone after a restart
    <run>/launch.json       written by the launcher: executor, last job id, submitit folder, code
                            snapshot, resources, every submission (nepa_scale/launch/launcher.py)

Status values: created, running, preempted, completed, failed.
run.json also lists ``restarts`` (each resume: from_step, world size) and, for launched runs,
``interruptions`` (signal, preemption | timeout | termination, action) and ``timeouts``;
``data_resized`` names the copy, its source and short side when the images come from
``nepa-scale resize-data`` (else null).
metrics.jsonl keys: step, images_seen, flops_seen, flop_convention, loss, target_spread, lr,
grad_norm, img_per_s, tflops_per_s, mfu, max_memory_gb, data_wait_frac, collapsed, time, and
val_loss on evaluation lines (kind = "train" | "eval").
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
STATUSES = ("created", "running", "preempted", "completed", "failed")
REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "saved, please run me again"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=False, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def config_yaml(self) -> Path:
        return self.root / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def launch_json(self) -> Path:
        return self.root / "launch.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def read_run(self) -> dict[str, Any]:
        if not self.run_json.is_file():
            return {}
        return json.loads(self.run_json.read_text())

    def update_run(self, **fields: Any) -> dict[str, Any]:
        data = self.read_run()
        data.update(fields)
        data["schema_version"] = SCHEMA_VERSION
        data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json_atomic(self.run_json, data)
        return data

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.is_file():
            return []
        records = []
        for line in self.metrics.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a kill mid-write
        return records

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()

    def truncate_metrics(self, after_step: int, restart: int) -> int:
        """Drop records beyond ``after_step`` (work that will be redone); keep them under logs/."""
        records = self.read_metrics()
        keep = [r for r in records if r.get("step", 0) <= after_step]
        dropped = [r for r in records if r.get("step", 0) > after_step]
        if dropped:
            self.logs.mkdir(parents=True, exist_ok=True)
            with (self.logs / f"metrics_discarded_restart{restart}.jsonl").open("a") as handle:
                handle.writelines(json.dumps(r) + "\n" for r in dropped)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".metrics.")
            with os.fdopen(fd, "w") as handle:
                handle.writelines(json.dumps(r) + "\n" for r in keep)
            os.replace(tmp, self.metrics)
        return len(dropped)
