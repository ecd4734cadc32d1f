"""Atomic, verifiable DeepSpeed checkpoints, and the checkpointer that plans, saves and loads them.

A checkpoint is a directory committed last by its marker (``checkpoint_store``: the files, the
manifest, retention, the per-rank RNG files). Only committed checkpoints count. On start the newest
committed one is verified against its manifest and loaded; directories without the marker are
half-written leftovers of a kill and are removed. A committed checkpoint that fails verification
or loading is an error naming the file, or, with ``on_corrupt: previous``, a logged fallback to the
previous committed one: never a silent fresh start. Nothing in a checkpoint is unpickled beyond
tensors, plain values and DeepSpeed's few classes (``safe_load``): a file naming anything else is
refused, naming it, with no fallback (it was made, not damaged).

The ``Checkpointer`` owns the resume-compatibility rule (``resume_changes``): what a change of
config between a checkpoint and the run resuming from it does. Refused, with the key named: the
model's shape, the global batch, the data kind, the seed, the objective, the optimizer's settings
(DeepSpeed restores them from the checkpoint, so a change would be silently ignored), the ZeRO
stage and the precision (the optimizer state is laid out for them). Refused unless
``checkpoint.allow_budget_change`` is set: the run's length (the lr schedule is recomputed for the
new length from the step it resumes at). Converted, and logged: the world size, through DeepSpeed's
universal checkpoint (ZeRO 1-3). Every change made on purpose is recorded in run.json's restarts.

A WSD cooldown branch (``branch.parent``, ``branch.step``) without checkpoints of its own starts
from its trunk's committed checkpoint at the branch step: the same rule, its length excepted.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from nepa_scale.config import RunConfig
from nepa_scale.engine import safe_load
from nepa_scale.engine.checkpoint_store import (
    EMA_FILE,
    UNIVERSAL_SUFFIX,
    Committed,
    commit,
    committed_checkpoints,
    load_rng,
    read_marker,
    remove_uncommitted,
    retention,
    save_rng,
    set_rng_state,
    verify,
)
from nepa_scale.engine.distributed import World, barrier
from nepa_scale.engine.evaluator import check_probe_subsets_unchanged
from nepa_scale.engine.fingerprint import fingerprint_diff, resume_digest, resume_fingerprint
from nepa_scale.engine.settings import StepSettings
from nepa_scale.errors import CheckpointError, NepaError, ResumeRefused, UnsafePickle
from nepa_scale.models.zoo import count_params
from nepa_scale.rundir import MARKER, RunDir, follow_umask, images_seen, tag_for, write_json_atomic

if TYPE_CHECKING:
    from nepa_scale.engine.ema import Ema

log = logging.getLogger(__name__)

BEST_EMA_WEIGHTS, BEST_EMA_RECORD = "best_ema.safetensors", "best_ema.json"  # a fine-tune's kept-best EMA


def resume_changes(
    meta: dict[str, Any],
    config: RunConfig,
    settings: StepSettings,
    total_steps: int,
    world_size: int,
    recorded_total_steps: int | None = None,
    branch: bool = False,
) -> tuple[list[str], list[str]]:
    """(refused, changed) for resuming from a checkpoint with ``meta``: the rule in this module's
    docstring. Settings a checkpoint did not record (older code) are not compared, except the run's
    length, which run.json recorded (``recorded_total_steps``). ``branch``: a WSD cooldown branch
    starting from its trunk's checkpoint, whose length differs by design."""
    refused = fingerprint_diff(meta.get("fingerprint", {}), resume_fingerprint(config))
    stage = meta.get("zero_stage")
    if stage is not None and stage != config.deepspeed.zero_stage:
        refused.append(
            f"deepspeed.zero_stage: checkpoint {stage} -> config {config.deepspeed.zero_stage} "
            "(the optimizer state is partitioned for its stage)"
        )
    precision = meta.get("precision")
    if precision is not None and precision != settings.precision:
        refused.append(
            f"deepspeed.precision: checkpoint {precision} -> this run {settings.precision} "
            f"(deepspeed.precision={config.deepspeed.precision})"
        )
    changed = []
    planned = meta.get("total_steps", recorded_total_steps)
    if planned is not None and planned != total_steps:
        change = f"budget: checkpoint planned {planned} steps -> config {total_steps}"
        if branch:
            changed.append(f"cooldown branch: the trunk planned {planned} steps, this run {total_steps}")
        elif config.checkpoint.allow_budget_change:
            changed.append(f"{change} (checkpoint.allow_budget_change: the lr schedule is recomputed)")
        else:
            refused.append(
                f"{change} (the lr schedule would change mid-run; "
                "checkpoint.allow_budget_change=true continues with the new budget on purpose)"
            )
    if meta.get("world_size") not in (None, world_size):
        universal = " through a universal checkpoint" if config.deepspeed.zero_stage > 0 else ""
        changed.append(f"world size {meta['world_size']} -> {world_size}{universal}")
    step = meta.get("step")
    if not branch and step is not None and total_steps < step:
        refused.append(
            f"budget: the new length ({total_steps} steps) ends before step {step}, where the checkpoint is: "
            "a run cannot be shortened past the step it has reached (start a new run for a shorter budget)"
        )
    return refused, changed


@dataclass(frozen=True)
class ResumePlan:
    source: Committed
    load_dir: Path  # the checkpoint itself, or its universal conversion
    load_universal: bool
    changes: list[str]
    branch: bool = False  # the trunk's branch point, not one of this run's own checkpoints
    rank_state: dict[str, Any] | None = None  # this rank's RNG streams and saved state; None: none saved


class Checkpointer:
    """Plans the resume, saves and loads one run's checkpoints (every rank calls every method)."""

    def __init__(
        self, run: RunDir, config: RunConfig, world: World, settings: StepSettings, total_steps: int
    ):
        self.run, self.config, self.world = run, config, world
        self.settings, self.total_steps = settings, total_steps
        self.root = run.checkpoints

    def plan_resume(self, probe_subsets: dict | None = None) -> ResumePlan | None:
        """The newest committed checkpoint that verifies (or, with ``on_corrupt: previous``, the
        newest before it that does), checked against the resume rule and the probe's images
        (``probe_subsets``: what this start would probe, against run.json's record); for a cooldown
        branch without checkpoints of its own, its trunk's branch point; None for a fresh start.
        A refusal comes before anything is loaded or written."""
        if self.world.is_main:
            remove_uncommitted(self.root)
        barrier()
        committed = committed_checkpoints(self.root)
        if not committed and self.config.branch.parent is not None:
            return self._plan_branch()
        while committed:
            candidate = committed[-1]
            try:
                verify(candidate)
            except CheckpointError as exc:
                fallback = self.config.checkpoint.on_corrupt == "previous" and len(committed) > 1
                if isinstance(exc, UnsafePickle) or not fallback:  # a crafted file is never skipped
                    raise
                log.error(
                    "%s; falling back to the previous committed checkpoint (checkpoint.on_corrupt=previous)",
                    exc,
                )
                committed.pop()
                continue
            refused, changes = resume_changes(
                candidate.meta,
                self.config,
                self.settings,
                self.total_steps,
                self.world.world_size,
                self.run.record().total_steps,
            )
            if refused:
                raise ResumeRefused(
                    f"config changed in a way that breaks resume from {candidate.path}: " + "; ".join(refused)
                )
            check_probe_subsets_unchanged(self.run.record().probe_subsets, probe_subsets, self.config.data)
            changes += self.check_history(candidate.step)
            for change in changes:
                log.warning("resuming from %s with a change: %s", candidate.path, change)
            return self._plan(candidate, changes)
        if self.world.is_main and self.root.is_dir() and any(self.root.iterdir()):
            log.warning("no committed checkpoint in %s: starting from step 0", self.root)
        return None

    def checkpoint_bytes(self) -> int:
        """What one checkpoint of this run takes: the newest committed one's files, else an estimate
        (fp32 weights and two Adam moments per parameter, in every rank's share)."""
        committed = committed_checkpoints(self.root)
        if committed:
            return sum(p.stat().st_size for p in committed[-1].path.rglob("*") if p.is_file())
        return 12 * count_params(self.config.model.arch())["total"]

    def check_history(self, step: int) -> list[str]:
        """The run's log (metrics.jsonl) covers its steps up to ``step``, where it resumes: a run's
        history never silently goes missing. Refused (naming the file) when the file is gone or its
        start or end is missing, unless ``checkpoint.allow_lost_history``: then the loss is one of
        the resume's recorded changes."""
        every = self.config.logging.log_every
        logged = sorted(
            m["step"]
            for m in self.run.read_metrics()
            if m.get("kind") == "train" and m.get("step", 0) <= step
        )
        if step < every:
            return []
        if not logged:
            lost = f"{self.run.metrics} has no line of steps 1-{step}" + (
                "" if self.run.metrics.is_file() else " (the file is missing)"
            )
        elif logged[0] > every or logged[-1] < step - every:
            lost = f"{self.run.metrics} covers steps {logged[0]}-{logged[-1]} of the 1-{step} the checkpoint has trained"
        else:
            return []
        if not self.config.checkpoint.allow_lost_history:
            raise ResumeRefused(
                f"{lost}: the run's history before its checkpoint is lost. Restore the file, or resume "
                "without it with checkpoint.allow_lost_history=true (recorded in run.json)"
            )
        return [f"history lost: {lost} (checkpoint.allow_lost_history)"]

    def _plan(self, candidate: Committed, changes: list[str], branch: bool = False) -> ResumePlan:
        """Where to load from; this rank's RNG file is read here, so a bad one is refused before
        the engine is built."""
        universal = (
            self.config.deepspeed.zero_stage > 0
            and candidate.meta.get("world_size", self.world.world_size) != self.world.world_size
        )
        load_dir = self._to_universal(candidate) if universal else candidate.path
        rank_state = load_rng(candidate.path, self.world.rank)
        return ResumePlan(candidate, load_dir, universal, changes, branch, rank_state)

    def _plan_branch(self) -> ResumePlan:
        """A cooldown branch's first start: the trunk's committed checkpoint at the branch step."""
        branch = self.config.branch
        path = Path(branch.parent) / "checkpoints" / tag_for(branch.step)
        meta = read_marker(path)
        if meta is None:
            raise CheckpointError(
                f"branch point not committed: {path} (the trunk {branch.parent} has not saved step "
                f"{branch.step} yet; it submits this branch when it has)"
            )
        candidate = Committed(path, branch.step, meta)
        verify(candidate)
        refused, changes = resume_changes(
            meta, self.config, self.settings, self.total_steps, self.world.world_size, branch=True
        )
        if refused:
            raise ResumeRefused(f"this branch cannot start from its trunk's {path}: " + "; ".join(refused))
        log.info("cooldown branch: starting from the trunk's %s (step %d)", path, branch.step)
        return self._plan(candidate, changes, branch=True)

    def _to_universal(self, source: Committed) -> Path:
        """DeepSpeed's universal format of a ZeRO checkpoint (rank 0 converts once), for a new world size."""
        # heavy: DeepSpeed; the launcher and the analysis read checkpoints without it
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        target = source.path.with_name(source.tag + UNIVERSAL_SUFFIX)
        if self.world.is_main and not (target / MARKER).exists():
            log.info(
                "world size %d -> %d: converting %s to a universal checkpoint",
                source.meta["world_size"],
                self.world.world_size,
                source.path,
            )
            with safe_load.weights_only_loads(source.path):  # ds_to_universal reads with pickle's full power
                ds_to_universal(
                    argparse.Namespace(  # ds_to_universal's command-line arguments
                        input_folder=str(source.path),
                        output_folder=str(target),
                        num_extract_workers=1,
                        num_merge_workers=1,
                        keep_temp_folder=False,
                        strict=True,
                        inject_missing_state=True,
                    )
                )
            commit(target, {"source": source.tag})
        barrier()
        # A conversion found there (made by an earlier attempt) is verified like any checkpoint.
        verify(Committed(target, source.step, read_marker(target) or {}))
        return target

    def load(self, engine, plan: ResumePlan, ema: Ema | None) -> tuple[int, dict[str, Any]]:
        """Weights, optimizer, lr schedule, this rank's RNG streams and EMA; returns the step and
        this rank's other saved state (``save``'s ``rank_state``; empty without an RNG file)."""
        source = plan.source
        safe_load.install(engine)
        try:
            with safe_load.weights_only_loads(plan.load_dir):  # the universal loader bypasses the engine's
                path, _ = engine.load_checkpoint(
                    str(plan.load_dir.parent),
                    tag=plan.load_dir.name,
                    load_optimizer_states=True,
                    load_lr_scheduler_states=True,
                )
        except NepaError:
            raise
        except Exception as exc:
            raise CheckpointError(
                f"cannot load committed checkpoint {source.path}: {type(exc).__name__}: {exc}"
            ) from exc
        if path is None:
            raise CheckpointError(f"DeepSpeed found nothing to load in {source.path}")
        step = int(source.meta["step"])
        if plan.load_universal:
            # DeepSpeed restores the lr schedule only from its own client state: set it from the step.
            engine.lr_scheduler.last_epoch = step - 1
            engine.lr_scheduler.step()
        rank_state: dict[str, Any] = {}
        if plan.rank_state is not None:
            rank_state = plan.rank_state
            set_rng_state(rank_state)
        else:
            log.warning(
                "no RNG state for rank %d in %s (world size changed): fresh RNG streams",
                self.world.rank,
                source.path,
            )
            torch.manual_seed(self.config.seed * 1_000_003 + step)
        if ema is not None:
            ema_file = source.path / EMA_FILE
            if not ema_file.is_file():
                raise CheckpointError(f"checkpoint.ema_decay is set but {ema_file} is missing")
            ema.load_state_dict(safe_load.load(ema_file))
        log.info("resumed from %s (step %d)", source.path, step)
        return step, rank_state

    def save(self, engine, ema: Ema | None, step: int, reason: str, rank_state: dict[str, Any]) -> Path:
        """A committed checkpoint of ``step`` (collective). ``rank_state``: this rank's other state
        to restore exactly (saved beside its RNG streams)."""
        c, world = self.config, self.world
        tag = tag_for(step)
        path = self.root / tag
        seen = images_seen(step, c.budget.global_batch)
        client = {"step": step, "images_seen": seen, "universal_checkpoint_info": {}}
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client, save_latest=False)
        save_rng(path, world.rank, rank_state)
        if ema is not None and world.is_main:
            torch.save(ema.state_dict(), path / EMA_FILE)
        barrier()
        if world.is_main:
            commit(
                path,
                {
                    "step": step,
                    "images_seen": seen,
                    "total_steps": self.total_steps,
                    "world_size": world.world_size,
                    "zero_stage": c.deepspeed.zero_stage,
                    "precision": self.settings.precision,
                    "resume_digest": resume_digest(c),
                    "fingerprint": resume_fingerprint(c),
                    "reason": reason,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                },
            )
            retention(self.root, c.checkpoint.keep_last, c.checkpoint.keep_every, c.checkpoint.keep_steps)
        barrier()
        return path

    def keep_best(self, ema: Ema, score: float, step: int) -> bool:
        """Keep ``ema``'s weights as RUN_DIR/best_ema.safetensors when ``score`` beats the best kept
        so far (best_ema.json records it and its step); rank 0's call. True when they were kept."""
        record = self.run.root / BEST_EMA_RECORD
        best = json.loads(record.read_text())["val_acc_ema"] if record.exists() else -1.0
        if score <= best:
            return False
        weights = self.run.root / BEST_EMA_WEIGHTS
        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(weights))
        follow_umask(weights)
        write_json_atomic(record, {"val_acc_ema": score, "step": step})
        return True
