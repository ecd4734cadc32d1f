"""Time what one status poll reads of a run's log: its last train line, from the end of
metrics.jsonl (``RunDir.last_metric``) against parsing the whole file (``RunDir.read_metrics``).

Usage: python benchmarks/status_poll.py [LINES ...]. Each log is train lines shaped like the
engine's (a line per log interval) with an eval line every 100; a sweep poll reads one per run.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from nepa_scale.rundir import RunDir

TRAIN_LINE = {
    "kind": "train", "images_seen": 0, "flops_seen": 1.0e15, "flop_convention": "6N+attn", "loss": -0.41,
    "target_spread": 0.31, "lr": 1.5e-3, "grad_norm": 0.8, "img_per_s": 5200.0, "tflops_per_s": 310.0,
    "mfu": 0.31, "max_memory_gb": 41.2, "data_wait_frac": 0.01, "collapsed": False, "time": 1.7e9,
}  # fmt: skip


def best_of_three(run: RunDir, read) -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        read(run)
        times.append(time.perf_counter() - start)
    return min(times)


def whole_log(run: RunDir) -> dict:
    return [m for m in run.read_metrics() if m.get("kind") == "train"][-1]


def last_line(run: RunDir) -> dict | None:
    return run.last_metric("train")


def main(sizes: list[int]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        for lines in sizes:
            run = RunDir(Path(folder) / f"run{lines}")
            run.root.mkdir()
            for step in range(1, lines + 1):
                run.append_metrics({**TRAIN_LINE, "step": step})
                if step % 100 == 0:
                    run.append_metrics({"kind": "eval", "step": step, "val_loss": -0.4})
            assert whole_log(run) == last_line(run)
            full, tail = best_of_three(run, whole_log), best_of_three(run, last_line)
            size = run.metrics.stat().st_size / 1e6
            print(
                f"{lines:>8} lines ({size:6.1f} MB): whole log {full * 1e3:8.1f} ms, last line {tail * 1e3:6.2f} ms"
            )


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]] or [1_000, 10_000, 100_000])
