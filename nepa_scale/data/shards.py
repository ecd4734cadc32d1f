"""Image folders packed into tar shards (``nepa-scale prepare-data``), read by random access.

The layout (one folder per split, e.g. ``DST/train/``), WebDataset's conventions throughout, so any
tar or WebDataset tool reads it too:

- ``shard-000000.tar`` ...: ``samples_per_shard`` samples each, in the folder's order (sorted
  classes, sorted files). Sample ``i`` is the members ``{i:09d}.<ext>`` (its image's bytes, resized
  or as they were) and ``{i:09d}.cls`` (its label); an image that could not be decoded when it was
  packed is ``{i:09d}.skipped`` (the reason) instead, and is skipped at training as a bad file in a
  folder is.
- ``shard-000000.tar.index``: each member's offset and size, in wids' own index format, so a
  reader seeks straight to a sample and never scans a shard.
- ``shards.json``: the shard list in wids' format (``wids.ShardListDataset`` reads it).
- ``samples.npz``: the folder's list (``index.FolderIndex``: relative paths, labels, packed sizes,
  which samples were unreadable): what the sampler and the probes need without opening a shard.

wids (https://github.com/webdataset/webdataset, the indexed reader of WebDataset's author) is
optional (``pip install 'nepa-scale[shards]'``). Its index files are pickles; each is checked to
hold nothing but member names and a numpy array before wids reads it, so a crafted index cannot
run code.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import NamedTuple

import numpy as np

from nepa_scale.data.datasets import ImageFolderDataset, Skipped
from nepa_scale.data.index import read_index
from nepa_scale.errors import DataError

SAMPLES_FILE = "samples.npz"
SHARD_LIST = "shards.json"
MANIFEST = "nepa_shards.json"
OPEN_SHARDS = 512  # per process; fewer file descriptors than the usual limit of 1,024
_SAFE_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:09d}"


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a shard index")
        return super().find_class(module, name)


def check_shard_index(path: Path) -> None:
    """A wids index holds (member names, an array of offsets and sizes) and nothing else."""
    try:
        names, offsets = _IndexUnpickler(io.BytesIO(path.read_bytes())).load()
        if not all(isinstance(name, str) for name in names) or np.asarray(offsets).shape != (len(names), 2):
            raise ValueError("not a list of names with their offsets and sizes")
    except Exception as exc:
        raise DataError(
            f"{path}: not a shard index ({type(exc).__name__}: {exc}); run prepare-data again"
        ) from None


class OpenShard(NamedTuple):
    fd: int  # read with os.pread: no file position, so forked loader workers share it safely
    images: np.ndarray  # (samples, 2): each sample's image member's offset and size in the tar


def open_shard(path: Path, first: int, count: int) -> OpenShard:
    """One shard through wids' stored index (checked first), its members checked to be samples
    ``first`` to ``first + count - 1``."""
    try:
        from wids.wids_tar import TarFileReader  # optional: only data.kind=shards reads shards
    except ImportError:
        raise DataError("data.kind=shards: needs wids (pip install 'nepa-scale[shards]')") from None
    index_file = Path(f"{path}.index")
    check_shard_index(index_file)
    try:
        with open(path, "rb", buffering=0) as handle:  # one open (tarfile by name tries each compression)
            reader = TarFileReader(handle, index_file=str(index_file), verbose=False)
            fd = os.dup(handle.fileno())
    except OSError as exc:
        raise DataError(f"data: cannot open shard {path}: {exc}") from None
    names = reader.fnames[0 : 2 * count : 2]
    wrong = next(
        (p for p, name in enumerate(names) if not name.startswith(sample_key(first + p) + ".")), None
    )
    if len(names) != count or wrong is not None:
        os.close(fd)
        where = (
            f"{names[wrong]} where sample {first + wrong} belongs"
            if wrong is not None
            else f"{len(names)} samples"
        )
        raise DataError(f"data: {path} holds {where}: run prepare-data again")
    # Samples are read in a random order: read-ahead would fetch bytes no sample asked for.
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    return OpenShard(fd, np.asarray(reader.index, dtype=np.int64)[0 : 2 * count : 2].copy())


class ShardDataset(ImageFolderDataset):
    """A split packed by ``prepare-data``: the same samples, labels and order as the folder it came
    from, so the same seed draws the same images with the same augmentation.

    The first read in a process opens every shard (up to ``OPEN_SHARDS``; more are opened as needed
    and the least recently used closed): loader workers forked from it inherit the open files, so an
    epoch opens nothing; a worker started with spawn or forkserver opens its own."""

    def __init__(self, root: str | Path, transform, decode_on_device: bool = False):
        root = Path(root)
        table = root / SAMPLES_FILE
        if not table.is_file():
            raise DataError(
                f"data: {root} holds no prepared shards ({SAMPLES_FILE}): run nepa-scale prepare-data"
            )
        index = read_index(table, root)
        super().__init__(root, transform, decode_on_device, index=index)
        self.unreadable = index.extra["unreadable"]
        self.per_shard = int(index.meta["samples_per_shard"])
        self.shard_count = -(-len(index) // self.per_shard)
        self._shards: dict[int, OpenShard] = {}

    def __getstate__(self) -> dict:  # a spawned worker opens its own files
        return {**self.__dict__, "_shards": {}}

    def __del__(self) -> None:
        for shard in getattr(self, "_shards", {}).values():
            try:
                os.close(shard.fd)
            except OSError:
                pass

    def _open(self, number: int) -> OpenShard:
        first = number * self.per_shard
        return open_shard(self.root / shard_name(number), first, min(self.per_shard, len(self) - first))

    def _shard(self, number: int) -> OpenShard:
        shard = self._shards.pop(number, None)
        if shard is None:
            if not self._shards and self.shard_count <= OPEN_SHARDS:
                self._shards = {n: self._open(n) for n in range(self.shard_count) if n != number}
            elif len(self._shards) >= OPEN_SHARDS:
                os.close(self._shards.pop(next(iter(self._shards))).fd)
            shard = self._open(number)
        self._shards[number] = shard  # most recently used last
        return shard

    def _member(self, index: int) -> bytes:
        """Sample ``index``'s first member: its image, or why it could not be packed."""
        number, position = divmod(index, self.per_shard)
        shard = self._shard(number)
        offset, size = shard.images[position]
        data = os.pread(shard.fd, int(size), int(offset))
        if len(data) != size:
            raise DataError(
                f"data: {self.root / shard_name(number)} is shorter than its index: run prepare-data again"
            )
        return data

    def read_bytes(self, index: int) -> bytes:
        if self.unreadable[index]:
            raise DataError(f"{self.index.path(index)}: {self._member(index).decode()}")
        return self._member(index)

    def source(self, index: int):
        return io.BytesIO(self.read_bytes(index))  # a shard that cannot be read fails loudly

    def load(self, index: int):
        if self.unreadable[index]:
            reason = f"unreadable when packed: {self._member(index).decode()}"
            return Skipped(self.index.path(index), reason), int(self.labels[index])
        return super().load(index)
