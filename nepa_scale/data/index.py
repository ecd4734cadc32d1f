"""The list of an image folder (relative paths, labels, file sizes), built once and reused.

Listing ImageNet's 1,281,167 files takes about 40 s per process on a local disk and far longer on a
shared file system, where every rank of every run listing the tree at every start is the load
administrators ask users to avoid. So the list is stored once per folder and reused:

- **Across ranks**: in a multi-process run, rank 0 lists (or checks the stored list) and the others
  read the file it names, handed over through the run's process group (``shared_index``).
- **Across restarts and runs**: the list is stored as ``<name>-<hash of the resolved path>.npz``
  (numpy, no pickle), beside the data (``<data.root>/.nepa_index/``) when that folder is writable,
  else in the user's cache (``$XDG_CACHE_HOME/nepa-scale/index``), or in ``data.index_dir``.
  Each listing is logged to ``listings.log`` beside it (host, pid, rank, files, seconds).
- **Staleness** is checked without a walk: the stored list keeps the modification time of the folder
  and of each class folder. A file added, removed or renamed changes its folder's time, so the check
  is one ``stat`` per class folder (1,001 for ImageNet). A changed tree is listed again and says so
  in one line naming the folder; a stale list is never used. Not seen: a file's contents rewritten
  in place under the same name (the folder's time does not change), and a change made within the
  timestamp resolution of a file system that keeps whole seconds (a list whose folder times are
  that recent is used but not stored).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from nepa_scale.errors import DataError

log = logging.getLogger("nepa_scale.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
INDEX_FORMAT = 1
INDEX_FOLDER = ".nepa_index"  # beside the data: hidden, and skipped by resize-data and prepare-data
LISTINGS_LOG = "listings.log"
LISTING_THREADS = 16  # class folders listed at once: a shared file system answers each call slowly
COARSE_SLACK_NS = 2 * 10**9


def suffix(name: str) -> str:
    """``Path(name).suffix``, without building a Path per file."""
    dot = name.rfind(".")
    return name[dot:] if 0 < dot < len(name) - 1 else ""


@dataclasses.dataclass(frozen=True)
class FolderIndex:
    """``root/<class>/<file>`` as arrays: the relative paths one after another in ``names`` (utf-8,
    cut at ``offsets``), with their labels and sizes; no Python object per file, so a loader
    worker's copy of a million-file list stays shared with its parent."""

    root: Path
    classes: tuple[str, ...]
    names: np.ndarray  # uint8
    offsets: np.ndarray  # int64, one more than there are files
    labels: np.ndarray  # int64
    sizes: np.ndarray  # int64, bytes (-1: could not be read)
    stamps: dict  # modification times (ns): {"root": t, "classes": [t, ...]}, for the staleness check
    extra: dict = dataclasses.field(default_factory=dict)  # more arrays (shards: which are unreadable)
    meta: dict = dataclasses.field(default_factory=dict)  # more facts (shards: their layout)
    stored_at: Path | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def relative(self, i: int) -> str:
        return self.names[self.offsets[i] : self.offsets[i + 1]].tobytes().decode()

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.relative(i))

    def relatives(self) -> list[str]:
        blob, offsets = self.names.tobytes(), self.offsets.tolist()
        return [blob[a:b].decode() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]

    def digest(self) -> str:
        """What the samples are: their relative paths and labels (not where the folder is)."""
        h = hashlib.sha256(self.names.tobytes())
        h.update(self.offsets.tobytes())
        h.update(self.labels.tobytes())
        h.update(json.dumps(self.classes).encode())
        return h.hexdigest()[:16]

    def save(self, path: Path) -> None:
        """Write atomically: a reader sees the old file or the whole new one."""
        meta = {"format": INDEX_FORMAT, "classes": list(self.classes), "stamps": self.stamps, **self.meta}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            np.savez(
                handle,
                names=self.names,
                offsets=self.offsets,
                labels=self.labels,
                sizes=self.sizes,
                meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                **self.extra,
            )
        os.replace(tmp, path)


def read_index(path: Path, root: Path) -> FolderIndex:
    """A stored list, its paths relative to ``root``."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {key: stored[key] for key in stored.files}
        meta = json.loads(arrays.pop("meta").tobytes())
        if meta.pop("format") != INDEX_FORMAT:
            raise ValueError("another format")
        core = {key: arrays.pop(key) for key in ("names", "offsets", "labels", "sizes")}
        return FolderIndex(
            Path(root),
            tuple(meta.pop("classes")),
            stamps=meta.pop("stamps"),
            extra=arrays,
            meta=meta,
            stored_at=path,
            **core,
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: unreadable index ({type(exc).__name__}: {exc}); remove it") from None


def read_index_meta(path: Path) -> dict:
    """The facts of a stored list (its classes, stamps, layout) without its arrays."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            return json.loads(stored["meta"].tobytes())
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: unreadable index ({type(exc).__name__}: {exc})") from None


def _class_stamps(root: Path) -> tuple[int, dict[str, int]]:
    """The folder's modification time and each class folder's (symbolic links followed, as listing does)."""
    try:
        root_time = os.stat(root).st_mtime_ns
        with os.scandir(root) as entries:
            classes = {e.name: e.stat().st_mtime_ns for e in entries if e.is_dir()}
    except OSError as exc:
        raise DataError(f"data: cannot list {root}: {exc}") from None
    return root_time, classes


def _list_class(folder: Path) -> list[tuple[str, int]]:
    out = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if suffix(entry.name).lower() in IMAGE_EXTENSIONS:
                try:
                    size = entry.stat().st_size
                except OSError:  # a broken link: listed as today, reported when it is read
                    size = -1
                out.append((entry.name, size))
    return sorted(out)


def list_folder(root: Path) -> FolderIndex:
    """Walk ``root/<class>/`` (classes and files in sorted order: what the sampler indexes)."""
    root = Path(root)
    root_time, class_times = _class_stamps(root)
    classes = sorted(class_times)
    try:
        with ThreadPoolExecutor(LISTING_THREADS) as pool:
            listed = list(pool.map(_list_class, [root / name for name in classes]))
    except OSError as exc:
        raise DataError(f"data: cannot list {root}: {exc}") from None
    blob = bytearray()
    offsets, labels, sizes = [0], [], []
    for label, (name, files) in enumerate(zip(classes, listed, strict=True)):
        for file, size in files:
            blob += f"{name}/{file}".encode()
            offsets.append(len(blob))
            labels.append(label)
            sizes.append(size)
    return FolderIndex(
        root,
        tuple(classes),
        np.frombuffer(bytes(blob), dtype=np.uint8),
        np.asarray(offsets, dtype=np.int64),
        np.asarray(labels, dtype=np.int64),
        np.asarray(sizes, dtype=np.int64),
        {"root": root_time, "classes": [class_times[name] for name in classes]},
    )


def changed_classes(index: FolderIndex, root: Path) -> list[str] | None:
    """What changed since ``index`` was listed: [] nothing, None the set of class folders itself, else
    the class folders whose contents changed. One stat per class folder, no walk."""
    try:
        if os.stat(root).st_mtime_ns != index.stamps["root"]:
            return None
        now = [os.stat(root / name).st_mtime_ns for name in index.classes]
    except OSError:
        return None
    return [name for name, a, b in zip(index.classes, now, index.stamps["classes"], strict=True) if a != b]


def _recent_on_coarse_clock(stamps: dict, started_ns: int) -> bool:
    """Times in whole seconds (a file system that keeps no finer ones) within the slack of the listing:
    a change in the same second would leave them as they are, so such a list is not stored."""
    times = [stamps["root"], *stamps["classes"]]
    return all(t % 10**9 == 0 for t in times) and max(times) > started_ns - COARSE_SLACK_NS


def index_locations(root: Path, index_dir: str | Path | None) -> list[Path]:
    """Where the list of ``root`` is stored, in the order tried: ``index_dir`` alone when it is set,
    else beside the data, then the user's cache."""
    resolved = root.resolve()
    name = f"{resolved.name}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:12]}.npz"
    if index_dir is not None:
        return [Path(index_dir) / name]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nepa-scale" / "index"
    return [resolved.parent / INDEX_FOLDER / name, cache / name]


def _store(index: FolderIndex, places: list[Path], seconds: float, rank: int) -> Path | None:
    """Write the list to the first place that takes it, and log the listing there; None if none does."""
    for path in places:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            index.save(path)
            line = (
                f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {socket.gethostname()} pid {os.getpid()} rank {rank}: "
                f"listed {index.root.resolve()} ({len(index)} files, {len(index.classes)} classes) "
                f"in {seconds:.2f} s\n"
            )
            with open(path.parent / LISTINGS_LOG, "a") as handle:
                handle.write(line)
            return path
        except OSError:
            continue
    return None


def _describe_change(old: FolderIndex, new: FolderIndex, classes: list[str] | None) -> str:
    before, after = set(old.relatives()), set(new.relatives())
    added, removed = sorted(after - before), sorted(before - after)
    if added or removed:
        counts = [
            f"{len(files)} file(s) {what}"
            for files, what in ((added, "added"), (removed, "removed"))
            if files
        ]
        return f"{' and '.join(counts)}, e.g. {(added or removed)[0]}"
    if classes is None:
        return "its class folders were modified"
    return f"class folder(s) modified: {', '.join(classes[:3])}"


def cached_or_listed(root: Path, index_dir: str | Path | None = None, rank: int = 0) -> FolderIndex:
    """The stored list of ``root`` when it is current, else a new listing, stored for the next time."""
    root = Path(root)
    known = _MEMO.get(str(root.resolve()))
    if known is not None and changed_classes(known, root) == []:
        return dataclasses.replace(known, root=root)
    places = index_locations(root, index_dir)
    stale: tuple[FolderIndex, list[str] | None] | None = None
    for path in places:
        if not path.is_file():
            continue
        try:
            index = read_index(path, root)
        except DataError as exc:
            log.warning("%s: listing again", exc)
            continue
        changed = changed_classes(index, root)
        if changed == []:
            return index
        stale = stale or (index, changed)
    started, clock = time.time_ns(), time.perf_counter()
    index = list_folder(root)
    seconds = time.perf_counter() - clock
    if stale is not None:
        log.warning(
            "data: %s changed since it was indexed (%s); listed again",
            root,
            _describe_change(stale[0], index, stale[1]),
        )
    if changed_classes(index, root) != []:
        log.warning("data: %s changed while it was listed: this list is used but not stored", root)
        return index
    if _recent_on_coarse_clock(index.stamps, started):
        return index
    stored = _store(index, places, seconds, rank)
    if stored is None:
        log.warning(
            "data: could not store the list of %s in %s: every start lists it again (set data.index_dir)",
            root,
            " or ".join(str(p.parent) for p in places),
        )
    return dataclasses.replace(index, stored_at=stored)


_MEMO: dict[str, FolderIndex] = {}  # this process's lists, by resolved folder, and by folder and digest


def shared_index(root: str | Path, index_dir: str | Path | None = None) -> FolderIndex:
    """The list of ``root`` for every rank of a run: rank 0 checks or builds the stored list and hands
    its path to the others through the process group, which read it (a single process: its own)."""
    import torch.distributed as dist  # heavy: torch, which the folder listing alone does not need

    root = Path(root)
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return _remembered(cached_or_listed(root, index_dir))
    rank = dist.get_rank()
    message: list = [None]
    if rank == 0:
        try:
            index = _remembered(cached_or_listed(root, index_dir, rank))
            message = [("index", str(index.stored_at) if index.stored_at else None, index.digest())]
        except Exception as exc:  # said to the other ranks too, which would otherwise wait for a list
            why = (
                str(exc) if isinstance(exc, DataError) else f"data: listing {root} failed on rank 0: {exc!r}"
            )
            dist.broadcast_object_list([("error", why, None)], src=0)
            raise
    dist.broadcast_object_list(message, src=0)
    if rank == 0:
        return index
    kind, value, digest = message[0]
    if kind == "error":
        raise DataError(value)
    known = _MEMO.get(f"{root.resolve()}:{digest}")
    if known is not None:
        return dataclasses.replace(known, root=root)
    return _remembered(read_index(Path(value), root) if value else list_folder(root))


def _remembered(index: FolderIndex) -> FolderIndex:
    resolved = str(index.root.resolve())
    _MEMO[resolved] = _MEMO[f"{resolved}:{index.digest()}"] = index
    return index
