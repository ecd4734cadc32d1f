"""Segmentation metrics: mIoU and per-class IoU from a confusion matrix, as mmsegmentation counts them.

Pixels labelled ``ignore_index`` are left out. A class that appears neither in the labels nor in
the predictions of the whole evaluation has no IoU (NaN) and is left out of the mean; a class that
is predicted but never present has IoU 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from nepa_scale.data import worker_context
from nepa_scale.data.segmentation import IGNORE_INDEX


def confusion_matrix(
    prediction: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """``[true class, predicted class]`` pixel counts (int64) of one batch; add them over batches."""
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape"
        )
    keep = target != ignore_index
    target, prediction = target[keep].long(), prediction[keep].long()
    if len(target) and (target.max() >= num_classes or target.min() < 0):
        raise ValueError(f"target holds a class outside 0..{num_classes - 1} that is not {ignore_index}")
    counts = torch.bincount(target * num_classes + prediction, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_per_class(confusion: torch.Tensor) -> torch.Tensor:
    """Intersection over union of each class (float64; NaN where the class is in neither)."""
    confusion = confusion.double()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.nan)


def mean_iou(confusion: torch.Tensor) -> float:
    """The mean over the classes that have an IoU."""
    return float(torch.nanmean(iou_per_class(confusion)))


# ----------------------------------------------------------------------------- inference and scoring


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits upsampled (bilinear) to the label map, ignored pixels at zero loss and
    the mean over all pixels: mmsegmentation's default (``avg_non_ignore=False``) in BEiT/MAE's runs."""
    logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none").mean()


def _padded(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Zero-padded at the bottom and right (0 is the mean colour after normalisation, as mmseg pads)."""
    return F.pad(image, (0, width - image.shape[-1], 0, height - image.shape[-2]))


def window_boxes(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """mmsegmentation's sliding windows (top, left, bottom, right): a grid at ``stride``, the last
    row and column moved back to end at the image's edge."""
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            bottom, right = min(r * stride + crop, height), min(c * stride + crop, width)
            boxes.append((max(bottom - crop, 0), max(right - crop, 0), bottom, right))
    return boxes


@torch.no_grad()
def predict_logits(
    forward: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    num_classes: int,
    crop: int,
    patch: int,
    mode: str = "slide",
    stride: int | None = None,
    batch: int = 8,
) -> torch.Tensor:
    """(1, classes, H, W) fp32 logits for one normalised (1, 3, H, W) image, single scale.

    ``slide``: windows of ``crop`` px every ``stride`` px, each zero-padded to the crop (windows
    of images smaller than the crop) and the overlaps averaged; ``whole``: the image zero-padded
    to a multiple of the patch size in one forward."""
    _, _, height, width = image.shape
    if mode == "whole":
        padded = _padded(image, -(-height // patch) * patch, -(-width // patch) * patch)
        out = F.interpolate(
            forward(padded).float(), size=padded.shape[-2:], mode="bilinear", align_corners=False
        )
        return out[:, :, :height, :width]
    boxes = window_boxes(height, width, crop, stride or crop * 2 // 3)
    total = torch.zeros(1, num_classes, height, width, device=image.device)
    count = torch.zeros(1, 1, height, width, device=image.device)
    for start in range(0, len(boxes), batch):
        chunk = boxes[start : start + batch]
        windows = torch.cat([_padded(image[:, :, t:b, x:r], crop, crop) for t, x, b, r in chunk])
        out = F.interpolate(forward(windows).float(), size=(crop, crop), mode="bilinear", align_corners=False)
        for (t, x, b, r), logits in zip(chunk, out, strict=True):
            total[:, :, t:b, x:r] += logits[:, : b - t, : r - x]
            count[:, :, t:b, x:r] += 1
    return total / count


def segment_prediction(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Classes at the label map's original size: logits resized (bilinear), then argmax (mmseg's order)."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(1)[0]


def score_images(
    forward: Callable[[torch.Tensor], torch.Tensor],
    dataset,
    indices: list[int],
    num_classes: int,
    crop: int,
    patch: int,
    mode: str,
    stride: int | None,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    num_workers: int = 0,
    worker_start: str | None = None,
) -> torch.Tensor:
    """The confusion matrix of ``indices`` of an evaluation dataset (image, label map at its size),
    read and resized by ``num_workers`` loader processes (``data.num_workers``) while the model runs."""

    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    context = worker_context(worker_start, num_workers)
    loader = DataLoader(
        dataset, sampler=indices, batch_size=None, num_workers=num_workers, multiprocessing_context=context
    )
    for image, label in loader:
        logits = predict_logits(
            lambda x: forward(x.to(dtype)), image[None].to(device), num_classes, crop, patch, mode, stride
        )
        confusion += confusion_matrix(segment_prediction(logits, label.shape[-2:]).cpu(), label, num_classes)
    return confusion


def summary(confusion: torch.Tensor) -> dict:
    """mIoU, pixel accuracy and per-class IoU (None where a class is in neither labels nor predictions)."""
    ious = iou_per_class(confusion)
    return {
        "miou": mean_iou(confusion),
        "pixel_acc": float(confusion.diag().sum() / confusion.sum().clamp_min(1)),
        "iou_per_class": [None if torch.isnan(v) else round(float(v), 6) for v in ious],
        "pixels": int(confusion.sum()),
    }
