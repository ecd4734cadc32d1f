"""Study design: how a sweep's runs are trained, beyond one independent job each.

- **Cooldown branches.** Runs that differ only in their length (``budget.images`` / ``epochs`` /
  ``flops``) and use the ``wsd`` schedule share everything up to the shortest one's cooldown: the
  lr is constant until then whatever the length. So one trunk per configuration (the longest
  budget) trains, keeps a checkpoint at each shorter budget's cooldown start, and every shorter
  budget becomes a branch that starts there and trains only its cooldown (Hägele et al. 2024).
  A branch is bitwise the standalone run of its budget (tests/test_study.py).
- **IsoFLOP budgets.** ``budget.flops`` runs last whole steps; the planner checks that they land
  within ``ISOFLOP_TOLERANCE`` of their compute budget.

Both need each run's length in steps, computed here by the trainer's own rule.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from nepa_scale.config import DataConfig, RunConfig, validated
from nepa_scale.engine.schedule import check_schedule, cooldown_start
from nepa_scale.engine.tasks import SegmentTask, planned_arch_and_flops
from nepa_scale.errors import ConfigError, DataError, NepaError
from nepa_scale.rundir import images_seen

LENGTH_KEYS = ("images", "epochs", "flops")  # budget.* keys that set a run's length, nothing else
ISOFLOP_TOLERANCE = 0.01


@functools.lru_cache(maxsize=16)
def _train_size(data_json: str, image_size: int) -> int:
    from nepa_scale.data import build_dataset  # heavy: torch, for an epochs budget only

    data = validated(DataConfig, json.loads(data_json), "data.")
    return len(build_dataset(data, "train", image_size, train=False))


def training_steps(config: RunConfig) -> int:
    """Optimizer steps of the run's budget, by the trainer's rule (an epochs budget counts the
    training set, so it may raise DataError for a missing dataset)."""
    b = config.budget
    steps_per_epoch = 0
    if b.epochs is not None and config.task == "segment":  # image and annotation pairs, listed
        steps_per_epoch = len(SegmentTask.train_dataset(config, None)) // b.global_batch
    elif b.epochs is not None:
        data_json = json.dumps(config.to_dict()["data"], sort_keys=True)
        steps_per_epoch = _train_size(data_json, config.model.arch().image_size) // b.global_batch
    return b.total_steps(steps_per_epoch, planned_arch_and_flops(config)[1])


@functools.lru_cache(maxsize=16)
def _probe_images(
    data_json: str, image_size: int, split: str, per_class: int | None, seed: int
) -> int | None:
    """Images of a split's probe subset: counted from the labels (the bundled digits, a folder's
    listing), or per class x class folders when the split's files are not listed; None without data."""
    from nepa_scale.data import build_dataset  # heavy: torch, for a study that probes only
    from nepa_scale.eval.probes import probe_subset  # heavy: torch, likewise

    data = validated(DataConfig, json.loads(data_json), "data.")
    if data.kind in ("imagefolder", "shards"):
        folder = Path(data.root) / (data.train_split if split == "train" else data.val_split)
        if not (folder.is_dir() if data.kind == "imagefolder" else (folder / "samples.npz").is_file()):
            return None
        if (
            per_class is not None and data.kind == "imagefolder"
        ):  # an upper bound: classes smaller than per_class give fewer
            return per_class * sum(1 for entry in folder.iterdir() if entry.is_dir())
    return len(
        probe_subset(build_dataset(data, split, image_size, train=False), split, per_class, seed).indices
    )


def evaluation_points(every: int, steps: int, after: int, at_start: bool) -> int:
    """Evaluations a run makes itself: every ``every`` steps, at its end and (``at_start``) at step 0,
    after step ``after`` (a branch's earlier points are its trunk's)."""
    points = set(range(every, steps + 1, every)) if every else set()
    points |= {steps} | ({0} if at_start else set())
    return sum(p > after or (after == 0 and p == 0) for p in points)


def evaluation_flops(
    config: RunConfig, steps: int, branch_step: int, world_size: int, micro_batch: int
) -> float | None:
    """FLOPs of a pretraining run's own evaluations (forward only, a third of training's per image):
    the held-out batches at every evaluation point and the probe's subsets at every probe point.
    None when the probe's image count is unknown (its data is not reachable from here)."""
    lg, per_image = config.logging, planned_arch_and_flops(config)[1]
    at_start = bool(lg.eval_every or lg.probe_every)
    data_json, size = json.dumps(config.to_dict()["data"], sort_keys=True), config.model.arch().image_size
    if lg.eval_batches is None:  # the whole val split
        held_out = _probe_images(data_json, size, "val", None, lg.probe_subset_seed)
        if held_out is None:
            return None
    else:
        held_out = lg.eval_batches * micro_batch * world_size
    images = evaluation_points(lg.eval_every, steps, branch_step, at_start) * held_out
    if lg.probe_every:
        counts = [
            _probe_images(data_json, size, split, per_class, lg.probe_subset_seed)
            for split, per_class in (("train", lg.probe_train_per_class), ("val", lg.probe_val_per_class))
        ]
        if None in counts:
            return None
        images += evaluation_points(lg.probe_every, steps, branch_step, True) * sum(counts)
    return images * per_image / 3


def training_flops(config: RunConfig) -> float:
    """Training FLOPs of the whole run under its budget.flop_convention."""
    per_image = planned_arch_and_flops(config)[1]
    return images_seen(training_steps(config), config.budget.global_batch) * per_image


def check_flops_budget(config: RunConfig) -> None:
    """A ``budget.flops`` run's whole steps land within ISOFLOP_TOLERANCE of its budget."""
    target = config.budget.flops
    if target is None:
        return
    steps = training_steps(config)
    off = training_flops(config) / target - 1
    if abs(off) > ISOFLOP_TOLERANCE:
        raise ConfigError(
            f"budget.flops: {target:.3g} FLOPs is {steps} whole step(s) of {config.budget.global_batch} images "
            f"for this model, {100 * off:+.1f}% off the budget (more than {100 * ISOFLOP_TOLERANCE:g}%): "
            "lower budget.global_batch or raise the budget"
        )


def check_run_schedule(config: RunConfig) -> None:
    """The run's warmup ends before the run does (and a WSD run's before its cooldown), by the
    trainer's own rule, so that ``plan`` marks such a run invalid rather than ``launch`` submitting
    a job that fails at once. An epochs budget whose data is not reachable here is left to the run."""
    try:
        steps = training_steps(config)
    except (DataError, OSError):  # plan warns about the missing data; launch refuses it
        return
    check_schedule(config.optim, steps)


def trunk_key(config_data: dict) -> str:
    """Runs with the same key differ at most in their length: one trunk can serve them all."""
    data = json.loads(json.dumps(config_data))
    for key in LENGTH_KEYS:
        data["budget"].pop(key, None)
    for key in ("output_dir", "branch"):
        data.pop(key, None)
    data["checkpoint"].pop("keep_steps", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Branching:
    """One trunk and its branches: run id -> branch step (the branch's cooldown start)."""

    trunk: str
    trunk_steps: int
    branches: dict[str, int]


def plan_branches(runs: dict[str, RunConfig]) -> tuple[list[Branching], dict[str, str]]:
    """Group WSD runs that differ only in length under one trunk each (the longest).

    Returns the groups and, per run id, an error for runs that cannot take part (a warmup in
    fractions, a warmup that reaches the branch point, an unknown length). Runs of other schedules,
    and WSD runs alone in their group, stay independent."""
    groups: dict[str, list[str]] = {}
    for run_id, config in runs.items():
        if config.optim.schedule == "wsd":
            groups.setdefault(trunk_key(config.to_dict()), []).append(run_id)
    plans, errors = [], {}
    for members in groups.values():
        if len(members) < 2:
            continue
        optim = runs[members[0]].optim
        if optim.warmup_steps is None:
            for run_id in members:
                errors[run_id] = (
                    f"optim.warmup_steps: runs {', '.join(members)} differ only in budget and use the wsd "
                    "schedule, so they share one trunk, which needs a warmup of fixed length: set "
                    f"optim.warmup_steps (optim.warmup_fraction={optim.warmup_fraction} gives each budget its own)"
                )
            continue
        steps = {}
        for run_id in members:
            try:
                steps[run_id] = training_steps(runs[run_id])
                check_schedule(runs[run_id].optim, steps[run_id])
            except (
                NepaError,
                OSError,
            ) as exc:  # a warmup into the cooldown; an epochs budget without its data
                errors[run_id] = str(exc)
        usable = [run_id for run_id in members if run_id in steps and run_id not in errors]
        if len(usable) < 2:
            continue
        trunk = max(usable, key=lambda run_id: steps[run_id])
        branches = {
            run_id: cooldown_start(optim, steps[run_id]) for run_id in usable if steps[run_id] < steps[trunk]
        }
        if branches:
            plans.append(Branching(trunk, steps[trunk], branches))
    return plans, errors
