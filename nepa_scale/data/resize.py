"""A pre-resized copy of an image folder: the cheapest speed-up of the CPU loader.

Decoding and cropping cost grows with the pixels of the source: at short side 256, ImageNet-sized
photographs have half their pixels, a PIL worker turns out about 1.3x the images and the device
path (``data.decode: device``) decodes twice as many (docs/performance.md). The copy keeps every file's relative path and
name, so a dataset built on it has the same samples, classes and order, and a run draws the same
sample stream; only the pixels change (small RandomResizedCrop crops see less detail, and run.json
records the copy as ``data_resized``). Files already small enough, files PIL cannot read and files
that are not images are copied byte for byte: the loader still reports unreadable ones at train time.

Interrupted copies resume: each file is written under a temporary name and renamed when complete,
so a file that exists in the copy is finished and is not redone. ``nepa_resize.json`` in the copy
records the source, the settings and each run's counts; a rerun with other settings is refused.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from nepa_scale.config.files import check_output_folder
from nepa_scale.data.index import IMAGE_EXTENSIONS, INDEX_FOLDER
from nepa_scale.errors import UsageError

MANIFEST = "nepa_resize.json"


@dataclass
class ResizeSummary:
    resized: int = 0
    copied: int = 0  # small enough already, or not an image: the same bytes
    unreadable: list[str] = field(default_factory=list)  # the same bytes too
    already_done: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0


def shrink(img: Image.Image, short_side: int, quality: int) -> bytes | None:
    """``img`` encoded again in its format with its shorter side at ``short_side`` pixels (bicubic);
    None when it is small enough already. resize-data and prepare-data share it: the same bytes."""
    image_format, (width, height) = img.format, img.size
    if min(width, height) <= short_side:
        return None
    scale = short_side / min(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # the loader converts to RGB; for RGB and L converting after the resize is the same
    source = img if img.mode in ("RGB", "L") else img.convert("RGB")
    small = source.resize(size, Image.BICUBIC)
    options = {"quality": quality} if image_format == "JPEG" else {}
    out = io.BytesIO()
    small.save(out, format=image_format, **options)
    return out.getvalue()


def resize_file(src: Path, dst: Path, short_side: int, quality: int) -> str:
    """Write ``dst`` from ``src``: 'resized', 'copied' or 'unreadable' (copied)."""
    part = dst.with_name(f".{dst.name}.part")
    outcome, small = "copied", None
    if src.suffix.lower() in IMAGE_EXTENSIONS:
        try:
            with Image.open(src) as img:
                small = shrink(img, short_side, quality)
        except Exception:  # truncated, corrupt, or not writable in its format: copied as it is
            outcome = "unreadable"
    if small is not None:
        part.write_bytes(small)
        outcome = "resized"
    else:
        shutil.copyfile(src, part)
    os.replace(part, dst)
    return outcome


def _resize_one(job: tuple[str, str, int, int]) -> tuple[str, str, int, int]:
    src, dst, short_side, quality = job
    outcome = resize_file(Path(src), Path(dst), short_side, quality)
    return src, outcome, os.path.getsize(src), os.path.getsize(dst)


def check_destination(
    src: Path, dst: Path, settings: dict, manifest_name: str = MANIFEST, made: str = "resized"
) -> dict:
    """Refuse a destination that overlaps the source, belongs to someone else or was started with
    other settings; returns the copy's manifest so far (empty for a new copy)."""
    if not src.is_dir():
        raise ValueError(f"source folder not found: {src}")
    source, target = src.resolve(), dst.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise ValueError(f"destination {dst} overlaps the source {src}: choose a separate folder")
    try:
        check_output_folder(dst, "destination")
    except UsageError as exc:  # the copy's own checks are ValueErrors (the CLI prints them as one line)
        raise ValueError(str(exc)) from None
    path = dst / manifest_name
    if not path.exists():
        if dst.is_dir() and any(dst.iterdir()):
            raise ValueError(
                f"destination {dst} is not empty and has no {manifest_name}: choose a new folder"
            )
        return {}
    try:
        manifest = json.loads(path.read_text())
        recorded = manifest["settings"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: unreadable ({exc}); remove it or choose a new destination") from None
    if recorded != settings:
        raise ValueError(f"{dst} was {made} with {recorded}, not {settings}: choose a new destination")
    return manifest


def resized_copy_settings(
    root: str | Path, train_split: str = "train", manifest_name: str = MANIFEST
) -> dict | None:
    """The manifest of a resized copy (or of prepare-data's shards, ``nepa_shards.json``) at a dataset
    root (or its train split), for the run's record."""
    for folder in (Path(root), Path(root) / train_split):
        try:
            manifest = json.loads((folder / manifest_name).read_text())
            return {"copy": str(folder), "source": manifest["source"], **manifest["settings"]}
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def resize_dataset(
    src: str | Path, dst: str | Path, short_side: int, quality: int = 90, workers: int = 1
) -> ResizeSummary:
    """Copy ``src`` to ``dst`` with every image's shorter side at most ``short_side`` pixels."""
    src, dst = Path(src), Path(dst)
    if short_side < 1:
        raise ValueError(f"--short-side: a positive number of pixels, got {short_side}")
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality: JPEG quality from 1 to 100, got {quality}")
    settings = {"short_side": short_side, "quality": quality}
    manifest = check_destination(src, dst, settings)
    dst.mkdir(parents=True, exist_ok=True)
    manifest_path = dst / MANIFEST
    manifest.update(source=str(src.resolve()), settings=settings)
    manifest_path.write_text(json.dumps(manifest, indent=1))  # before any image: a resumed copy checks it
    summary, start, jobs = ResizeSummary(), time.perf_counter(), []
    for path in sorted(p for p in src.rglob("*") if p.is_file() and INDEX_FOLDER not in p.parts):
        target = dst / path.relative_to(src)
        if target.exists():
            summary.already_done += 1
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((str(path), str(target), short_side, quality))
    with ProcessPoolExecutor(max(1, workers)) as pool:
        for path, outcome, size_in, size_out in pool.map(_resize_one, jobs, chunksize=32):
            if outcome == "resized":
                summary.resized += 1
            elif outcome == "copied":
                summary.copied += 1
            else:
                summary.unreadable.append(path)
            summary.bytes_in += size_in
            summary.bytes_out += size_out
    summary.seconds = time.perf_counter() - start
    manifest["runs"] = [*manifest.get("runs", []), asdict(summary)]
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return summary
