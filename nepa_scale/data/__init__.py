"""Datasets, transforms and the resumable sampler."""

from __future__ import annotations

from pathlib import Path

from nepa_scale.config import DataConfig
from nepa_scale.data.datasets import (
    AugmentSpec,
    Batch,
    DigitsDataset,
    EncodedJpeg,
    ImageFolderDataset,
    SeededDataset,
    Skipped,
    SyntheticDataset,
    build_transform,
    collate,
    to_model_input,
)
from nepa_scale.data.sampler import ResumableBatchSampler


def build_dataset(
    config: DataConfig,
    split: str,
    image_size: int,
    train: bool,
    auto_augment: str | None = None,
    re_prob: float = 0.0,
    decode: str = "cpu",
):
    """The dataset for ``split`` ("train" or "val") with the recipe's transforms (fine-tuning adds
    RandAugment and RandomErasing). ``decode="device"``: training JPEGs are decoded by
    ``decode_on_device`` on the device."""
    spec = AugmentSpec(
        image_size,
        tuple(config.crop_scale),
        config.hflip,
        config.interpolation,
        config.eval_crop_pct,
        auto_augment,
        re_prob,
    )
    transform = build_transform(spec, train=train)
    if config.kind == "digits":
        return DigitsDataset(split, image_size, transform)
    if config.kind == "synthetic":
        size = config.synthetic_size if split == "train" else max(config.synthetic_size // 8, 1)
        return SyntheticDataset(size, image_size)
    folder = config.train_split if split == "train" else config.val_split
    return ImageFolderDataset(
        Path(config.root) / folder, transform, decode_on_device=train and decode == "device"
    )


__all__ = [
    "AugmentSpec",
    "Batch",
    "DigitsDataset",
    "EncodedJpeg",
    "ImageFolderDataset",
    "ResumableBatchSampler",
    "SeededDataset",
    "Skipped",
    "SyntheticDataset",
    "build_dataset",
    "build_transform",
    "collate",
    "to_model_input",
]
