"""Segmentation metrics: mIoU and per-class IoU from a confusion matrix, as mmsegmentation counts them.

Pixels labelled ``ignore_index`` are left out. A class that appears neither in the labels nor in
the predictions of the whole evaluation has no IoU (NaN) and is left out of the mean; a class that
is predicted but never present has IoU 0.
"""

from __future__ import annotations

import torch

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
