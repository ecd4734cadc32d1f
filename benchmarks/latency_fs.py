"""A read-only FUSE view of a folder that waits a fixed time on every metadata operation and counts
every operation: a stand-in for a shared file system's metadata server (Lustre's MDS, an NFS server),
which this machine's kernel cannot mount.

    /usr/bin/python3 benchmarks/latency_fs.py SOURCE MOUNTPOINT --latency-ms 1 --counts counts.json

Needs Debian's python3-fusepy (libfuse2); run as root or with FUSE allowed. Every operation but
``read`` (lookups through getattr, opendir, readdir, open, flush, release, getxattr, statfs...) sleeps
``--latency-ms`` first. The counts (one per call that reached this process: the kernel's own caches
answer the rest, for up to a second by default, as an NFS client's attribute cache does) are written
to ``--counts`` when the file system is unmounted (``umount MOUNTPOINT``).
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import os
import resource
import threading
import time

from fusepy import FUSE, FuseOSError, Operations

DATA = ("read", "init", "destroy")  # every other operation is a metadata operation: it waits


class LatencyFS(Operations):
    def __init__(self, source: str, latency_s: float, counts_path: str):
        self.source, self.latency_s, self.counts_path = source, latency_s, counts_path
        self.counts: collections.Counter = collections.Counter()
        self.mutex = threading.Lock()

    def __call__(self, op, path, *args):
        with self.mutex:
            self.counts[op] += 1
        if op not in DATA and self.latency_s:
            time.sleep(self.latency_s)
        return super().__call__(op, path, *args)

    def _real(self, path: str) -> str:
        return os.path.join(self.source, path.lstrip("/"))

    def getattr(self, path, fh=None):
        try:
            st = os.lstat(self._real(path))
        except OSError as exc:
            raise FuseOSError(exc.errno) from None
        keys = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime", "st_mtime", "st_ctime")
        return {key: getattr(st, key) for key in keys}

    def readdir(self, path, fh):
        return [".", "..", *os.listdir(self._real(path))]

    def readlink(self, path):
        return os.readlink(self._real(path))

    def access(self, path, amode):
        if not os.access(self._real(path), amode):
            raise FuseOSError(errno.EACCES)

    def statfs(self, path):
        st = os.statvfs(self._real(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag")
        return {key: getattr(st, key) for key in (*keys, "f_frsize", "f_namemax")}

    def open(self, path, flags):
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise FuseOSError(errno.EROFS)
        return os.open(self._real(path), os.O_RDONLY)

    def read(self, path, size, offset, fh):
        data = os.pread(fh, size, offset)
        with self.mutex:
            self.counts["read_bytes"] += len(data)
        return data

    def release(self, path, fh):
        os.close(fh)

    def destroy(self, path):
        usage = resource.getrusage(resource.RUSAGE_SELF)
        counts = {**self.counts, "server_cpu_s": usage.ru_utime + usage.ru_stime}
        with open(self.counts_path, "w") as handle:
            json.dump(counts, handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    parser.add_argument("--latency-ms", type=float, default=1.0)
    parser.add_argument("--counts", required=True)
    args = parser.parse_args()
    fs = LatencyFS(os.path.abspath(args.source), args.latency_ms / 1e3, args.counts)
    FUSE(fs, args.mountpoint, foreground=True, ro=True, nothreads=False)


if __name__ == "__main__":
    main()
