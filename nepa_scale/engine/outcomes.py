"""How an attempt of a run ends, recorded in run.json: completed, preempted or stopped by a user (a
``TrainResult``), interrupted by a lost rank (resumed from the last committed checkpoint), stopped
by a full disk, or failed."""

from __future__ import annotations

import errno
import gc
import logging
import shutil
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nepa_scale.config import RunConfig
from nepa_scale.engine.checkpoint_store import committed_checkpoints, remove_uncommitted
from nepa_scale.engine.distributed import World, barrier, init_world, is_peer_loss, world_from_env
from nepa_scale.engine.preemption import PreemptionFlag
from nepa_scale.errors import PeerLost, RunBusy, StorageError
from nepa_scale.rundir import REQUEUE_EXIT_CODE, STOPPED_EXIT_CODE, Interruption, RunDir, now

log = logging.getLogger("nepa_scale.train")


@dataclass
class TrainResult:
    status: str  # completed | preempted | stopped (Ctrl-C)
    step: int  # the step the run stopped at (saved there when it trained any step)
    total_steps: int
    exit_code: int
    start_step: int = 0  # the step this attempt started (resumed) from

    @property
    def steps_done(self) -> int:
        return self.step - self.start_step


def join_world(config: RunConfig) -> World:
    """The run's process group; a rank that never came to the rendezvous (its node died at
    start-up) is a lost peer, recorded as such."""
    try:
        return init_world(config.distributed.timeout_s)
    except Exception as exc:
        rank, _, world_size = world_from_env()
        if world_size > 1 and is_peer_loss(exc):
            run = RunDir(config.output_dir)
            record = run.record()
            attempt = f"start{len(record.restarts)}_{len(record.interruptions)}"
            raise peer_lost(run, config, exc, rank, attempt, None, 0) from exc
        raise


def owner_agreed(world: World, group, refusal: RunBusy | None, output_dir: str) -> None:
    """Every rank learns whether rank 0 holds the run's lock (a collective on the CPU ``group``),
    and all stop, writing nothing, when it was refused: rank 0 with the refusal naming the owner."""
    refused = refusal is not None
    if world.world_size > 1:
        flag = torch.tensor([1.0 if refused else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        refused = bool(flag.item() > 0)
    if refusal is not None:
        raise refusal
    if refused:
        raise RunBusy(f"{output_dir}: in use by another process (rank 0 was refused the run's lock)")


def stopped(
    run: RunDir,
    world: World,
    config: RunConfig,
    preempt: PreemptionFlag,
    step: int,
    start_step: int,
    total_steps: int,
) -> TrainResult:
    """Preempted at ``step`` (saved there, unless no step was trained): exit for a requeue; or,
    on Ctrl-C (SIGINT), stopped by the user: saved the same way, resumable, exit 130."""
    by = preempt.received.name if preempt.received else "peer rank"
    stopped = preempt.received == signal.SIGINT
    saved = "checkpoint committed" if step > start_step else "no step trained, nothing to save"
    if world.is_main and stopped:
        run.stopped(step, config.budget.global_batch, by)
        log.info(
            "stopped (Ctrl-C) at step %d of %d: %s; the same command resumes it",
            step,
            total_steps,
            saved,
        )
    elif world.is_main:
        run.preempted(step, config.budget.global_batch, by)
        log.info(
            "preempted (%s) at step %d: %s, exiting with %d for requeue",
            by,
            step,
            saved,
            REQUEUE_EXIT_CODE,
        )
    barrier()
    if stopped:
        return TrainResult("stopped", step, total_steps, STOPPED_EXIT_CODE, start_step)
    return TrainResult("preempted", step, total_steps, REQUEUE_EXIT_CODE, start_step)


def failure(
    exc: BaseException,
    run: RunDir,
    world: World,
    config: RunConfig,
    checkpoint_bytes: Callable[[], int],
    step: int | None,
    start_step: int,
) -> BaseException:
    """What ``exc``, raised at ``step`` (None: while the engine was built), means for the run,
    recorded: a full disk (one line naming the folder), another rank lost (an interruption, resumed
    from the last committed checkpoint), or a failure. ``checkpoint_bytes`` is asked only when ``exc``
    may be a full disk."""
    full = disk_full(exc, run.root, checkpoint_bytes)
    if full is not None:
        close_unwound_files(exc)  # the failed save's file, still open, would keep its room taken
        if world.is_main:  # the half-written checkpoint goes now (the next start would remove it):
            remove_uncommitted(run.checkpoints)  # its room is what run.json needs to say why
        return _record_failure(run, world, full, step)
    if world.world_size > 1 and is_peer_loss(exc):  # another rank is gone, not this one's error
        attempt = f"attempt{len(run.record().restarts)}_from_step{start_step}"
        steps_done = 0 if step is None else step - start_step
        return peer_lost(run, config, exc, world.rank, attempt, step, steps_done)
    return _record_failure(run, world, exc, getattr(exc, "step", None) or step)


def close_unwound_files(exc: BaseException) -> None:
    """Drop the locals of the frames ``exc`` (and the errors it came from) unwound through, and
    collect them: a save that failed mid-write leaves its file open there (torch.save's writer), and
    a deleted file's blocks are freed only when it is closed."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        traceback.clear_frames(seen.__traceback__)  # frames still running are left as they are
        seen = seen.__cause__ or seen.__context__
    gc.collect()


def _record_failure(run: RunDir, world: World, exc: BaseException, step: int | None) -> BaseException:
    """Record ``exc`` as the run's failure where that is still possible (a full disk or a read-only
    folder may refuse run.json: then the log says it, and ``exc``, not the write's error, surfaces)."""
    if world.is_main:
        try:
            run.failed(f"{type(exc).__name__}: {exc}", step=step)
        except OSError as write_error:
            log.error("could not record the failure in %s: %s", run.run_json, write_error)
            if isinstance(exc, StorageError):  # the one line the user reads says it, not only the log
                return StorageError(
                    f"{exc} (run.json could not be rewritten for want of room either: the status it "
                    "shows is stale until the run starts again)"
                )
    return exc


def peer_lost(
    run: RunDir,
    config: RunConfig,
    exc: BaseException,
    rank: int,
    attempt: str,
    step: int | None,
    steps_done: int,
) -> PeerLost:
    """A collective (or the rendezvous) failed because another rank is gone. The first surviving rank
    to claim it (any rank may survive: rank 0 may be the lost one) records the run interrupted at its
    last committed checkpoint; every survivor stops with ``PeerLost``. ``attempt`` names this attempt
    of the run (one claim each); ``step``: where it failed, None before training."""
    committed = committed_checkpoints(run.checkpoints)
    resume_step = committed[-1].step if committed else (config.branch.step or 0)
    run.logs.mkdir(parents=True, exist_ok=True)
    try:
        with open(run.logs / f".peer_lost_{attempt}", "x"):
            pass
        recorded = True
    except FileExistsError:
        recorded = False
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    when = "while the ranks met" if step is None else f"at step {step}"
    message = (
        f"rank {rank}: another rank of the run is gone ({type(exc).__name__}: {reason}) {when}; the run "
        f"resumes from {'its checkpoint of step ' + str(resume_step) if resume_step else 'the start'}"
    )
    if recorded:
        event = Interruption(
            signal="peer lost",
            kind="peer_lost",
            action="resume",
            step=resume_step,
            time=now(),
            signal_unix_time=time.time(),
            steps_done=steps_done,
        )
        run.peer_lost(event, message)
    log.error("%s", message)
    return PeerLost(message, resume_step, recorded)


def disk_full(exc: BaseException, root, bytes_needed: Callable[[], int]) -> StorageError | None:
    """A StorageError naming the run's directory when ``exc`` came from its device running out of
    room: an OSError with ENOSPC or EDQUOT anywhere in its chain, or an I/O error (torch.save's
    says only "file write failed" or "unexpected pos") while less than ``bytes_needed()`` are free."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    full = any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain)
    if not full and not any(isinstance(e, OSError | RuntimeError) for e in chain):
        return None  # not an I/O error: no need to look at the disk
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return None
    needed = bytes_needed()
    if not full and free >= needed:
        return None
    return StorageError(
        f"no space left on the device of {root}: {free / 1e6:.1f} MB free, a checkpoint of this run needs "
        f"about {needed / 1e6:.1f} MB; free space (or move output_dir) and run again: it resumes from its "
        "newest committed checkpoint"
    )
