"""Datasets for a run's splits, their loaders, and the checks of training data before a run starts."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from nepa_scale.config import DataConfig
from nepa_scale.data.datasets import (
    BUNDLED_DIGITS,
    IMAGE_EXTENSIONS,
    AugmentSpec,
    DigitsDataset,
    ImageFolderDataset,
    LabelSubset,
    SeededDataset,
    Skipped,
    SyntheticDataset,
    build_transform,
    collate,
)
from nepa_scale.data.index import read_index_meta, shared_index
from nepa_scale.data.sampler import ResumableBatchSampler
from nepa_scale.data.shards import SAMPLES_FILE, ShardDataset
from nepa_scale.errors import DataError

SAMPLE_CHECK = 16  # files decoded before a run starts, to catch a folder of unreadable images early


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
    if config.kind in BUNDLED_DIGITS:
        return DigitsDataset(split, image_size, transform, kind=config.kind)
    if config.kind == "synthetic":
        size = config.synthetic_size if split == "train" else max(config.synthetic_size // 8, 1)
        return SyntheticDataset(size, image_size)
    folder = config.train_split if split == "train" else config.val_split
    on_device = train and decode == "device"
    if config.kind == "shards":
        dataset = ShardDataset(Path(config.root) / folder, transform, decode_on_device=on_device)
    else:
        dataset = ImageFolderDataset(Path(config.root) / folder, transform, on_device, config.index_dir)
    if split != "train":
        classes = split_classes(config, config.train_split)
        check_same_classes(classes, dataset.classes, config.root, config.train_split, folder)
    return dataset


def split_classes(config: DataConfig, folder: str) -> list[str]:
    """The class names of a split of an image folder or its shards, without reading its samples."""
    root = Path(config.root) / folder
    if config.kind == "shards":
        return list(read_index_meta(root / SAMPLES_FILE)["classes"])
    return list(shared_index(root, config.index_dir).classes)


def check_same_classes(train: list[str], other: list[str], root, train_split: str, split: str) -> None:
    """Labels are numbered by class folder within each split, so splits whose class folders differ
    would give one class's images another's label: refused, naming what differs."""
    if list(train) == list(other):
        return
    lacks, extra = sorted(set(train) - set(other)), sorted(set(other) - set(train))

    def some(names: list[str]) -> str:
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    differences = ([f"{split} lacks {some(lacks)}"] if lacks else []) + (
        [f"{split} has {some(extra)}, which {train_split} has not"] if extra else []
    )
    raise DataError(
        f"data: {root}: the class folders of {split}/ and {train_split}/ differ ({'; '.join(differences)}): "
        "labels are numbered by class folder, so they would not match; give both splits the same class folders"
    )


def few_labels(dataset: DigitsDataset | ImageFolderDataset, fraction: float) -> SeededDataset:
    """``fraction`` of each class of a training split (``finetune.label_fraction``); all of it at 1."""
    if fraction >= 1:
        return dataset
    return LabelSubset(dataset, list(dataset.labels), fraction)


def worker_context(start: str | None, num_workers: int):
    """How loader workers start (``data.worker_start``: fork, spawn, forkserver), as a DataLoader's
    multiprocessing context; None: the platform's default."""
    return multiprocessing.get_context(start) if start and num_workers > 0 else None


def batch_loader(
    dataset,
    sampler: ResumableBatchSampler,
    num_workers: int,
    seed: int,
    pin_memory: bool,
    worker_start: str | None = None,
):
    """A DataLoader over ``sampler``'s micro-batches. Its generator is private: creating an
    iterator must not consume the global RNG (exact resume)."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=pin_memory,
        multiprocessing_context=worker_context(worker_start, num_workers),
    )


def spread_sample(size: int) -> list[int]:
    """Up to SAMPLE_CHECK indices spread evenly over ``size`` items, first and last included."""
    return sorted({round(i * (size - 1) / max(1, SAMPLE_CHECK - 1)) for i in range(SAMPLE_CHECK)})


def check_pairs(pairs) -> None:
    """Segmentation: a spread sample of the image and annotation pairs is read; a bad pair raises a
    DataError naming its file."""
    for i in spread_sample(len(pairs)):
        pairs.load(i)


def check_training_data(dataset, global_batch: int, what: str = "data") -> None:
    """Data a run can train on, checked before the engine starts: at least one global batch of
    samples, no empty class folder, and readable images (a spread sample of the files is decoded;
    for segmentation, of the image and annotation pairs).
    A ``DataError`` names the folder, the count and the reason."""
    where = getattr(dataset, "root", what)
    if len(dataset) < global_batch:
        raise DataError(
            f"{what}: {where} has {len(dataset)} samples, fewer than one global batch of {global_batch} "
            "(budget.global_batch)"
        )
    pairs = getattr(dataset, "pairs", None)
    if pairs is not None:
        check_pairs(pairs)
    if isinstance(dataset, ImageFolderDataset):
        empty = dataset.empty_classes()
        if empty:
            raise DataError(
                f"{what}: {len(empty)} class folder(s) without images ({', '.join(IMAGE_EXTENSIONS)}), "
                f"e.g. {dataset.root / empty[0]}: remove them or add images"
            )
        picks = spread_sample(len(dataset))
        failures = [dataset.load(i)[0] for i in picks]
        failures = [f for f in failures if isinstance(f, Skipped)]
        if len(failures) == len(picks):
            raise DataError(
                f"{what}: none of {len(picks)} sampled images under {dataset.root} can be decoded "
                f"(e.g. {failures[0].path}: {failures[0].reason})"
            )
