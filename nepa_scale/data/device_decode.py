"""JPEG decoding on the training device (``data.decode: device``): loader workers only read files.

A worker reads the file's bytes and its header, and draws the sample's crop box and flip exactly as
the CPU transform would (the same seeded ``get_params`` and flip draw), so every image covers the
same region in both modes. The device then decodes the micro-batch in one call
(``torchvision.io.decode_jpeg``: nvJPEG on GPUs, libjpeg-turbo on the CPU), crops, resizes
(bicubic or bilinear with antialiasing: PIL's kernels) and flips each image, and rounds to uint8 as PIL does.
Pixels differ from PIL's by a level or two (other IDCT and resampling code), not in what is shown.

A file that is not a baseline RGB JPEG, or whose end-of-image marker is missing (a truncated
download), takes the CPU path in the worker, which decodes it with PIL or skips it as unreadable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from nepa_scale.data.datasets import Batch, EncodedJpeg, Skipped


def crop_resize_flip(image: torch.Tensor, sample: EncodedJpeg, size: int, interpolation: str) -> torch.Tensor:
    """uint8 CHW -> the sample's crop, resized to size x size, flipped if drawn, uint8 (rounded as PIL)."""
    top, left, height, width = sample.box
    crop = image[None, :, top : top + height, left : left + width].float()
    resized = F.interpolate(crop, size=(size, size), mode=interpolation, antialias=True, align_corners=False)
    resized = resized[0].round_().clamp_(0, 255).to(torch.uint8)
    return resized.flip(-1) if sample.flip else resized


def _decode_each(samples: list[EncodedJpeg], device: torch.device) -> list[torch.Tensor | None]:

    try:  # the whole micro-batch in one call
        return list(decode_jpeg([s.data for s in samples], mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one bad file fails the call: decode one at a time to find it
        out: list[torch.Tensor | None] = []
        for sample in samples:
            try:
                out.append(decode_jpeg(sample.data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


def decode_on_device(batch: Batch, device: torch.device, size: int, interpolation: str = "bicubic") -> Batch:
    """Turn a batch of encoded JPEGs (and worker-decoded fallbacks) into uint8 images on ``device``."""
    jpegs = [item for item in batch.pending if isinstance(item, EncodedJpeg)]
    decoded = iter(_decode_each(jpegs, device) if jpegs else [])
    images, labels, skipped = [], [], list(batch.skipped)
    for item, label in zip(batch.pending, batch.labels.tolist(), strict=True):
        if isinstance(item, EncodedJpeg):
            image = next(decoded)
            if image is None:
                skipped.append(Skipped(item.path, "the JPEG decoder on the device rejected it"))
                continue
            image = crop_resize_flip(image, item, size, interpolation)
        else:
            image = item.to(device, non_blocking=True)
        images.append(image)
        labels.append(label)
    if not images:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    return Batch(torch.stack(images), torch.tensor(labels, dtype=torch.long), skipped)
