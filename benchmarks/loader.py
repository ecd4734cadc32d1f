"""Decode + augment rate of the pretraining loader on real JPEG photographs, per worker process.

The photographs are scikit-learn's two bundled 427x640 JPEGs (or the JPEGs in ``--photos DIR``), cut into ImageNet-like pictures
(300-426 x 350-639 px, quality 90) in an ImageNet-style folder, read through the real
``ImageFolderDataset`` + recipe transform + ``DataLoader`` (RandomResizedCrop 224 bicubic, flip).
Compares workers returning uint8 (normalised on the device) with workers normalising to float32,
and with ``data.decode=device``, where workers only read bytes and draw the crop (then the rate of
``decode_on_device`` on this machine's device: nvJPEG on a GPU).

    python benchmarks/loader.py [--images 256] [--workers 1,2] [--keep DIR] [--photos DIR] [--resize 256]

``--resize SIDE`` also measures a copy made by ``nepa-scale resize-data --short-side SIDE``.

``--keep DIR`` leaves the folder (DIR/train/...) for ``nepa-scale bench --data DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader

from nepa_scale.data import AugmentSpec, ImageFolderDataset, build_transform, collate
from nepa_scale.data.datasets import NEPA_MEAN, NEPA_STD
from nepa_scale.data.device_decode import decode_on_device
from nepa_scale.data.resize import resize_dataset


def load_photos(folder: Path | None) -> list[np.ndarray]:
    if folder is not None and folder.is_dir():
        return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.jpg"))]
    from sklearn.datasets import load_sample_images

    return load_sample_images().images


def write_photos(root: Path, count: int, photos: list[np.ndarray]) -> None:
    for split in ("train", "val"):
        for i in range(count if split == "train" else count // 8):
            photo = photos[i % len(photos)]
            h, w = 300 + (i * 37) % 127, 350 + (i * 53) % 290
            y, x = (i * 11) % (photo.shape[0] - h + 1), (i * 29) % (photo.shape[1] - w + 1)
            folder = root / split / f"class{i % 4}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(photo[y : y + h, x : x + w]).save(folder / f"img{i:05d}.jpg", quality=90)


def rate(dataset, workers: int, batch: int, limit: int) -> float:
    """Images per second over the first ``limit`` images after the first batch (worker start-up excluded)."""
    items = [(i, i) for i in range(min(limit, len(dataset)))]
    loader = DataLoader(
        dataset,
        batch_sampler=[items[i : i + batch] for i in range(0, len(items), batch)],
        num_workers=workers,
        collate_fn=collate,
    )
    batches = iter(loader)
    next(batches)
    start, images = time.perf_counter(), 0
    for b in batches:
        images += len(b.labels)
    return images / (time.perf_counter() - start)


def device_rate(dataset, batch: int, limit: int) -> tuple[str, float]:
    """data.decode=device: images per second that ``decode_on_device`` turns out on this machine's device."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    items = [(i, i) for i in range(min(limit, len(dataset)))]
    batches = [collate([dataset[item] for item in items[i : i + batch]]) for i in range(0, len(items), batch)]
    decode_on_device(batches[0], device, 224)  # warm-up (CUDA context, nvJPEG handles)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for b in batches:
        decode_on_device(b, device, 224)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return str(device), len(items) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--measure", type=int, default=512, help="images per rate measurement")
    parser.add_argument("--keep", type=Path, default=None)
    parser.add_argument(
        "--photos", type=Path, default=None, help="a folder of JPEGs instead of scikit-learn's"
    )
    parser.add_argument("--resize", type=int, default=None, help="also a copy at this short side")
    parser.add_argument("--json", type=Path, default=Path(os.environ.get("OUT", ".")) / "loader.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a loader worker
    root = args.keep or Path(tempfile.mkdtemp(prefix="nepa-jpegs-"))
    write_photos(root, args.images, load_photos(args.photos))
    files = list((root / "train").rglob("*.jpg"))
    kb = sum(f.stat().st_size for f in files) / len(files) / 1e3
    print(f"{len(files)} JPEGs, mean {kb:.0f} kB, under {root}")
    spec = AugmentSpec(224)
    uint8 = ImageFolderDataset(root / "train", build_transform(spec, train=True))
    old = create_transform(  # the transform before uint8 output: ToTensor + Normalize in the worker
        224, is_training=True, color_jitter=None, interpolation="bicubic", mean=NEPA_MEAN, std=NEPA_STD
    )
    as_float = ImageFolderDataset(root / "train", old)
    encoded = ImageFolderDataset(root / "train", build_transform(spec, train=True), decode_on_device=True)
    outputs = [
        ("uint8 out (device normalises)", uint8),
        ("float32 out (worker normalises)", as_float),
        ("bytes + crop box out (data.decode=device)", encoded),
    ]
    small_root = None
    if args.resize:
        small_root = root.parent / f"{root.name}-short{args.resize}"
        done = resize_dataset(root, small_root, args.resize, workers=os.cpu_count() or 1)
        print(
            f"resized copy {small_root}: {done.resized} resized in {done.seconds:.1f} s, {done.bytes_out / done.bytes_in:.0%} of the bytes"
        )
        train = small_root / "train"
        outputs += [
            (
                f"uint8 out, short side {args.resize}",
                ImageFolderDataset(train, build_transform(spec, train=True)),
            ),
            (
                f"bytes + crop box out, short side {args.resize}",
                ImageFolderDataset(train, build_transform(spec, train=True), decode_on_device=True),
            ),
        ]
    start = time.perf_counter()
    for path, _ in uint8.samples:
        with Image.open(path) as img:
            img.convert("RGB")
    decode_ms = 1e3 * (time.perf_counter() - start) / len(files)
    print(f"decode only (PIL, main process): {decode_ms:.2f} ms/img")
    report = {
        "jpegs": len(files),
        "mean_kb": kb,
        "decode_ms": decode_ms,
        "cpu_count": os.cpu_count(),
        "rates": [],
    }
    for workers in [int(w) for w in args.workers.split(",")]:
        for name, dataset in outputs:
            r = rate(dataset, workers, args.batch, args.measure)
            print(f"{workers} worker(s), {name}: {r:.0f} img/s = {r / max(workers, 1):.0f} img/s per worker")
            report["rates"].append({"workers": workers, "output": name, "img_per_s": r})
    device, r = device_rate(encoded, args.batch, args.measure)
    print(f"data.decode=device: decode + crop + resize + flip on {device}: {r:.0f} img/s")
    report["device_decode"] = {"device": device, "img_per_s": r}
    if small_root is not None:
        _, r = device_rate(outputs[-1][1], args.batch, args.measure)
        print(f"data.decode=device, short side {args.resize}: {r:.0f} img/s on {device}")
        report["device_decode_resized"] = {"short_side": args.resize, "img_per_s": r}
    args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
