"""Data at cluster scale, measured (docs/performance.md, "Data at cluster scale").

    python benchmarks/data_at_scale.py tree DIR --per-class 128         # 1,000 class folders of empty files
    python benchmarks/data_at_scale.py startup DIR/train                 # start-up per rank, timed and counted
    python benchmarks/data_at_scale.py photos DIR --images 2048          # ImageNet-like JPEGs, resized copy, shards
    python benchmarks/data_at_scale.py rate DIR --measure 384            # decode + augment img/s on one core
    python benchmarks/data_at_scale.py epoch ROOT --kind shards          # one epoch in the sampler's order

``startup`` runs each way of starting in a fresh process, once timed and once under ``strace -c -f``
(the file-system calls it makes, less those of a process that only imports the same modules): the
folder listing as it was before the index, the index's first start (rank 0 lists and stores it),
a later start on rank 0 (load and staleness check) and on the other ranks (load), and the shards'
sample table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nepa_scale.config import DataConfig
from nepa_scale.data import ResumableBatchSampler, batch_loader, build_dataset, check_training_data
from nepa_scale.data.index import FolderIndex, index_locations, list_folder

FS_CALLS = (
    "openat",
    "open",
    "newfstatat",
    "statx",
    "stat",
    "lstat",
    "fstat",
    "getdents64",
    "readlink",
    "access",
)

STARTS = {
    "none": "",
    "folder listing (before)": """
from nepa_scale.data.index import IMAGE_EXTENSIONS
classes = sorted(p.name for p in root.iterdir() if p.is_dir())
samples = [(str(path), label) for label, name in enumerate(classes)
           for path in sorted((root / name).iterdir()) if path.suffix.lower() in IMAGE_EXTENSIONS]
n = len(samples)""",
    "index: first start (rank 0 lists, stores)": "n = len(cached_or_listed(root, sys.argv[2]))",
    "index: later start, rank 0 (load + check)": "n = len(cached_or_listed(root, sys.argv[2]))",
    "index: later start, other ranks (load)": "n = len(read_index(index_locations(root, sys.argv[2])[0], root))",
    "shards: sample table (every rank)": "n = len(ShardDataset(sys.argv[3], None))",
    "shards: sample table + every shard's index (every rank)": """
dataset = ShardDataset(sys.argv[3], None)
dataset._shard(0)
n = len(dataset)""",
}
PRELUDE = """
import sys, time
from pathlib import Path
from nepa_scale.data.index import cached_or_listed, index_locations, read_index
from nepa_scale.data.shards import ShardDataset
root, n = Path(sys.argv[1]), 0
start = time.perf_counter()
"""


def strace_counts(code: str, args: list[str]) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".strace") as out:
        subprocess.run(["strace", "-c", "-f", "-o", out.name, sys.executable, "-c", code, *args], check=True)
        counts = {}
        for line in Path(out.name).read_text().splitlines():
            fields = line.split()
            if len(fields) >= 5 and fields[-1] in FS_CALLS and re.fullmatch(r"\d+", fields[3]):
                counts[fields[-1]] = int(fields[3])
        return counts


def startup(args) -> None:
    root = Path(args.root)
    index_dir = Path(tempfile.mkdtemp(prefix="nepa-index-"))
    shards = Path(args.shards) / root.name if args.shards else index_dir / "shards"
    if not args.shards:  # the sample table alone (no shards to open)
        index = list_folder(root)
        shards.mkdir()
        meta = {"samples_per_shard": 5000}
        unreadable = {"unreadable": torch.zeros(len(index), dtype=torch.bool).numpy()}
        table = FolderIndex(
            shards,
            index.classes,
            index.names,
            index.offsets,
            index.labels,
            index.sizes,
            index.stamps,
            unreadable,
            meta,
        )
        table.save(shards / "samples.npz")
    results, base = {}, None
    for name, body in STARTS.items():
        if "every shard" in name and not args.shards:
            continue
        if name.startswith("index: first"):
            for path in index_locations(root, index_dir):
                path.unlink(missing_ok=True)
        code = PRELUDE + body + "\nprint(time.perf_counter() - start, n)"
        argv = [str(root), str(index_dir), str(shards)]
        times = []
        for _ in range(args.repeat):
            if name.startswith("index: first"):
                index_locations(root, index_dir)[0].unlink(missing_ok=True)
            out = subprocess.run(
                [sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True
            )
            times.append(float(out.stdout.split()[0]))
        if name.startswith("index: first"):
            index_locations(root, index_dir)[0].unlink(missing_ok=True)
        counts = strace_counts(code, argv)
        if name == "none":
            base = counts
            continue
        calls = {k: v - base.get(k, 0) for k, v in counts.items() if v - base.get(k, 0)}
        results[name] = {"seconds": sorted(times), "files": int(out.stdout.split()[1]), "calls": calls}
        print(
            f"{name}: {min(times):.3f} s (of {args.repeat}), {sum(calls.values())} fs calls {calls}",
            flush=True,
        )
    print(json.dumps({"root": str(root), "load": os.getloadavg(), "results": results}))


def make_tree(args) -> None:
    for c in range(args.classes):
        folder = Path(args.dir) / "train" / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(args.per_class):
            (folder / f"n{c:08d}_{i}.JPEG").touch()


def photos(args) -> None:
    from loader import load_photos, write_photos  # benchmarks/loader.py: ImageNet-like JPEGs

    from nepa_scale.data.prepare import prepare_data
    from nepa_scale.data.resize import resize_dataset

    root = Path(args.dir)
    write_photos(root / "folder", args.images, load_photos(None))
    resize_dataset(root / "folder", root / "folder256", 256, workers=os.cpu_count() or 1)
    for name, side in (("shards", None), ("shards256", 256)):
        prepare_data(
            root / "folder", root / name, side, samples_per_shard=args.per_shard, workers=os.cpu_count() or 1
        )


def rate(args) -> None:
    """Images per second of CPU time on one core (torch one thread, no worker processes): decode +
    RandomResizedCrop + flip, in the sampler's random order; CPU time, so that other work on a shared
    machine does not count (wall-clock rates beside it)."""
    torch.set_num_threads(1)
    root, names = Path(args.dir), ("folder", "shards", "folder256", "shards256")
    datasets, out = {}, {name: {"cpu": [], "wall": []} for name in names}
    for name in names:
        kind = "shards" if name.startswith("shards") else "imagefolder"
        datasets[name] = build_dataset(DataConfig(kind=kind, root=str(root / name)), "train", 224, train=True)
    sampler = ResumableBatchSampler(len(datasets["folder"]), 32, 32, seed=1)
    draws = [d for batch in sampler for d in batch][: args.measure]
    for _ in range(args.repeat):
        for name in names:
            dataset = datasets[name]
            dataset[draws[0]]
            cpu, wall = time.process_time(), time.perf_counter()
            for draw in draws:
                dataset[draw]
            out[name]["cpu"].append(len(draws) / (time.process_time() - cpu))
            out[name]["wall"].append(len(draws) / (time.perf_counter() - wall))
    for name in names:
        print(
            f"{name}: {max(out[name]['cpu']):.0f} img/s per core (CPU time), {max(out[name]['wall']):.0f} wall",
            flush=True,
        )
    print(json.dumps({"load": os.getloadavg(), "img_per_s": out}))


def cpu_seconds() -> float:
    """CPU time of this process and of its children that ended (the loader's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def epoch(args) -> None:
    """One epoch of the train split in the sampler's order through a DataLoader with worker processes."""
    torch.set_num_threads(1)
    clock = time.perf_counter()
    dataset = build_dataset(
        DataConfig(kind=args.kind, root=args.root, index_dir=args.index_dir), "train", 224, True
    )
    built = time.perf_counter() - clock
    if args.start_only:
        print(
            json.dumps(
                {"host": os.uname().nodename, "kind": args.kind, "start_s": built, "load": os.getloadavg()}
            )
        )
        return
    check_training_data(dataset, 32)  # as the trainer does: the parent reads first (shards: opens them)
    sampler = ResumableBatchSampler(len(dataset), 32, 32, seed=args.seed)
    cpu, start, images = cpu_seconds(), time.perf_counter(), 0
    for batch in batch_loader(dataset, sampler, args.workers, args.seed, pin_memory=False):
        images += len(batch.labels)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    host = os.uname().nodename
    print(
        json.dumps(
            {
                "host": host,
                "kind": args.kind,
                "images": images,
                "seconds": seconds,
                "img_per_s": images / seconds,
                "img_per_cpu_s": images / cpu,
                "load": os.getloadavg(),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tree = sub.add_parser("tree")
    tree.add_argument("dir")
    tree.add_argument("--classes", type=int, default=1000)
    tree.add_argument("--per-class", type=int, default=128)
    start = sub.add_parser("startup")
    start.add_argument("root")
    start.add_argument("--repeat", type=int, default=3)
    start.add_argument(
        "--shards", default=None, help="prepare-data's shards of the tree (else a table alone)"
    )
    ph = sub.add_parser("photos")
    ph.add_argument("dir")
    ph.add_argument("--images", type=int, default=2048)
    ph.add_argument("--per-shard", type=int, default=256)
    rt = sub.add_parser("rate")
    rt.add_argument("dir")
    rt.add_argument("--measure", type=int, default=384)
    rt.add_argument("--repeat", type=int, default=2)
    ep = sub.add_parser("epoch")
    ep.add_argument("root")
    ep.add_argument("--kind", default="imagefolder")
    ep.add_argument("--workers", type=int, default=2)
    ep.add_argument("--seed", type=int, default=0)
    ep.add_argument("--index-dir", default=None)
    ep.add_argument("--start-only", action="store_true", help="build the dataset (list or load) and stop")
    args = parser.parse_args()
    {"tree": make_tree, "startup": startup, "photos": photos, "rate": rate, "epoch": epoch}[args.command](
        args
    )


if __name__ == "__main__":
    main()
