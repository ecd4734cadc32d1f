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

import numpy as np

from nepa_scale.data.datasets import ImageFolderDataset, Skipped
from nepa_scale.data.index import read_index
from nepa_scale.errors import DataError

SAMPLES_FILE = "samples.npz"
SHARD_LIST = "shards.json"
MANIFEST = "nepa_shards.json"
OPEN_SHARDS = 512  # per loader worker; fewer file descriptors than the usual limit of 1,024
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


def open_shard(path: Path):
    """wids' reader of one shard, through its stored index (checked first)."""
    try:
        from wids.wids_tar import TarFileReader  # optional: only data.kind=shards reads shards
    except ImportError:
        raise DataError("data.kind=shards: needs wids (pip install 'nepa-scale[shards]')") from None
    index_file = Path(f"{path}.index")
    check_shard_index(index_file)
    try:
        reader = TarFileReader(str(path), index_file=str(index_file), verbose=False)
    except OSError as exc:
        raise DataError(f"data: cannot open shard {path}: {exc}") from None
    # Samples are read in a random order: read-ahead would fetch bytes no sample asked for.
    os.posix_fadvise(reader.tar_file.fileobj.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
    return reader


class ShardDataset(ImageFolderDataset):
    """A split packed by ``prepare-data``: the same samples, labels and order as the folder it came
    from, so the same seed draws the same images with the same augmentation. Shards open on first
    use in each process (a loader worker gets its own file positions) and stay open."""

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
        self.reasons = {int(i): why for i, why in index.meta["reasons"].items()}
        self.per_shard = int(index.meta["samples_per_shard"])
        self._readers: dict[int, object] = {}
        self._pid = os.getpid()

    def _reader(self, shard: int):
        if self._pid != os.getpid():  # a forked worker: its own open files, not its parent's
            self._readers, self._pid = {}, os.getpid()
        reader = self._readers.pop(shard, None)
        if reader is None:
            if len(self._readers) >= OPEN_SHARDS:
                oldest = next(iter(self._readers))
                self._readers.pop(oldest).close()
            reader = open_shard(self.root / shard_name(shard))
        self._readers[shard] = reader  # most recently used last
        return reader

    def read_bytes(self, index: int) -> bytes:
        if self.unreadable[index]:
            raise DataError(f"{self.index.path(index)}: {self.reasons.get(index, 'unreadable')}")
        shard, position = divmod(index, self.per_shard)
        name, data = self._reader(shard).get_file(2 * position)
        if not name.startswith(sample_key(index) + "."):
            raise DataError(
                f"data: {self.root / shard_name(shard)} holds {name} where sample {index} belongs: "
                "run prepare-data again"
            )
        return data.getvalue()

    def source(self, index: int):
        return io.BytesIO(self.read_bytes(index))  # a shard that cannot be read fails loudly

    def load(self, index: int):
        if self.unreadable[index]:
            reason = f"unreadable when packed: {self.reasons.get(index, 'unknown')}"
            return Skipped(self.index.path(index), reason), int(self.labels[index])
        return super().load(index)
