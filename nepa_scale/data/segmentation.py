"""Semantic segmentation data: the ADE20K layout (``ADEChallengeData2016``).

    ROOT/images/{training,validation}/NAME.jpg
    ROOT/annotations/{training,validation}/NAME.png     (one uint8 class index per pixel)

ADE20K's annotations hold 0 for "other" and 1..150 for its classes. The standard protocol
(mmsegmentation's ``reduce_zero_label``) ignores 0 and shifts 1..150 to 0..149, so the model
predicts 150 classes and pixel value 255 means "ignore" everywhere downstream.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from nepa_scale.data.datasets import IMAGE_EXTENSIONS
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

    def __init__(self, root: str | Path, split: str):
        if split not in ADE20K_SPLITS:
            raise DataError(f"ADE20K split '{split}': choose {' or '.join(ADE20K_SPLITS)}")
        self.root = Path(root)
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
        return image, reduce_zero_label(label)
