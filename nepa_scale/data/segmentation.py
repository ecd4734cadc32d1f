"""Semantic segmentation data: the ADE20K layout (``ADEChallengeData2016``).

    ROOT/images/{training,validation}/NAME.jpg
    ROOT/annotations/{training,validation}/NAME.png     (one uint8 class index per pixel)

ADE20K's annotations hold 0 for "other" and 1..150 for its classes. The standard protocol
(mmsegmentation's ``reduce_zero_label``) ignores 0 and shifts 1..150 to 0..149, so the model
predicts 150 classes and pixel value 255 means "ignore" everywhere downstream.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nepa_scale.data.datasets import (
    IMAGE_EXTENSIONS,
    DigitsDataset,
    SeededDataset,
    sample_rng,
    to_model_input,
)
from nepa_scale.errors import DataError

IGNORE_INDEX = 255
ADE20K_CLASSES = 150
ADE20K_SPLITS = {"train": "training", "val": "validation"}


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """0 (other) -> 255 (ignored), k -> k - 1 for k in 1..254; 255 stays ignored."""
    reduced = label.astype(np.int16) - 1
    reduced[(label == 0) | (label == IGNORE_INDEX)] = IGNORE_INDEX
    return reduced.astype(np.uint8)


class Ade20kPairs:
    """The (image, annotation) file pairs of one split, checked when listed: an image without its
    annotation is an error naming both paths, not a silently shorter dataset."""

    def __init__(self, root: str | Path, split: str, num_classes: int | None = None):
        """``num_classes``: the model's (``segment.num_classes``); a label beyond it is an error
        naming the file, not a device-side assert in the loss."""
        if split not in ADE20K_SPLITS:
            raise DataError(f"ADE20K split '{split}': choose {' or '.join(ADE20K_SPLITS)}")
        self.root, self.num_classes = Path(root), num_classes
        folder = ADE20K_SPLITS[split]
        self.image_dir = self.root / "images" / folder
        self.annotation_dir = self.root / "annotations" / folder
        for directory in (self.image_dir, self.annotation_dir):
            if not directory.is_dir():
                raise DataError(
                    f"data: directory not found: {directory} (ADE20K layout: ROOT/images/{folder}, "
                    f"ROOT/annotations/{folder})"
                )
        images = sorted(p for p in self.image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            raise DataError(f"data: no images ({', '.join(IMAGE_EXTENSIONS)}) in {self.image_dir}")
        self.pairs: list[tuple[Path, Path]] = []
        for image in images:
            annotation = self.annotation_dir / f"{image.stem}.png"
            if not annotation.is_file():
                raise DataError(f"data: annotation missing for {image}: expected {annotation}")
            self.pairs.append((image, annotation))

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """The RGB image and its reduced label map (uint8, 0..149 and 255), of equal size."""
        image_path, annotation_path = self.pairs[index]
        try:
            with Image.open(image_path) as img:
                image = img.convert("RGB")
        except Exception as exc:
            raise DataError(f"data: cannot read image {image_path}: {type(exc).__name__}: {exc}") from None
        try:
            with Image.open(annotation_path) as ann:
                if ann.mode not in ("L", "P"):
                    raise ValueError(f"mode {ann.mode}, expected a single-channel class map (L or P)")
                label = np.asarray(ann, dtype=np.uint8)
        except Exception as exc:
            raise DataError(
                f"data: cannot read annotation {annotation_path}: {type(exc).__name__}: {exc}"
            ) from None
        if label.shape != (image.height, image.width):
            raise DataError(
                f"data: annotation {annotation_path} is {label.shape[1]}x{label.shape[0]}, its image "
                f"{image.width}x{image.height}"
            )
        reduced = reduce_zero_label(label)
        classes = reduced[reduced != IGNORE_INDEX]
        if self.num_classes is not None and classes.size and classes.max() >= self.num_classes:
            raise DataError(
                f"data: annotation {annotation_path} holds class {int(classes.max()) + 1} (0 is ignored), "
                f"more than segment.num_classes={self.num_classes}"
            )
        return image, reduced


# ----------------------------------------------------------------------------- the pipelines
# mmsegmentation's ADE20K pipelines (the BEiT/MAE configs), one function per step. Every random
# draw comes from python's ``random``, which ``sample_rng`` seeds per sample: a crop is a pure
# function of the sampler position, so a resumed run sees the same crops.


@dataclass(frozen=True)
class SegmentAugment:
    """The training pipeline's settings (``segment.*``)."""

    crop: int = 518
    scale: tuple[int, int] = (2072, 518)  # (long, short) edge bounds before the random ratio
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75  # a crop's most frequent class may cover at most this share
    hflip: float = 0.5
    photometric: bool = True


def rescale_size(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size whose long edge fits ``max(scale)`` and short edge
    ``min(scale)``."""
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def resize_pair(
    image: Image.Image, label: np.ndarray, size: tuple[int, int]
) -> tuple[Image.Image, np.ndarray]:
    """Bilinear for the image, nearest for the labels (classes must not blend)."""
    resized = Image.fromarray(label).resize(size, Image.NEAREST)
    return image.resize(size, Image.BILINEAR), np.asarray(resized)


def random_crop_box(height: int, width: int, crop: int) -> tuple[int, int, int, int]:
    top = random.randint(0, max(height - crop, 0))
    left = random.randint(0, max(width - crop, 0))
    return top, left, min(top + crop, height), min(left + crop, width)


def cat_max_crop(label: np.ndarray, crop: int, cat_max_ratio: float) -> tuple[int, int, int, int]:
    """mmseg's RandomCrop: up to 10 draws, until the crop holds more than one class and none covers
    ``cat_max_ratio`` or more of its labelled pixels (the last draw otherwise)."""
    box = random_crop_box(*label.shape, crop)
    if cat_max_ratio >= 1:
        return box
    for _ in range(10):
        top, left, bottom, right = box
        classes, counts = np.unique(label[top:bottom, left:right], return_counts=True)
        counts = counts[classes != IGNORE_INDEX]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
        box = random_crop_box(*label.shape, crop)
    return box


def photometric_distortion(image: np.ndarray) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on a uint8 HWC RGB array: brightness (+-32), contrast
    (x0.5-1.5) first or last, saturation (x0.5-1.5), hue (+-18 of OpenCV's 180 degrees), each with
    probability 1/2, clipped to 0-255 after each step. The HSV steps use PIL's HSV (hue in 0-255)."""

    def convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def contrast(img: np.ndarray) -> np.ndarray:
        return convert(img, alpha=random.uniform(0.5, 1.5)) if random.randint(0, 1) else img

    if random.randint(0, 1):
        image = convert(image, beta=random.uniform(-32, 32))
    contrast_first = random.randint(0, 1) == 1
    if contrast_first:
        image = contrast(image)
    saturate = random.uniform(0.5, 1.5) if random.randint(0, 1) else None
    hue = random.randint(-18, 18) if random.randint(0, 1) else None
    if saturate is not None or hue is not None:
        hsv = np.asarray(Image.fromarray(image).convert("HSV")).copy()
        if saturate is not None:
            hsv[..., 1] = convert(hsv[..., 1], alpha=saturate)
        if hue is not None:
            hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + round(hue * 256 / 180)) % 256).astype(np.uint8)
        image = np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB"))
    if not contrast_first:
        image = contrast(image)
    return image


def normalised(image: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float CHW, normalised on the CPU by ``to_model_input`` (the backbone's mean and std)."""
    return to_model_input(
        torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1), torch.device("cpu"), torch.float32
    )


def train_pair(
    image: Image.Image, label: np.ndarray, aug: SegmentAugment
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random resize, cat-max-ratio crop, flip, photometric distortion, then padding to the crop
    (image 0 after normalisation, labels ignored), as mmseg's ADE20K training pipeline."""
    ratio = random.uniform(*aug.ratio_range)
    scale = (int(aug.scale[0] * ratio), int(aug.scale[1] * ratio))
    image, label = resize_pair(image, label, rescale_size(image.width, image.height, scale))
    top, left, bottom, right = cat_max_crop(label, aug.crop, aug.cat_max_ratio)
    pixels = np.asarray(image)[top:bottom, left:right]
    label = label[top:bottom, left:right]
    if random.random() < aug.hflip:
        pixels, label = pixels[:, ::-1], label[:, ::-1]
    if aug.photometric:
        pixels = photometric_distortion(np.ascontiguousarray(pixels))
    out = torch.zeros(3, aug.crop, aug.crop)
    out[:, : pixels.shape[0], : pixels.shape[1]] = normalised(pixels)
    target = torch.full((aug.crop, aug.crop), IGNORE_INDEX, dtype=torch.long)
    target[: label.shape[0], : label.shape[1]] = torch.from_numpy(np.array(label, dtype=np.int64))
    return out, target


class SegmentationDataset(SeededDataset):
    """(image, label map) pairs through the training pipeline (``train=True``: crops of one size,
    batched) or the evaluation one (the image resized to ``scale`` keeping its ratio, normalised;
    the label map at its original size, as mmseg scores it)."""

    def __init__(self, pairs, aug: SegmentAugment, train: bool):
        super().__init__(transform=None)
        self.pairs, self.aug, self.train = pairs, aug, train
        self.root = getattr(pairs, "root", None)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item: tuple[int, int] | int):
        index, sample_seed = item if isinstance(item, tuple) else (item, item)
        image, label = self.pairs.load(index)
        if self.train:
            with sample_rng(sample_seed):
                return train_pair(image, label, self.aug)
        resized = image.resize(rescale_size(image.width, image.height, self.aug.scale), Image.BILINEAR)
        return normalised(np.asarray(resized)), torch.from_numpy(label.astype(np.int64))


class DigitCanvases:
    """A real miniature segmentation task: scikit-learn's handwritten digits (upscaled to
    ``digit_size``) pasted at random, non-overlapping places on a black canvas (up to ``per_canvas``
    tries), each pixel labelled with its digit's class (1-10 for digits 0-9) where the stroke is,
    0 (background) elsewhere. The canvases of the
    val split use only the digits' held-out images. Deterministic: canvas i is the same every time."""

    def __init__(
        self,
        split: str,
        canvas: int = 40,
        digit_size: int = 16,
        count: int | None = None,
        per_canvas: int = 4,
    ):

        digits = DigitsDataset(split, digit_size, transform=None)
        self.digits = [np.asarray(img.convert("L")) for img in digits.images]
        self.digit_labels = digits.labels
        self.canvas, self.digit_size, self.per_canvas = canvas, digit_size, per_canvas
        self.count = count if count is not None else (1024 if split == "train" else 128)
        self.offset = 0 if split == "train" else 10**6
        self.root = f"digit canvases ({split})"

    def __len__(self) -> int:
        return self.count

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        rng = np.random.default_rng(self.offset + index)
        pixels = np.zeros((self.canvas, self.canvas), dtype=np.uint8)
        label = np.zeros((self.canvas, self.canvas), dtype=np.uint8)
        size, boxes = self.digit_size, []
        for _ in range(self.per_canvas):
            top, left = rng.integers(0, self.canvas - size + 1, size=2)
            if any(abs(top - y) < size and abs(left - x) < size for y, x in boxes):
                continue  # digits do not overlap: each pixel has one true class
            boxes.append((top, left))
            pick = int(rng.integers(len(self.digits)))
            digit = self.digits[pick]
            window = (slice(top, top + self.digit_size), slice(left, left + self.digit_size))
            stroke = digit > 96
            pixels[window] = np.maximum(pixels[window], digit)
            label[window][stroke] = self.digit_labels[pick] + 1
        return Image.fromarray(pixels).convert("RGB"), label


def segment_augment(segment) -> SegmentAugment:
    """The pipeline settings of a ``SegmentConfig``."""
    return SegmentAugment(
        segment.crop,
        tuple(segment.scale),
        tuple(segment.ratio_range),
        segment.cat_max_ratio,
        segment.hflip,
        segment.photometric,
    )


def segmentation_dataset(data, segment, split: str, train: bool) -> SegmentationDataset:
    """``data.kind`` ade20k (``data.root``: ADEChallengeData2016) or digit_canvas, through the
    training (``train``) or evaluation pipeline of ``segment``'s settings."""
    if data.kind == "ade20k":
        pairs = Ade20kPairs(data.root, split, segment.num_classes)
    else:
        pairs = DigitCanvases(split)
    return SegmentationDataset(pairs, segment_augment(segment), train)
