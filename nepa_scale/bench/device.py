"""The device's facts for a benchmark: its measured matmul peak, the versions, and what it did
during profiled steps."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from typing import Any

import deepspeed
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def matmul_peak_tflops(device_type: str, dtype_name: str, size: int | None = None, repeats: int = 5) -> float:
    """The practical dense peak: square matmuls in the run's precision (bf16 on GPUs: 8192^3)."""
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    size = size or (8192 if device_type == "cuda" else 2048)
    a = torch.randn(size, size, device=device_type, dtype=dtype)
    b = torch.randn(size, size, device=device_type, dtype=dtype)
    for _ in range(3):
        a @ b
    if device_type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device_type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "hostname": platform.node(),
    }
    env["deepspeed"] = deepspeed.__version__
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        env["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout else None
    else:
        env["device"] = "cpu"
    return env


def merged_length(intervals: list[tuple[int, int]]) -> int:
    """Total length covered by possibly overlapping [start, end) intervals (kernels on several streams)."""
    total, reach = 0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total, reach = total + end - start, end
        elif end > reach:
            total, reach = total + end - reach, end
    return total


def profile_steps(run_step, device, steps: int, top: int = 8) -> dict[str, Any]:
    """What the device did during ``steps`` more steps, from torch.profiler. On a GPU: the share of
    the device span it was busy (idle gaps mean the host cannot feed it: Python overhead,
    synchronisations), kernels per step, the share of device time in torch.compile's generated
    (triton) kernels, and the costliest kernels. On the CPU: the costliest operators by self time."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            run_step()
        if cuda:
            torch.cuda.synchronize()
    if not cuda:
        ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        return {
            "profiled_steps": steps,
            "device_busy": None,
            "top": [[op.key, op.self_cpu_time_total / 1e3 / steps] for op in ops[:top]],
            "top_unit": "ms per step, host operators' self time",
        }
    kernels = [
        (e.name(), e.start_ns(), e.duration_ns())
        for e in prof.profiler.kineto_results.events()
        if e.device_type() == DeviceType.CUDA
    ]
    return {"profiled_steps": steps, **device_profile(kernels, steps, top)}


def device_profile(kernels: list[tuple[str, int, int]], steps: int, top: int = 8) -> dict[str, Any]:
    """Kernels as (name, start ns, duration ns) -> the busy share of their span, kernels per step,
    the share of kernel time in torch.compile's (inductor's ``triton_*``) kernels, the costliest."""
    if not kernels:
        return {"device_busy": None, "top": [], "top_unit": "no device events"}
    spans = [(start, start + duration) for _, start, duration in kernels]
    span = max(end for _, end in spans) - min(start for start, _ in spans)
    by_name: dict[str, float] = {}
    for name, _, duration in kernels:
        by_name[name] = by_name.get(name, 0.0) + duration
    kernel_ns = sum(by_name.values())
    compiled_ns = sum(ns for name, ns in by_name.items() if name.startswith("triton_"))
    costliest = sorted(by_name.items(), key=lambda item: item[1], reverse=True)[:top]
    return {
        "device_busy": merged_length(spans) / span if span else None,
        "device_ms_per_step": span / 1e6 / steps,
        "kernels_per_step": len(kernels) / steps,
        "compiled_kernel_share": compiled_ns / kernel_ns if kernel_ns else 0.0,
        "top": [[name[:100], ns / 1e6 / steps] for name, ns in costliest],
        "top_unit": "ms per step, device kernels",
    }
