"""Per-interval metrics: rank 0 appends JSON lines to metrics.jsonl (and optionally TensorBoard/W&B)."""

from __future__ import annotations

import logging
import math
import resource
import sys
import time
from typing import Any

import torch

from nepa_scale.rundir import RunDir

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks (spec sheets), used for MFU when the user gives none.
KNOWN_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def device_peak_tflops(device: torch.device, configured: float | None) -> float | None:
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in KNOWN_PEAK_TFLOPS.items() if key in name), None)


def max_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class IntervalMeter:
    """Accumulates losses and timings between two log lines."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.stats: dict[str, list[torch.Tensor]] = {}
        self.images = 0
        self.data_wait = 0.0
        self.started = time.perf_counter()

    def add(self, stats: dict[str, torch.Tensor], images: int, data_wait: float) -> None:
        """Per-micro-batch scalars (kept on the device: no host synchronisation here)."""
        for key, value in stats.items():
            self.stats.setdefault(key, []).append(value.detach().float())
        self.images += images
        self.data_wait += data_wait

    def partial(self) -> dict[str, list[float]]:
        """The losses of an interval cut short by a checkpoint (saved so a resumed run logs the same means)."""
        return {key: [v.item() for v in values] for key, values in self.stats.items()}

    def restore(self, partial: dict[str, list[float]], device: torch.device) -> None:
        for key, values in partial.items():
            self.stats[key] = [torch.tensor(v, device=device) for v in values]

    def means(self) -> dict[str, torch.Tensor]:
        return {key: torch.stack(values).mean() for key, values in self.stats.items()}

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.started, 1e-9)


class PhaseTimer:
    """Time spent between marks on the device's timeline, summed per phase name.

    On a GPU the marks are CUDA events, read only by ``totals`` (nothing waits during the step), so
    a phase is the time the GPU stream took from the previous mark to this one, idle gaps included:
    "data" is then the time the GPU waited for the next batch. On the CPU every op has finished when
    it returns, and wall-clock time is the same thing."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, Any]] = []

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self.marks = [("", self._now())]

    def mark(self, phase: str) -> None:
        self.marks.append((phase, self._now()))

    def totals(self) -> dict[str, float]:
        """Seconds per phase since ``start`` (synchronises the device once)."""
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for (_, begin), (phase, end) in zip(self.marks, self.marks[1:], strict=False):
            seconds = begin.elapsed_time(end) / 1e3 if self.cuda else end - begin
            out[phase] = out.get(phase, 0.0) + seconds
        return out


class _NoTimer(PhaseTimer):
    def __init__(self):
        super().__init__(torch.device("cpu"))

    def mark(self, phase: str) -> None:
        pass


NO_TIMER = _NoTimer()  # the training loop's timer: marks nothing


class MetricsWriter:
    def __init__(
        self, run: RunDir, is_main: bool, tensorboard: bool, wandb_project: str | None, config: dict
    ):
        self.run, self.is_main = run, is_main
        self.tb = None
        self.wandb = None
        if not is_main:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise RuntimeError(
                    "logging.tensorboard: needs the tensorboard package (pip install tensorboard)"
                ) from exc
            self.tb = SummaryWriter(log_dir=str(run.root / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError as exc:
                raise RuntimeError(
                    "logging.wandb_project: needs the wandb package (pip install wandb)"
                ) from exc
            self.wandb = wandb.init(
                project=wandb_project, name=run.root.name, dir=str(run.root), config=config, resume="allow"
            )

    def write(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.run.append_metrics(clean)
        step = record["step"]
        numeric = {k: v for k, v in clean.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if self.tb is not None:
            for key, value in numeric.items():
                if key != "step":
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({f"{record.get('kind', 'train')}/{k}": v for k, v in numeric.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def progress_bar(enabled: str, is_main: bool, total: int, initial: int):
    """A tqdm bar on interactive terminals (or when forced on); None otherwise."""
    if not is_main or enabled == "never" or (enabled == "auto" and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
