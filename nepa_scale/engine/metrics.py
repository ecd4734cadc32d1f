"""Per-interval metrics: rank 0 appends JSON lines to metrics.jsonl (and optionally TensorBoard/W&B)."""

from __future__ import annotations

import logging
import math
import resource
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from nepa_scale.config import LoggingConfig
from nepa_scale.engine.distributed import World
from nepa_scale.engine.settings import check_loggers
from nepa_scale.rundir import RunDir, images_seen, write_json_atomic

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


def train_record(
    meter: IntervalMeter,
    world: World,
    done: int,
    global_batch: int,
    flops_per_image: float,
    flop_convention: str,
    peak_tflops: float | None,
    lr: float,
    grad_norm: float | None,
) -> dict[str, Any]:
    """The train line of metrics.jsonl for the interval ending at step ``done``: the interval's
    means averaged over ranks, throughput and MFU (a collective when world_size > 1)."""
    means = meter.means()
    keys = sorted(means)
    stats = torch.stack([*(means[k] for k in keys), torch.tensor(float(meter.images), device=world.device)])
    if world.world_size > 1:
        dist.all_reduce(stats)
        stats[:-1] /= world.world_size
    elapsed = meter.elapsed()
    images = stats[-1].item()
    img_per_s = images / elapsed
    tflops = img_per_s * flops_per_image / 1e12
    seen = images_seen(done, global_batch)
    return {
        "kind": "train",
        "step": done,
        "images_seen": seen,
        "flops_seen": seen * flops_per_image,
        "flop_convention": flop_convention,
        **{key: stats[i].item() for i, key in enumerate(keys)},
        "lr": lr,
        "grad_norm": grad_norm,
        "img_per_s": img_per_s,
        "tflops_per_s": tflops,
        "mfu": tflops / peak_tflops if peak_tflops else None,
        "max_memory_gb": max_memory_gb(world.device),
        "data_wait_frac": min(1.0, meter.data_wait / elapsed),
        "images_in_interval": int(images),  # readable images trained on, all ranks
        "time": time.time(),
    }


class MetricsWriter:
    """Rank 0 appends each record to metrics.jsonl (and TensorBoard / W&B when asked for)."""

    def __init__(
        self,
        run: RunDir,
        is_main: bool,
        logging_config: LoggingConfig,
        config: dict,
        global_batch: int,
        flops_per_image: float,
    ):
        self.run, self.is_main = run, is_main
        self.global_batch, self.flops_per_image = global_batch, flops_per_image
        self.tb = None
        self.wandb = None
        if not is_main:
            return
        check_loggers(logging_config)  # the trainer checked it before the engine; a caller may not have
        if logging_config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard

            self.tb = SummaryWriter(log_dir=str(run.root / "tensorboard"))
        wandb_project = logging_config.wandb_project
        if wandb_project:
            import wandb  # optional: wandb

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

    def write_eval(self, step: int, values: dict[str, Any]) -> None:
        """An evaluation line (held-out loss, accuracies, probes) at ``step``."""
        if not values:
            return
        seen = images_seen(step, self.global_batch)
        self.write(
            {
                "kind": "eval",
                "step": step,
                "images_seen": seen,
                "flops_seen": seen * self.flops_per_image,
                **values,
                "time": time.time(),
            }
        )

    def write_record(self, name: str, record: dict[str, Any]) -> None:
        """A task's fuller record of its newest evaluation, as RUN_DIR/``name`` (replaced each time)."""
        if self.is_main:
            write_json_atomic(self.run.root / name, record)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class Progress:
    """What a person watching the run sees (rank 0): a tqdm bar on an interactive terminal (or with
    ``logging.progress: always``); otherwise, as in a batch job's log, a line per log interval at
    most every ``every_s`` seconds, and always the first and the last. ``never``: neither."""

    def __init__(self, enabled: str, is_main: bool, total: int, initial: int, every_s: float = 10.0):
        self.total, self.every_s = total, every_s
        self.bar = None
        self.lines = is_main and enabled != "never"
        self.last_line = -math.inf
        if self.lines and (enabled == "always" or sys.stderr.isatty()):
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
            self.lines = False

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def interval(self, record: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            return
        now = time.monotonic()
        last = record["step"] == self.total
        if self.lines and (now - self.last_line >= self.every_s or last):
            self.last_line = now
            log.info(
                "step %d/%d (%.0f%%): loss %.4f, lr %.2e, %.0f img/s",
                record["step"],
                self.total,
                100 * record["step"] / self.total,
                record["loss"],
                record["lr"],
                record["img_per_s"],
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
