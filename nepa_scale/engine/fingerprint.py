"""The resume fingerprint: the settings a checkpoint cannot survive a change of.

Every checkpoint and run.json record it (and its digest); the checkpointer compares it on resume
(``checkpoint.resume_changes``) and refuses a change with the key named, and a run that completed
with the same digest, budget and data has nothing left to train (``already_complete``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from nepa_scale.config import RunConfig
from nepa_scale.errors import NepaError
from nepa_scale.rundir import RunDir, RunRecord


def resume_fingerprint(config: RunConfig) -> dict[str, Any]:
    """Model shape, batch, data order, objective, and the optimizer's settings (restored from the
    checkpoint, so a change would be silently ignored). As JSON values (lists, not tuples), as a
    checkpoint records them."""
    arch = dataclasses.asdict(config.model.arch())
    o = config.optim
    fingerprint = {
        "task": config.task,
        "model": {k: v for k, v in arch.items() if k != "drop_path"},
        "budget.global_batch": config.budget.global_batch,
        "data.kind": config.data.kind,
        "seed": config.seed,
        "objective": config.objective.model_dump(),
        "optim": {
            "peak_lr": o.peak_lr(config.budget.global_batch),
            "warmup_fraction": o.warmup_fraction,
            "min_lr": o.min_lr,
            "betas": o.betas,
            "eps": o.eps,
            "weight_decay": o.weight_decay,
        },
    }
    # Settings added later enter only when set, so that digests recorded before them still match.
    if o.warmup_steps is not None:
        fingerprint["optim"]["warmup_steps"] = o.warmup_steps
    if o.schedule != "cosine":
        fingerprint["optim"]["schedule"] = o.schedule
    if o.schedule == "wsd":
        fingerprint["optim"]["cooldown"] = [o.cooldown_fraction, o.cooldown_shape]
    if config.task == "finetune":
        fingerprint["finetune.layer_decay"] = config.finetune.layer_decay
        if config.finetune.label_fraction != 1.0:  # a different training set, a different data order
            fingerprint["finetune.label_fraction"] = config.finetune.label_fraction
    if config.task == "segment":
        sg = config.segment
        fingerprint["segment"] = {
            "num_classes": sg.num_classes,
            "feature_blocks": sg.feature_blocks,
            "channels": [sg.decoder_channels, sg.aux_channels],
            "layer_decay": sg.layer_decay,
            "crop": sg.crop,
        }
    return json.loads(json.dumps(fingerprint))


def resume_digest(config: RunConfig) -> str:
    """A short digest of ``resume_fingerprint`` (recorded in run.json and every checkpoint)."""
    blob = json.dumps(resume_fingerprint(config), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def fingerprint_diff(old: dict, new: dict) -> list[str]:
    """``key: checkpoint a -> config b`` for each key the checkpoint recorded that now differs (a key
    added to the fingerprint by newer code is not a change)."""
    lines = []
    for key in sorted(old):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += [f"{key}.{line}" for line in fingerprint_diff(a, b)]
        elif a != b:
            lines.append(f"{key}: checkpoint {a!r} -> config {b!r}")
    return lines


def completed_with(run: RunDir, config: RunConfig) -> RunRecord | None:
    """The record of ``run`` when it completed with the same resume settings, budget and data
    (so the same length) and its final checkpoint is committed: there is nothing to train."""
    record = run.record()
    if record.status != "completed" or record.step is None or not isinstance(record.config, dict):
        return None
    try:  # read through today's config: settings added since the run was recorded get their defaults
        recorded = record.run_config().to_dict()
    except NepaError:
        return None
    current = config.to_dict()
    for data in (recorded["data"], current["data"]):
        data.pop("index_dir", None)  # where a folder's list is stored changes no sample
    same = (
        record.resume_digest == resume_digest(config)
        and all(recorded[key] == current[key] for key in ("budget", "data"))
        and run.has_committed(record.step)
    )
    return record if same else None


def already_complete(run: RunDir, config: RunConfig) -> str | None:
    """What to say when ``run`` completed with the same settings and length (nothing to train);
    None otherwise."""
    record = completed_with(run, config)
    if record is None:
        return None
    return (
        f"run {run.root} is already complete (step {record.step} of {record.total_steps}): nothing to train"
    )
