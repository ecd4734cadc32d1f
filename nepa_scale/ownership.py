"""One writer per directory: a lock file that names its owner, and a safe takeover from a dead one.

A run directory (and, for a closed advise/launch loop, a study's output root) has one owner at a
time, on one machine and across the nodes of a shared file system. The owner holds
``<directory>/.owner.json``, created exclusively (a hard link of a finished temporary file, so the
lock never exists half-written, and ``link`` is exclusive on NFS too). It holds the owner's facts
as JSON (``Owner``): what it is (``role``: train, launch, ...), host, pid, the process's start
time (``/proc``: a reused pid is another process), the boot and pid namespace it runs in, the
SLURM job, array task and restart count when under SLURM, when it took the lock, and a token of
its own.

A second process is refused (``RunBusy``, one line naming the owner) unless the owner is
provably gone:

- same host, boot and pid namespace: its pid has ended, or now belongs to another process (start
  time differs); a machine rebooted since (another boot id) runs none of its old processes;
- the same SLURM job, a later incarnation (its restart count is higher): a requeued job, after a
  preemption or a node failure, takes over its own earlier lock, wherever it runs now;
- a SLURM job that SLURM no longer lists (``squeue``: neither pending, running nor requeued).

An owner on another host and outside SLURM cannot be checked from here: it is respected, and the
message says which file to remove once it is known to be gone. Owners whose role holds a lock only
for seconds (``BRIEF_ROLES``: a launcher checking and submitting a run) are waited for.

Takeover is race-safe: a successor first creates ``.owner.json.takeover-<stale token>-<n>``
exclusively (one of any number of successors wins it), checks that the lock still holds that
token, and only then replaces the lock with its own (an atomic rename). A successor that died
holding the guard is itself judged by the same rules, and the next one uses ``n + 1``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from nepa_scale.errors import RunBusy, UsageError

log = logging.getLogger(__name__)

LOCK_FILE = ".owner.json"
GUARD_INFIX = ".takeover-"
# Roles that hold a lock only while they check and submit (seconds): others wait this long for them.
BRIEF_ROLES = {"launch": 60.0}
POLL_S = 0.2
# squeue's view of a job that may still run or run again (SLURM's names; squeue lists no ended job by default).
SLURM_LIVE_STATES = {
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
    "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "STOPPED",
}  # fmt: skip


# ----------------------------------------------------------------------------- facts


@dataclass(frozen=True)
class Owner:
    """The facts ``.owner.json`` holds (its JSON fields)."""

    role: str  # train | launch | ...: what holds it
    host: str
    pid: int
    process_start: int | None  # /proc/PID/stat starttime (clock ticks since boot): tells a reused pid
    boot_id: str | None  # /proc/sys/kernel/random/boot_id: pids of another boot are gone
    created: str  # when it took the lock (local time, ISO 8601)
    created_unix: float
    token: str  # this lock's own id (a takeover names the one it replaces)
    slurm_job: str | None = None  # as squeue names it: JOBID, or ARRAYJOB_TASK for an array task
    slurm_job_id: str | None = None  # SLURM_JOB_ID (unique per array task, kept over requeues)
    slurm_restart: int = 0  # SLURM_RESTART_COUNT: which incarnation of the job
    pid_namespace: str | None = None  # /proc/self/ns/pid: pids mean the same only within one (containers)

    @classmethod
    def from_dict(cls, data: dict) -> Owner:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def describe(self) -> str:
        """'train, pid 4242 on host node1, SLURM job 17 (restart 1), since 2026-12-08T10:00:01+0000'."""
        job = ""
        if self.slurm_job:
            job = f", SLURM job {self.slurm_job}" + (
                f" (restart {self.slurm_restart})" if self.slurm_restart else ""
            )
        return f"{self.role}, pid {self.pid} on host {self.host}{job}, since {self.created}"


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (None: no such process, or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name in () may hold spaces


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def this_process(role: str) -> Owner:
    """This process's facts, as the owner of a lock taken now."""
    env = os.environ
    job_id = env.get("SLURM_JOB_ID")
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    return Owner(
        role=role,
        host=socket.gethostname(),
        pid=os.getpid(),
        process_start=process_start(os.getpid()),
        boot_id=boot_id(),
        pid_namespace=pid_namespace(),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        created_unix=time.time(),
        token=uuid.uuid4().hex,
        slurm_job=f"{array_job}_{array_task}" if array_job and array_task else job_id,
        slurm_job_id=job_id,
        slurm_restart=int(env.get("SLURM_RESTART_COUNT") or 0),
    )


# ----------------------------------------------------------------------------- SLURM's view


def squeue_states(job_ids: list[str]) -> dict[str, str] | None:
    """Each listed job's state as squeue shows it (``-r``: array tasks one per line, pending ones
    too); a job it does not list has ended (or never existed). None: SLURM cannot be asked here."""
    try:
        done = subprocess.run(
            ["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i %T"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode and "Invalid job id" not in done.stderr:  # the controller did not answer
        return None
    states = {}
    for line in done.stdout.splitlines():
        job, state = line.split()[:2]
        states[job] = state
    return states


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """Each job's state: squeue for live jobs, then sacct (accounting) for the rest; a job neither
    knows is left out."""
    if not job_ids:
        return {}
    states = squeue_states(job_ids) or {}
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


def slurm_job_live(job: str) -> bool | None:
    """Whether SLURM still runs the job or will run it again (pending, requeued); None: cannot ask."""
    states = squeue_states([job])
    if states is None:
        return None
    return states.get(job) in SLURM_LIVE_STATES


# ----------------------------------------------------------------------------- the rules


def why_gone(owner: Owner, me: Owner) -> str | None:
    """Why ``owner`` provably no longer holds its lock; None while it may (the module's rules)."""
    if (
        owner.slurm_job_id
        and owner.slurm_job_id == me.slurm_job_id
        and me.slurm_restart > owner.slurm_restart
    ):
        return f"SLURM job {owner.slurm_job} was requeued (this is its restart {me.slurm_restart})"
    same_pids = owner.pid_namespace == me.pid_namespace
    if owner.host == me.host and owner.boot_id and owner.boot_id == me.boot_id and same_pids:
        start = process_start(owner.pid)
        if start is None:
            return f"pid {owner.pid} has ended"
        if owner.process_start is not None and start != owner.process_start:
            return f"pid {owner.pid} is another process now"
        return None
    if owner.host == me.host and owner.boot_id and me.boot_id and owner.boot_id != me.boot_id:
        return f"host {owner.host} has restarted since"
    if owner.slurm_job and slurm_job_live(owner.slurm_job) is False:
        return f"SLURM job {owner.slurm_job} no longer runs"
    return None


def checkable(owner: Owner, me: Owner) -> bool:
    """Whether this process can tell when ``owner`` is gone (its pids, or a job SLURM answers for)."""
    same_pids = owner.host == me.host and owner.pid_namespace == me.pid_namespace
    return same_pids or (bool(owner.slurm_job) and slurm_job_live(owner.slurm_job) is not None)


def busy_message(directory: Path, owner: Owner, me: Owner) -> str:
    line = f"{directory}: in use by another process ({owner.describe()})"
    if not checkable(owner, me):
        return line + f"; it cannot be checked from here: remove {directory / LOCK_FILE} once it is gone"
    return line + "; wait for it to end, or stop it"


# ----------------------------------------------------------------------------- the lock


def read_owner(directory: str | Path) -> Owner | None:
    """The directory's owner (None: nobody holds it)."""
    return _read(Path(directory) / LOCK_FILE)


def _read(path: Path) -> Owner | None:
    try:
        return Owner.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        raise RunBusy(
            f"{path}: a lock that cannot be read ({exc}): remove it once nothing uses its folder"
        ) from None


def _staged(path: Path, owner: Owner) -> Path:
    """The owner's facts in a finished temporary file beside ``path`` (linked or renamed into place)."""
    staging = path.with_name(f"{path.name}.{owner.token}.tmp")
    with open(staging, "w") as handle:
        json.dump(asdict(owner), handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    return staging


def _link(source: Path, target: Path) -> bool:
    """Create ``target`` as ``source``, exclusively: False when it exists."""
    try:
        os.link(source, target)
        return True
    except FileExistsError:
        return False


class Ownership:
    """A held lock; ``release`` (or leaving the ``with`` block) gives it up."""

    def __init__(self, directory: Path, owner: Owner):
        self.directory, self.owner = directory, owner
        self.path = directory / LOCK_FILE

    def release(self) -> None:
        """Remove the lock if it is still this owner's (idempotent)."""
        try:
            held = _read(self.path)
        except RunBusy:
            return
        if held is not None and held.token == self.owner.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> Ownership:
        return self

    def __exit__(self, *_exc) -> None:
        self.release()


def _take_over(path: Path, stale: Owner, me: Owner, staging: Path) -> bool:
    """Replace the lock of ``stale`` (judged gone) by ``me``; False when another successor is at
    it or was quicker (the caller reads the lock again)."""
    for n in range(100):
        guard = path.with_name(f"{path.name}{GUARD_INFIX}{stale.token}-{n}")
        if _link(staging, guard):
            break
        holder = _read(guard)
        if holder is not None and why_gone(holder, me) is None:
            return False  # a live successor holds it
    else:
        return False
    try:
        current = _read(path)
        if current is None or current.token != stale.token:
            return False  # replaced or released meanwhile: decide again
        os.replace(staging, path)  # only this guard's holder may replace a lock of this token
        return True
    finally:
        guard.unlink(missing_ok=True)


def acquire(directory: str | Path, role: str, patience_s: float | None = None) -> Ownership:
    """Take ``directory``'s lock as ``role``; ``RunBusy`` (one line naming the owner) while another
    process holds it. An owner in ``BRIEF_ROLES`` is waited for up to its time, or ``patience_s``."""
    directory = Path(directory)
    path = directory / LOCK_FILE
    me = this_process(role)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        staging = _staged(path, me)
    except OSError as exc:  # a plain file in the way, a read-only or full file system
        raise UsageError(f"{directory}: cannot be written ({exc.strerror}: {exc.filename})") from None
    deadline = None
    try:
        while True:
            if _link(staging, path):
                return Ownership(directory, me)
            owner = _read(path)
            if owner is None:
                continue  # released between the two calls
            gone = why_gone(owner, me)
            if gone is not None:
                if _take_over(path, owner, me, staging):
                    log.warning("%s: took over the lock of %s: %s", directory, owner.describe(), gone)
                    return Ownership(directory, me)
                time.sleep(POLL_S)
                continue
            wait = patience_s if patience_s is not None else BRIEF_ROLES.get(owner.role, 0.0)
            deadline = deadline or time.time() + wait
            if time.time() >= deadline:
                raise RunBusy(busy_message(directory, owner, me))
            time.sleep(POLL_S)
    finally:
        staging.unlink(missing_ok=True)


@dataclass
class Claim:
    """What one rank of a multi-process writer holds: rank 0 the lock (or the refusal), the others
    nothing (they learn rank 0's outcome from it)."""

    ownership: Ownership | None = None
    refusal: RunBusy | None = None

    def release(self) -> None:
        if self.ownership is not None:
            self.ownership.release()


def claim(directory: str | Path, role: str, rank: int) -> Claim:
    """Rank 0 takes the lock; a refusal is kept (raised once every rank knows it)."""
    if rank != 0:
        return Claim()
    try:
        return Claim(acquire(directory, role))
    except RunBusy as exc:
        return Claim(refusal=exc)
