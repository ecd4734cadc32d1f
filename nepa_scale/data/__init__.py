"""Datasets, transforms and the resumable sampler; the check that a run's input files exist.

Names are imported lazily (PEP 562) so that ``check_input_paths`` runs without paying for
``import torch``: `nepa-scale train` refuses a missing folder before the engine starts.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from nepa_scale.errors import ConfigError

if TYPE_CHECKING:
    from nepa_scale.config import RunConfig

_EXPORTS = {
    **dict.fromkeys(
        (
            "IMAGE_EXTENSIONS",
            "AugmentSpec",
            "Batch",
            "DigitsDataset",
            "EncodedJpeg",
            "ImageFolderDataset",
            "LabelSubset",
            "SeededDataset",
            "Skipped",
            "SyntheticDataset",
            "build_transform",
            "collate",
            "to_model_input",
        ),
        "datasets",
    ),
    "ResumableBatchSampler": "sampler",
    **dict.fromkeys(
        (
            "SAMPLE_CHECK",
            "batch_loader",
            "build_dataset",
            "check_pairs",
            "check_training_data",
            "few_labels",
            "spread_sample",
            "worker_context",
        ),
        "loading",
    ),
}

__all__ = sorted([*_EXPORTS, "check_input_paths"])


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nepa_scale.data' has no attribute '{name}'")
    return getattr(importlib.import_module(f"nepa_scale.data.{_EXPORTS[name]}"), name)


def check_input_paths(config: RunConfig) -> None:
    """The files a run reads exist: checked when a run starts or is launched, never when a run is
    read back (collect, report, export, probe), where the data may since have moved or been unmounted."""
    data = config.data
    if data.kind == "imagefolder" and not (Path(data.root) / data.train_split).is_dir():
        raise ConfigError(f"data.root: directory not found: {Path(data.root) / data.train_split}")
    if data.kind == "shards" and not (Path(data.root) / data.train_split / "samples.npz").is_file():
        where = Path(data.root) / data.train_split
        raise ConfigError(
            f"data.root: no shards at {where} (no samples.npz): make them with nepa-scale prepare-data"
        )
    starts_from = {"finetune": config.finetune, "segment": config.segment}.get(config.task)
    if (
        starts_from is not None
        and starts_from.pretrained is not None
        and not Path(starts_from.pretrained).exists()
    ):
        raise ConfigError(f"{config.task}.pretrained: not found: {starts_from.pretrained}")
    for folder in ("images/training", "annotations/training") if data.kind == "ade20k" else ():
        if not (Path(data.root) / folder).is_dir():
            raise ConfigError(f"data.root: directory not found: {Path(data.root) / folder}")
