"""The run directory: the one contract between the engine, the launcher and the analysis.

    <run>/run.json          the run record (``RunRecord`` below: the schema, documented once)
    <run>/metrics.jsonl     one JSON object per log interval or evaluation (rank 0), keys below
    <run>/config.yaml       the resolved config as YAML (what `nepa-scale train` can be re-run with)
    <run>/checkpoints/step_XXXXXXXX/   DeepSpeed checkpoint + rng_rank*.pt + COMMITTED (written last)
    <run>/export/           consolidated weights (ours and the official layout)
    <run>/logs/             metrics of work redone after a restart (``metrics_discarded_restart*.jsonl``)
    <run>/launch.json       written by the launcher: executor, last job id, submitit folder, code
                            snapshot, resources, every submission (nepa_scale/launch/launcher.py)
    <run>/.owner.json       the lock of the one process writing the run now (nepa_scale/ownership.py)

This module is the only code that reads or writes run.json. Engine and launcher change it through
named transitions (``RunDir.created``, ``started``, ``preempted``, ``completed``, ``failed``,
``interrupted``, ...), each a read-modify-write of the whole record through an atomic rename.

metrics.jsonl keys: kind ("train" | "eval"), step, images_seen, flops_seen, flop_convention, loss,
target_spread, lr, grad_norm, img_per_s, tflops_per_s, mfu, max_memory_gb, data_wait_frac,
collapsed, time on train lines. One eval line per evaluated step: pretraining's val_loss and the
label-free diagnostics (val_target_spread, val_loss_mean_target, val_loss_copy_last,
val_gap_closed, rankme_features / rankme_targets and erank_*: nepa_scale/eval/diagnostics.py), the
online probes (probe_linear_acc / _error / _nll / _wd, probe_knn_acc / _error, probe_train_images,
probe_val_images, probe_weights, probe_causal: nepa_scale/eval/probes.py); val_acc / val_acc_ema
(fine-tuning); val_miou (segmentation).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from nepa_scale.config import RunConfig, config_from_dict
from nepa_scale.config.files import drop_retired
from nepa_scale.errors import ConfigError, RunRecordError, UsageError

MARKER = "COMMITTED"  # written last into a checkpoint directory: from then on it counts
PREFIX = "step_"
SCHEMA_VERSION = 2  # 2: typed record, resume_digest (1 called it config_hash), steps_done on interruptions
# interrupted: stopped without saving (a peer rank was lost); it resumes from its last committed checkpoint.
# stopped: a user stopped it (Ctrl-C); saved like a preempted run, and resumable the same way.
STATUSES = ("created", "running", "preempted", "interrupted", "stopped", "completed", "failed")
REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "saved, please run me again"
STOPPED_EXIT_CODE = 130  # 128 + SIGINT: what a shell reports for a command stopped with Ctrl-C


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace_atomically(path: Path, write) -> None:
    """Write through ``write(handle)`` into a temporary file beside ``path``, fsync, rename over it.

    The file gets the mode a plain ``open`` would give (0666 less the umask): ``mkstemp`` alone
    makes it 0600, which colleagues on a shared file system cannot read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def follow_umask(*paths: Path) -> None:
    """Give files the mode a plain ``open`` would (0666 less the umask): writers that use mkstemp,
    safetensors among them, make them 0600, which colleagues on a shared file system cannot read."""
    for path in paths:
        os.chmod(path, 0o666 & ~_umask())


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file in the same directory, fsync, then rename over the target."""
    _replace_atomically(path, lambda handle: json.dump(data, handle, indent=2, default=str))


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def tag_for(step: int) -> str:
    """The checkpoint directory name of ``step``."""
    return f"{PREFIX}{step:08d}"


def images_seen(step: int, global_batch: int) -> int:
    """Images a run has trained on after ``step`` optimizer steps (every step takes one global batch)."""
    return step * global_batch


# ----------------------------------------------------------------------------- the record


@dataclass
class Restart:
    """One resume from a committed checkpoint."""

    from_step: int
    world_size: int = 1
    time: str = ""
    unix_time: float | None = None
    discarded_metric_lines: int = 0  # metrics logged past the checkpoint (moved to logs/)
    changes: list[str] = field(default_factory=list)  # settings changed on purpose (e.g. the budget)


@dataclass
class Interruption:
    """A signal that stopped a launched job (recorded by the job's rank 0 after the save)."""

    signal: str  # SIGUSR2 | SIGTERM | peer rank | peer lost
    kind: str  # preemption | timeout | termination | peer_lost (another rank died: nothing saved)
    action: str  # requeue | exit | give_up
    step: int  # the step the run stopped (and saved) at; peer_lost: its last committed checkpoint's
    job_id: str = ""
    time: str = ""
    signal_unix_time: float | None = None
    steps_done: int | None = None  # steps this attempt trained (0: the notice came during start-up)


@dataclass
class RunRecord:
    """run.json. Unknown keys (from newer code) are kept in ``extra`` and written back unchanged."""

    status: str | None = None  # one of STATUSES; None: no run.json yet
    config: dict[str, Any] | None = None  # the resolved config (RunConfig.to_dict())
    resume_digest: str | None = None  # engine.fingerprint.resume_digest: what a checkpoint cannot survive
    # Facts of the latest start (written by the engine when training starts or resumes).
    versions: dict[str, str] = field(default_factory=dict)
    git_revision: str | None = None
    code: str | None = None  # the nepa_scale package the run imported
    world_size: int | None = None
    precision: str | None = None  # fp32 | bf16
    attention_backend: str | None = None
    checkpointed_blocks: int | None = None
    micro_batch: int | None = None
    data_resized: dict[str, Any] | None = None  # the resize-data copy the images come from, if any
    total_steps: int | None = None
    steps_per_epoch: int | None = None
    # The probe's fixed images (logging.probe_*): seed, per-class counts, and per split the image and
    # class counts and a digest of the indices: equal digests, equal images across a study's runs.
    probe_subsets: dict[str, Any] | None = None
    flop_convention: str | None = None
    flops_per_image: float | None = None
    params: int | None = None
    # Progress.
    started: str | None = None
    finished: str | None = None
    updated: str | None = None
    step: int | None = None
    images_seen: int | None = None
    restarts: list[Restart] = field(default_factory=list)
    # A WSD cooldown branch: its trunk's run directory, the branch step and checkpoint it started from.
    branch: dict[str, Any] | None = None
    skipped_files: list[str] = field(default_factory=list)  # unreadable images, once per epoch seen
    preempted_by: str | None = None
    error: str | None = None  # the one-line reason of a failed run
    failed_at_step: int | None = None
    retried_failure: str | None = None  # the error a `sweep launch --retry-failed` continued past
    # Launched runs (nepa_scale/launch/job.py).
    interruptions: list[Interruption] = field(default_factory=list)
    timeouts: int = 0  # time-limit requeues, counted against the profile's max_requeues
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        """Any run.json this project has written (schema 1 and 2)."""
        data = dict(data)
        if "config_hash" in data and "resume_digest" not in data:
            data["resume_digest"] = data.pop("config_hash")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        known["restarts"] = [_typed(Restart, r) for r in known.get("restarts") or []]
        known["interruptions"] = [_typed(Interruption, e) for e in known.get("interruptions") or []]
        for key in ("versions", "skipped_files"):
            if known.get(key) is None:
                known.pop(key, None)
        known["timeouts"] = known.get("timeouts") or 0
        return cls(**known, extra={k: v for k, v in data.items() if k not in names and k != "config_hash"})

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out["restarts"] = [dataclasses.asdict(r) for r in self.restarts]
        out["interruptions"] = [dataclasses.asdict(e) for e in self.interruptions]
        return {**self.extra, **out}

    def run_config(self) -> RunConfig:
        """The run's config, checked for values only: reading a run back never looks for its data
        or its pretrained weights (they may live on another machine or be unmounted by now)."""
        if not isinstance(self.config, dict):
            raise ConfigError("run.json: no config recorded")
        return config_from_dict(drop_retired(self.config))

    @property
    def idle_timeouts(self) -> int:
        """Time-limit interruptions whose attempt trained no step (start-up took its time)."""
        return sum(event.kind == "timeout" and event.steps_done == 0 for event in self.interruptions)


def _set_fields(record: RunRecord, fields: dict[str, Any]) -> None:
    """Set RunRecord fields; a name that is not one is a bug, never a silently dropped value."""
    names = {f.name for f in dataclasses.fields(RunRecord)}
    for key, value in fields.items():
        if key not in names:
            raise TypeError(f"RunRecord has no field {key!r}")
        setattr(record, key, value)


def _typed(cls, data: Any):
    if isinstance(data, cls):
        return data
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(data).items() if k in names})


class MetricsLog(NamedTuple):
    """metrics.jsonl as read: its records, and the (1-based) numbers of lines that are not JSON
    objects, a last line still being written excepted."""

    records: list[dict[str, Any]]
    unreadable: list[int]


def _parsed(line: str | bytes) -> dict[str, Any] | None:
    """A metrics line's record; None for a line that is not a JSON object (cut or damaged)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


# ----------------------------------------------------------------------------- the directory


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

    # -- the record
    def record(self) -> RunRecord:
        """run.json as a typed record (an empty one, status None, when there is none yet)."""
        if not self.run_json.is_file():
            return RunRecord()
        try:
            return RunRecord.from_dict(json.loads(self.run_json.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise RunRecordError(f"{self.run_json}: cannot be read ({exc})") from None

    def write_record(self, record: RunRecord) -> RunRecord:
        record.schema_version = SCHEMA_VERSION
        record.updated = now()
        write_json_atomic(self.run_json, record.to_dict())
        return record

    def _change(self, **fields: Any) -> RunRecord:
        record = self.record()
        _set_fields(record, fields)
        return self.write_record(record)

    def config(self) -> RunConfig:
        """The run's recorded config (its values checked, never its files); a one-line error naming
        the folder when it holds no run."""
        if not self.root.exists():
            raise UsageError(f"{self.root}: no such run directory")
        if not self.run_json.is_file():
            raise UsageError(f"{self.root}: not a run directory (no run.json)")
        return self.record().run_config()

    # -- transitions (launcher)
    def created(self, config: RunConfig, resume_digest: str) -> RunRecord:
        """A launched run's directory is prepared (the job has not started)."""
        return self._change(status="created", config=config.to_dict(), resume_digest=resume_digest)

    def invalid(self, config_data: dict[str, Any], error: str) -> RunRecord:
        """A sweep run whose config is invalid: it fails without a job."""
        return self._change(status="failed", config=config_data, error=error)

    def retried(self) -> RunRecord:
        """``sweep launch --retry-failed`` continues a failed run from its checkpoint."""
        record = self.record()
        return self._change(status="created", error=None, retried_failure=record.error)

    def interrupted(self, event: Interruption, give_up_reason: str | None = None) -> RunRecord:
        """The job stopped on a signal and saved; a time-limit one counts against max_requeues."""
        record = self.record()
        record.interruptions.append(event)
        if event.kind == "timeout":
            record.timeouts += 1
        if give_up_reason:
            record.status, record.error = "failed", give_up_reason
        return self.write_record(record)

    # -- transitions (engine)
    def started(self, restart: Restart | None, **facts: Any) -> RunRecord:
        """Training starts (``restart`` None) or resumes; ``facts`` are RunRecord fields of this start."""
        record = self.record()
        _set_fields(record, facts)
        record.status, record.error, record.finished = "running", None, None
        record.started = record.started or now()
        if restart is None:
            record.restarts, record.skipped_files = [], []
        else:
            record.restarts.append(restart)
        return self.write_record(record)

    def skipped(self, paths: list[str]) -> RunRecord:
        """Files that could not be read, each listed once (a file is skipped again every epoch)."""
        record = self.record()
        known = set(record.skipped_files)
        record.skipped_files.extend(p for p in dict.fromkeys(paths) if p not in known)
        return self.write_record(record)

    def preempted(self, step: int, global_batch: int, by: str) -> RunRecord:
        return self._change(
            status="preempted", step=step, images_seen=images_seen(step, global_batch), preempted_by=by
        )

    def stopped(self, step: int, global_batch: int, by: str) -> RunRecord:
        return self._change(
            status="stopped", step=step, images_seen=images_seen(step, global_batch), preempted_by=by
        )

    def completed(self, step: int, global_batch: int) -> RunRecord:
        return self._change(
            status="completed", step=step, images_seen=images_seen(step, global_batch), finished=now()
        )

    def failed(self, error: str, step: int | None = None) -> RunRecord:
        return self._change(
            status="failed", error=error.splitlines()[0] if error else error, failed_at_step=step
        )

    def peer_lost(self, event: Interruption, error: str) -> RunRecord:
        """Another rank died: the run stops unsaved; it resumes from the checkpoint of ``event.step``."""
        record = self.record()
        record.interruptions.append(event)
        record.status, record.step, record.error = "interrupted", event.step, error
        return self.write_record(record)

    def has_committed(self, step: int) -> bool:
        """A committed checkpoint of ``step`` is there (e.g. a WSD trunk's branch point)."""
        return (self.checkpoints / tag_for(step) / MARKER).is_file()

    # -- metrics
    def read_metrics(self) -> list[dict[str, Any]]:
        return self.read_metrics_log().records

    def read_metrics_log(self) -> MetricsLog:
        """metrics.jsonl's records, and the numbers of the lines that are not JSON objects. A last line
        without its newline is a line being written (or cut by a kill mid-write): left out, not
        counted; any other such line is damage a reader of the run should be told about."""
        records, unreadable = [], []
        for number, _, record in self._metrics_lines():
            if record is not None:
                records.append(record)
            elif number > 0:
                unreadable.append(number)
        return MetricsLog(records, unreadable)

    def _metrics_lines(self) -> list[tuple[int, str, dict[str, Any] | None]]:
        """(line number, line, its record or None) of each non-empty line of metrics.jsonl; a last
        line still being written (no newline yet) has number 0."""
        text = self.metrics.read_text(errors="replace") if self.metrics.is_file() else ""
        lines = text.split("\n")  # the last: "" after a newline, else a line being written
        return [
            (0 if number == len(lines) else number, line, _parsed(line))
            for number, line in enumerate(lines, start=1)
            if line.strip()
        ]

    def last_metric(self, kind: str, block: int = 1 << 16) -> dict[str, Any] | None:
        """The last ``kind`` record of metrics.jsonl, read from the file's end: what a poll of a
        long run needs (its log grows by a line every log interval; ``read_metrics`` parses it all)."""
        if not self.metrics.is_file():
            return None
        with self.metrics.open("rb") as handle:
            end, tail = handle.seek(0, os.SEEK_END), b""
            while end > 0:
                start = max(0, end - block)
                handle.seek(start)
                tail = handle.read(end - start) + tail
                lines, end = tail.split(b"\n"), start
                tail = lines.pop(0) if start > 0 else b""  # may be cut at the block's start: read on
                for line in reversed(lines):
                    record = _parsed(line) if line.strip() else None  # None: a line cut mid-write
                    if record is not None and record.get("kind") == kind:
                        return record
        return None

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()

    def copy_metrics_from(self, parent: RunDir, up_to_step: int) -> int:
        """A branch's log starts as its trunk's up to the branch step (the same steps, computed once)."""
        lines = [r for r in parent.read_metrics() if r.get("step", 0) <= up_to_step]
        _replace_atomically(
            self.metrics, lambda handle: handle.writelines(json.dumps(r) + "\n" for r in lines)
        )
        return len(lines)

    def truncate_metrics(self, after_step: int, restart: int) -> int:
        """Drop records beyond ``after_step`` (work that will be redone; kept under logs/) and a last
        line cut mid-write (the next record would be glued to it). A line that is not JSON stays
        where it is: the analysis names it."""
        lines = self._metrics_lines()
        dropped = [r for number, _, r in lines if r is not None and r.get("step", 0) > after_step]
        keep = [
            line
            for number, line, r in lines
            if (r is None and number) or (r is not None and r.get("step", 0) <= after_step)
        ]
        if dropped:
            self.logs.mkdir(parents=True, exist_ok=True)
            with (self.logs / f"metrics_discarded_restart{restart}.jsonl").open("a") as handle:
                handle.writelines(json.dumps(r) + "\n" for r in dropped)
        if dropped or any(number == 0 for number, _, _ in lines):
            _replace_atomically(self.metrics, lambda handle: handle.writelines(line + "\n" for line in keep))
        return len(dropped)
