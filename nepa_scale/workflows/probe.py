"""``nepa-scale probe RUN_DIR``: kNN and the linear probe of a finished run's checkpoint (its online
weights, its EMA, or the same model untrained), on the run's fixed probe subsets
(nepa_scale/eval/probes.py: the probes themselves)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nepa_scale.config import config_from_dict
from nepa_scale.config.files import apply_overrides
from nepa_scale.data import build_dataset
from nepa_scale.engine import safe_load
from nepa_scale.engine.checkpoint_store import EMA_FILE
from nepa_scale.engine.export import fp32_state_dict, newest_verified
from nepa_scale.errors import CheckpointError, UsageError
from nepa_scale.eval.probes import (
    KNN_K,
    check_probe_subsets,
    cross_validated_probe,
    probe_datasets,
    probe_features,
    probe_folds,
    probe_pooled,
    probe_subset,
)
from nepa_scale.models.vit import NEPA
from nepa_scale.rundir import RunDir


def probe_run(
    run_dir: str | Path,
    *,
    weights: str = "online",
    causal: bool = True,
    k: int = KNN_K,
    train_per_class: int | None = None,
    val_per_class: int | None = None,
    data_overrides: list[str] = (),
    reuse: bool = False,
) -> tuple[dict, Path]:
    """Probe a run's newest committed checkpoint: its ``online`` weights, its ``ema`` weights, or the
    same architecture at the run's initialisation (``random_init``, the baseline a probe is read
    against), on the run's probe subsets unless ``*_per_class`` say otherwise. The record is written
    to RUN_DIR/probes/ and returned with its path; ``reuse``: a record already there for the same
    checkpoint and subsets (and no data overrides) is returned as it is."""
    if weights not in ("online", "ema", "random_init"):
        raise ValueError(f"weights: choose online, ema or random_init, got '{weights}'")
    check_probe_flags(k=k, train_per_class=train_per_class, val_per_class=val_per_class)
    run = RunDir(run_dir)
    recorded_config = run.config()
    if recorded_config.task != "pretrain":  # its weights are a classifier or a segmenter, not a NEPA
        raise UsageError(
            f"{run.root} is a {recorded_config.task} run: `nepa-scale probe` takes pretraining runs"
            + (
                f" (it started from {source})"
                if (source := recorded_config.finetune.pretrained or recorded_config.segment.pretrained)
                else ""
            )
        )
    recorded = recorded_config.to_dict()
    config = config_from_dict(apply_overrides(recorded, [f"data.{item}" for item in data_overrides]))
    lg = config.logging
    train_per_class = train_per_class if train_per_class is not None else lg.probe_train_per_class
    val_per_class = val_per_class if val_per_class is not None else lg.probe_val_per_class
    latest = newest_verified(run)
    name = "random_init" if weights == "random_init" else f"{latest.tag}{'_ema' if weights == 'ema' else ''}"
    out = run.root / "probes" / f"{name}{'' if causal else '_bidir'}.json"
    subsets = {"train_per_class": train_per_class, "val_per_class": val_per_class}
    if lg.probe_folds:  # scored as the run's online probe is: the same folds
        subsets["folds"] = lg.probe_folds
    if reuse and not data_overrides and out.is_file():
        record = json.loads(out.read_text())
        if record.get("k") == k and record.get("subsets") == subsets:
            return record, out
    if weights == "random_init":
        torch.manual_seed(config.seed)
        state = NEPA(config.model.arch()).state_dict()
    elif weights == "ema":
        if not (latest.path / EMA_FILE).is_file():
            raise CheckpointError(f"{latest.path}: no {EMA_FILE} (the run kept no EMA)")
        state = safe_load.load(latest.path / EMA_FILE)
    else:
        state = fp32_state_dict(latest)
    arch = config.model.arch()
    model = NEPA(arch, attention="sdpa")
    model.load_state_dict(state)
    train_set = build_dataset(config.data, "train", arch.image_size, train=False)
    val_set = build_dataset(config.data, "val", arch.image_size, train=False)
    train = probe_subset(train_set, "train", train_per_class, lg.probe_subset_seed)
    val = probe_subset(val_set, "val", val_per_class, lg.probe_subset_seed)
    check_probe_subsets(train, val)
    extract = dict(
        causal=causal,
        batch_size=256,
        num_workers=config.data.num_workers,
        worker_start=config.data.worker_start,
    )
    if lg.probe_folds:
        folds = probe_folds(train_set, val_set, train, val, lg.probe_folds, lg.probe_subset_seed)
        pooled = probe_pooled(model, train_set, val_set, train, val, folds, **extract)
        result = cross_validated_probe(*pooled, k=k, causal=causal, seed=lg.probe_subset_seed)
    else:
        data = probe_datasets(model, train_set, val_set, train, val, **extract)
        result = probe_features(*data, k=k, causal=causal, seed=lg.probe_subset_seed)
    step = 0 if weights == "random_init" else latest.step
    record = {"step": step, "weights": weights, "subsets": subsets, **result.to_dict()}
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    return record, out


def check_probe_flags(**flags: int | None) -> None:
    """The counts ``nepa-scale probe`` takes are positive (None: the run's setting): a kNN of k = 0
    votes for nothing and scores chance; -1 images per class would take all but one. Checked before
    any checkpoint is read, with the option named as the user typed it."""
    for name, value in flags.items():
        if value is not None and value <= 0:
            raise UsageError(f"probe --{name.replace('_', '-')}: must be > 0, got {value}")
