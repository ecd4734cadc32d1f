"""``nepa-scale prepare-data SRC DST``: an image folder resized (optionally) and packed into shards.

Each split (``train/``, ``val/``) is listed in the loader's order and cut into shards of
``samples_per_shard`` samples (layout: ``shards.py``). Every image is decoded as training decodes it:
one that fails is reported and packed as a ``.skipped`` marker in its place, so the shards keep the
folder's sample numbering and a run skips it as it skips the bad file in the folder. With
``--short-side`` each image is resized exactly as ``resize-data`` resizes it (the same bytes).

Interrupted packing resumes: a shard is written under a temporary name with its index and renamed
when complete, so a shard that exists is finished. A split's ``samples.npz`` is written last.
``nepa_shards.json`` records the source, the settings and each run's counts; a rerun with other
settings is refused.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from nepa_scale.data.index import FolderIndex, list_folder
from nepa_scale.data.loading import check_same_classes
from nepa_scale.data.resize import check_destination, shrink
from nepa_scale.data.shards import MANIFEST, SAMPLES_FILE, SHARD_LIST, sample_key, shard_name
from nepa_scale.errors import DataError


@dataclasses.dataclass
class PrepareSummary:
    samples: int = 0
    resized: int = 0
    shards: int = 0
    already_done: int = 0  # shards packed by an earlier, interrupted run
    unreadable: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, reason)
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0


def packed_image(data: bytes, short_side: int | None, quality: int, name: str) -> tuple[bytes | None, str]:
    """The bytes to pack for one image file (None: it cannot be decoded), and what was done or why not.

    Decoded as the loader decodes it (``convert("RGB")``): a file that fails here fails there."""
    buffer = io.BytesIO(data)
    try:
        with Image.open(buffer) as img:
            img.load()
            img.convert("RGB")
            small = shrink(img, short_side, quality) if short_side else None
    except Exception as exc:  # truncated, corrupt, not an image
        return None, f"{type(exc).__name__}: {str(exc).replace(repr(buffer), repr(name))}"
    return (small, "resized") if small is not None else (data, "packed")


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed owner and time: the same folder packs to the same bytes
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def pack_shard(job: dict) -> dict:
    """Write one shard (and wids' index of it) from its source files; returns what each sample became."""
    from wids.wids_tar import TarFileReader  # optional: prepare-data alone writes shards

    target = Path(job["target"])
    part = target.with_name(f".{target.name}.part")
    Path(f"{target}.index").unlink(missing_ok=True)  # an interrupted attempt's: wids would read it
    sizes, unreadable, resized, bytes_in = [], {}, 0, 0
    with tarfile.open(part, "w", format=tarfile.USTAR_FORMAT) as tar:
        for offset, (relative, label) in enumerate(zip(job["names"], job["labels"], strict=True)):
            index, path = job["first"] + offset, os.path.join(job["source"], relative)
            try:
                data = Path(path).read_bytes()
                payload, outcome = packed_image(data, job["short_side"], job["quality"], path)
            except OSError as exc:
                data, payload, outcome = b"", None, f"{type(exc).__name__}: {exc}"
            bytes_in += len(data)
            if payload is None:
                unreadable[index] = outcome
                _member(tar, f"{sample_key(index)}.skipped", outcome.encode())
                sizes.append(0)
            else:
                resized += outcome == "resized"
                extension = os.path.splitext(relative)[1].lower().lstrip(".")
                _member(tar, f"{sample_key(index)}.{extension}", payload)
                sizes.append(len(payload))
            _member(tar, f"{sample_key(index)}.cls", str(label).encode())
    TarFileReader(str(part), index_file=f"{target}.index", verbose=False).close()  # wids' own index
    os.replace(part, target)
    return {"sizes": sizes, "unreadable": unreadable, "resized": resized, "bytes_in": bytes_in}


def _done_shard(target: Path, first: int, count: int) -> dict:
    """What an already packed shard holds (from its index alone): its sizes and unreadable samples."""
    from wids.wids_tar import TarFileReader  # optional: prepare-data alone writes shards

    reader = TarFileReader(str(target), index_file=f"{target}.index", verbose=False)
    try:
        sizes, unreadable = [], {}
        for position in range(count):
            name = reader.fnames[2 * position]
            if name.endswith(".skipped"):
                unreadable[first + position] = reader.get_file(2 * position)[1].getvalue().decode()
                sizes.append(0)
            else:
                sizes.append(int(reader.index[2 * position][1]))
    finally:
        reader.close()
    return {"sizes": sizes, "unreadable": unreadable, "resized": 0, "bytes_in": 0}


def _pack_split(source: FolderIndex, out: Path, settings: dict, workers: int, summary: PrepareSummary):
    out.mkdir(parents=True, exist_ok=True)
    per_shard, total = settings["samples_per_shard"], len(source)
    relatives, jobs, results = source.relatives(), [], {}
    for number, first in enumerate(range(0, total, per_shard)):
        target, count = out / shard_name(number), min(per_shard, total - first)
        if target.is_file() and Path(f"{target}.index").is_file():
            results[number] = _done_shard(target, first, count)
            summary.already_done += 1
            continue
        jobs.append(
            {
                "number": number,
                "target": str(target),
                "source": str(source.root),
                "first": first,
                "names": relatives[first : first + count],
                "labels": source.labels[first : first + count].tolist(),
                "short_side": settings["short_side"],
                "quality": settings["quality"],
            }
        )
    with ProcessPoolExecutor(max(1, workers)) as pool:
        for job, result in zip(jobs, pool.map(pack_shard, jobs), strict=True):
            results[job["number"]] = result
    sizes = np.concatenate([np.asarray(results[n]["sizes"], dtype=np.int64) for n in sorted(results)])
    reasons = {i: why for n in sorted(results) for i, why in results[n]["unreadable"].items()}
    flags = np.zeros(total, dtype=bool)
    flags[list(reasons)] = True
    shards = [
        {"url": shard_name(n), "nsamples": min(per_shard, total - n * per_shard)} for n in sorted(results)
    ]
    for shard in shards:
        shard["filesize"] = (out / shard["url"]).stat().st_size
    listing = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": out.name, "shardlist": shards}
    (out / SHARD_LIST).write_text(json.dumps(listing, indent=1))
    meta = {"samples_per_shard": per_shard}  # the reasons are in the shards, in each .skipped member
    table = dataclasses.replace(source, sizes=sizes, extra={"unreadable": flags}, meta=meta)
    table.save(out / SAMPLES_FILE)
    summary.samples += total
    summary.shards += len(shards)
    summary.resized += sum(r["resized"] for r in results.values())
    summary.bytes_in += sum(r["bytes_in"] for r in results.values())
    summary.bytes_out += int(sizes.sum())
    summary.unreadable += [(source.path(i), why) for i, why in sorted(reasons.items())]


def prepare_data(
    src: str | Path,
    dst: str | Path,
    short_side: int | None = None,
    quality: int = 90,
    samples_per_shard: int = 5000,
    workers: int = 1,
    splits: tuple[str, ...] = ("train", "val"),
) -> PrepareSummary:
    """Pack ``src/<split>/<class>/<file>`` into ``dst/<split>/`` shards."""
    src, dst = Path(src), Path(dst)
    if short_side is not None and short_side < 1:
        raise ValueError(f"--short-side: a positive number of pixels, got {short_side}")
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality: JPEG quality from 1 to 100, got {quality}")
    if samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard: a positive number, got {samples_per_shard}")
    missing = [split for split in splits if not (src / split).is_dir()]
    if src.is_dir() and missing:
        raise ValueError(f"source split not found: {src / missing[0]} (choose the splits with --splits)")
    settings = {"short_side": short_side, "quality": quality, "samples_per_shard": samples_per_shard}
    manifest = check_destination(src, dst, settings, MANIFEST, made="packed")
    try:
        import wids  # noqa: F401  # optional: checked before any work, for a one-line refusal
    except ImportError:
        raise ValueError("prepare-data needs wids (pip install 'nepa-scale[shards]')") from None
    listed = {split: list_folder(src / split) for split in splits}
    for split in splits[1:]:
        check_same_classes(listed[splits[0]].classes, listed[split].classes, src, splits[0], split)
    dst.mkdir(parents=True, exist_ok=True)
    manifest.update(source=str(src.resolve()), settings=settings)
    (dst / MANIFEST).write_text(json.dumps(manifest, indent=1))  # before any shard: a resumed run checks it
    summary, start = PrepareSummary(), time.perf_counter()
    for split in splits:
        if not len(listed[split]):
            raise DataError(f"data: no images under {src / split}/<class>/")
        _pack_split(listed[split], dst / split, settings, workers, summary)
    summary.seconds = time.perf_counter() - start
    record = dataclasses.asdict(summary)
    record["unreadable"] = [f"{path}: {reason}" for path, reason in summary.unreadable]
    manifest["runs"] = [*manifest.get("runs", []), record]
    (dst / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return summary
