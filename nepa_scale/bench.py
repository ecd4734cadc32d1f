"""``nepa-scale bench``: the real training step, timed, against this device's measured matmul peak.

Each case (model x attention backend x ZeRO stage x compile scope x engine x data decoder) runs in its own process
(an out-of-memory case does not end the benchmark, and every case starts with fresh peak-memory
counters and compile caches). A case builds the run exactly as ``nepa-scale train`` does
(``Trainer.build_engine``: model, compile, DeepSpeed engine; ``Trainer.batches``: the data) and
calls the loop's own ``Trainer.train_step``; ``engine: plain`` swaps DeepSpeed for a plain PyTorch step on the same
model (fp32 weights, bf16 autocast, fused AdamW) to measure what the engine costs.

Reported per case: img/s (median of the repeats, and their spread), achieved TFLOP/s under the
run's FLOP convention, MFU against the matmul peak measured here, peak memory, the step's
breakdown on the device timeline (data wait, forward, backward, optimizer), the loader's own rate
with the case's workers, and how many graphs torch.compile produced.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RESULT_PREFIX = "BENCH_RESULT "
ENGINES = ("deepspeed", "plain")
PHASES = ("data", "forward", "backward", "optimizer")


@dataclass(frozen=True)
class BenchCase:
    model: str
    micro_batch: int
    attention: str = "auto"
    zero_stage: int = 2
    compile: str = "none"
    engine: str = "deepspeed"
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    data: str = "synthetic"  # synthetic | digits | an ImageNet-style folder (root/train/<class>/*.jpg)
    decode: str = "cpu"  # for a folder: cpu (PIL in the workers) | device (data.decode=device)
    num_workers: int = 0
    steps: int = 10  # per repeat
    repeats: int = 3
    warmup: int = 3
    grad_checkpointing: str = "false"  # model.grad_checkpointing: false | true | N blocks | auto
    overrides: tuple[str, ...] = ()  # model.overrides as key=value, e.g. ("image_size=32",)
    profile: int = 0  # steps run under torch.profiler after the timed ones (0: none)
    settings: tuple[str, ...] = ()  # any run-config override KEY=VALUE, applied last (--set)

    def label(self) -> str:
        return (
            f"{self.model} {self.engine} z{self.zero_stage} {self.attention} compile={self.compile} "
            f"b{self.micro_batch} data={data_label(self.data, self.decode)}"
        ) + "".join(f" {item}" for item in self.settings)


def data_label(data: str, decode: str) -> str:
    return data if data in ("synthetic", "digits") else f"folder/{decode}"


# ----------------------------------------------------------------------------- device facts


def matmul_peak_tflops(device_type: str, dtype_name: str, size: int | None = None, repeats: int = 5) -> float:
    """The practical dense peak: square matmuls in the run's precision (bf16 on GPUs: 8192^3)."""
    import torch

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
    import platform

    import torch

    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "hostname": platform.node(),
    }
    try:
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    except ImportError:
        env["deepspeed"] = None
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


# ----------------------------------------------------------------------------- one case (child process)


class PlainEngine:
    """The training step without DeepSpeed, for the engine-overhead comparison: fp32 weights, bf16
    autocast on GPUs, fused AdamW, the same gradient clipping. Quacks like the DeepSpeed engine as far
    as ``Trainer.train_step`` is concerned."""

    def __init__(self, model, optimizer, scheduler, device, bf16: bool, clip_grad: float):
        import torch

        self.module = model
        self.optimizer, self.scheduler, self.clip_grad = optimizer, scheduler, clip_grad
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def __call__(self, images):
        with self.autocast:
            return self.module(images.float())

    def backward(self, loss) -> None:
        loss.backward()

    def step(self) -> None:
        import torch

        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()


def case_config(case: BenchCase, output_dir: str):
    from nepa_scale.config import load_config
    from nepa_scale.data import check_input_paths

    timed = case.warmup + case.steps * case.repeats + case.profile
    data = ["data.kind=synthetic", f"data.synthetic_size={case.micro_batch * (timed + 1)}"]
    if case.data == "digits":
        data = ["data.kind=digits", "data.crop_scale=[0.35,1.0]", "data.hflip=0.0"]
    elif case.data != "synthetic":
        data = ["data.kind=imagefolder", f"data.root={case.data}"]
    config = load_config(
        None,
        [
            f"model.name={case.model}",
            f"model.attention={case.attention}",
            f"model.compile={case.compile}",
            f"model.grad_checkpointing={case.grad_checkpointing}",
            *(f"model.overrides.{item}" for item in case.overrides),
            *data,
            f"data.decode={case.decode}",
            f"data.num_workers={case.num_workers}",
            f"budget.global_batch={case.micro_batch}",
            f"budget.images={case.micro_batch * timed}",  # the lr schedule spans the benchmark
            f"deepspeed.zero_stage={case.zero_stage}",
            f"deepspeed.precision={case.precision}",
            "logging.progress=never",
            f"output_dir={output_dir}",
            *case.settings,
        ],
    )
    check_input_paths(config)
    return config


def loader_rate(trainer, batches: int = 8) -> float:
    """Images per second from the case's loader alone (no model): decode, augment, collate."""
    loader = trainer.batches(start_step=trainer.sampler.steps_per_epoch)  # epoch 1: not the timed batches
    next(loader)  # worker start-up
    start, images = time.perf_counter(), 0
    for _, batch in zip(range(batches), loader, strict=False):
        images += len(batch.labels)  # data.decode=device: still encoded (the device's part is in "data")
    return images / (time.perf_counter() - start)


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
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

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


def run_case(case: BenchCase) -> dict[str, Any]:
    import torch
    import torch._dynamo.utils

    from nepa_scale.engine.metrics import PhaseTimer, max_memory_gb
    from nepa_scale.engine.settings import resolve_step_settings
    from nepa_scale.engine.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="nepa-bench-") as tmp:
        trainer = Trainer(case_config(case, tmp))
        counters = torch._dynamo.utils.counters  # the run's own graphs (the memory model compiles too)
        graphs_before = counters["stats"].get("unique_graphs", 0)
        device = trainer.world.device
        settings = trainer.settings
        if case.engine == "deepspeed":
            engine, _, _ = trainer.build_engine(resume=False)
        else:
            model = trainer.build_model().to(device)
            optimizer, scheduler = trainer.build_optimizer(model)  # the run's AdamW and lr schedule
            bf16 = settings.precision == "bf16"
            engine = PlainEngine(model, optimizer, scheduler, device, bf16, trainer.config.optim.clip_grad)
        loader_img_s = loader_rate(trainer)
        batches = trainer.batches()

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()

        step = 0
        for _ in range(case.warmup):
            trainer.train_step(engine, batches, step)
            step += 1
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timer = PhaseTimer(device)
        img_per_s, phases = [], dict.fromkeys(PHASES, 0.0)
        for _ in range(case.repeats):
            trainer.meter.reset()
            timer.start()
            start = time.perf_counter()
            for _ in range(case.steps):
                trainer.train_step(engine, batches, step, timer)
                step += 1
            sync()
            img_per_s.append(trainer.meter.images / (time.perf_counter() - start))
            for phase, seconds in timer.totals().items():
                phases[phase] += seconds
        loss = trainer.meter.means()["loss"].item()
        peak_memory = max_memory_gb(device)
        profiled = None
        if case.profile:
            more_steps = itertools.count(step)
            try:  # a profiler that cannot run here (no CUPTI, say) costs the case its profile only
                profiled = profile_steps(
                    lambda: trainer.train_step(engine, batches, next(more_steps)), device, case.profile
                )
            except Exception as exc:
                profiled = {"error": f"{type(exc).__name__}: {exc}"}
        params = sum(p.numel() for p in engine.module.parameters())
        graphs = int(counters["stats"].get("unique_graphs", 0) - graphs_before)
        graph_breaks = int(sum(counters["graph_break"].values()))
        predicted = None
        if case.engine == "deepspeed":  # the planner's model (the plain loop's fp32 weights are not modelled)
            predicted = settings.predicted_memory_gb  # known when grad_checkpointing=auto chose the blocks
            if predicted is None:
                predicted = resolve_step_settings(
                    trainer.config, trainer.arch, trainer.world.world_size, device.type, predict_memory=True
                ).predicted_memory_gb
        timed_steps = case.repeats * case.steps
        median = statistics.median(img_per_s)
        return {
            **asdict(case),
            "device": str(device),
            "precision": settings.precision,
            "attention_resolved": engine.module.blocks[0].attn.backend,
            "params": params,
            "flops_per_image": trainer.flops_per_image,
            "flop_convention": trainer.config.budget.flop_convention,
            "img_per_s": median,
            "img_per_s_repeats": img_per_s,
            "img_per_s_spread": (max(img_per_s) - min(img_per_s)) / median,
            "tflops_per_s": median * trainer.flops_per_image / 1e12,
            "step_ms": 1e3 * case.micro_batch / median,
            "phase_ms": {phase: 1e3 * seconds / timed_steps for phase, seconds in phases.items()},
            "peak_memory_gb": peak_memory,
            "peak_memory_kind": "max_memory_allocated" if device.type == "cuda" else "process max RSS",
            "predicted_memory_gb": predicted,
            "checkpointed_blocks": settings.checkpointed_blocks,
            "loader_img_per_s": loader_img_s,
            "loader_img_per_s_per_worker": loader_img_s / max(1, case.num_workers),
            "compiled_graphs": graphs,
            "graph_breaks": graph_breaks,
            "loss_last": loss,
            "profile": profiled,
        }


# ----------------------------------------------------------------------------- the benchmark (parent)


def run_isolated(case: BenchCase, timeout_s: float | None) -> dict[str, Any]:
    """One case in a fresh process; a failure (out of memory, compile error) becomes the case's error."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):  # a single-process case
        env.pop(key, None)
    start = time.time()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "nepa_scale.bench", json.dumps(asdict(case))],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {**asdict(case), "error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return {**json.loads(line[len(RESULT_PREFIX) :]), "case_wall_s": time.time() - start}
    errors = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    last = errors[-1].removeprefix("[rank0]: ") if errors else f"exit code {proc.returncode}"
    return {**asdict(case), "error": last}


def add_mfu(result: dict[str, Any], peak_tflops: float, spec_tflops: float | None) -> None:
    if "tflops_per_s" in result:
        result["mfu"] = result["tflops_per_s"] / peak_tflops
        result["mfu_vs_spec"] = result["tflops_per_s"] / spec_tflops if spec_tflops else None


def table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'model':<10} {'engine':<9} {'zero':>4} {'attention':<9} {'compile':<7} {'data':<13} {'batch':>5} "
        f"{'img/s':>8} {'±%':>4} {'TFLOP/s':>8} {'MFU':>6} {'mem GiB':>7} {'pred':>6} "
        f"{'data':>6} {'fwd':>6} {'bwd':>6} {'opt':>6} {'ms/step':>7} {'loader/s':>8} {'graphs':>6}"
    )
    lines = [head]
    for r in results:  # time columns: ms per step on the device timeline; loader/s: the loader alone
        zero = r["zero_stage"] if r["engine"] == "deepspeed" else "-"
        data = data_label(r["data"], r["decode"])
        first = f"{r['model']:<10} {r['engine']:<9} {zero:>4} {r['attention']:<9} {r['compile']:<7} {data:<13} {r['micro_batch']:>5} "
        if "error" in r:
            lines.append(first + f"ERROR: {r['error'][:120]}")
            continue
        ph = r["phase_ms"]
        predicted = "-" if r["predicted_memory_gb"] is None else f"{r['predicted_memory_gb']:.2f}"
        lines.append(
            first
            + f"{r['img_per_s']:>8.1f} {100 * r['img_per_s_spread']:>4.0f} {r['tflops_per_s']:>8.2f} {r['mfu']:>6.3f} "
            f"{r['peak_memory_gb']:>7.2f} {predicted:>6} {ph['data']:>6.1f} {ph['forward']:>6.1f} {ph['backward']:>6.1f} "
            f"{ph['optimizer']:>6.1f} {r['step_ms']:>7.1f} {r['loader_img_per_s']:>8.0f} {r['compiled_graphs']:>6}"
        )
    return "\n".join(lines)


def profile_summary(result: dict[str, Any]) -> str:
    prof = result["profile"]
    data = data_label(result["data"], result["decode"])
    head = f"profile {result['model']} {result['engine']} compile={result['compile']} data={data}: "
    if "error" in prof:
        return head + f"failed ({prof['error']})"
    if prof["device_busy"] is not None:
        head += (
            f"device busy {100 * prof['device_busy']:.0f}% of {prof['device_ms_per_step']:.1f} ms/step, "
            f"{prof['kernels_per_step']:.0f} kernels/step, {100 * prof['compiled_kernel_share']:.0f}% of kernel time compiled; "
        )
    costliest = ", ".join(f"{name[:48]} {ms:.1f}" for name, ms in prof["top"][:5])
    return head + f"{prof['top_unit']}: {costliest}"


def cases_from_args(args: argparse.Namespace) -> list[BenchCase]:
    try:
        batches = [int(b) for b in args.batch.split(",")]
        stages = [int(z) for z in args.zero.split(",")]
    except ValueError:
        raise ValueError(
            f"--batch and --zero take comma-separated integers, got '{args.batch}' and '{args.zero}'"
        ) from None
    models = args.models.split(",")
    if len(batches) not in (1, len(models)):
        raise ValueError(f"--batch: give one value or one per model ({len(models)}), got {args.batch}")
    per_model = dict(zip(models, batches * len(models) if len(batches) == 1 else batches, strict=False))
    overrides, settings = tuple(args.override or ()), tuple(args.set or ())
    for option, items in (("--override", overrides), ("--set", settings)):
        for item in items:
            if "=" not in item:
                raise ValueError(f"{option}: expected key=value, got '{item}'")
    cases = [
        BenchCase(
            model=model,
            micro_batch=per_model[model],
            attention=attention,
            zero_stage=zero if engine == "deepspeed" else 0,  # the plain loop has no ZeRO
            compile=scope,
            engine=engine,
            precision=args.precision,
            data=args.data,
            decode=decode,
            num_workers=args.workers,
            steps=args.steps,
            repeats=args.repeats,
            warmup=args.warmup,
            grad_checkpointing=args.grad_checkpointing,
            overrides=overrides,
            profile=args.profile,
            settings=settings,
        )
        for model, attention, zero, scope, engine, decode in itertools.product(
            models,
            args.attention.split(","),
            stages,
            args.compile.split(","),
            args.engine.split(","),
            args.decode.split(","),
        )
    ]
    return list(dict.fromkeys(cases))  # plain-loop cases repeat across --zero


def validate_cases(cases: list[BenchCase]) -> None:
    """Every value checked before any case starts: the bench's own options here, the run settings
    by the config's validation (one-line errors naming the option or the config key)."""
    from nepa_scale.config import ConfigError

    for case in cases:
        if case.profile < 0:
            raise ValueError(f"--profile: a number of steps >= 0, got {case.profile}")
        if case.engine not in ENGINES:
            raise ValueError(f"--engine: unknown engine '{case.engine}' (choose from {', '.join(ENGINES)})")
        if case.data not in ("synthetic", "digits") and not (Path(case.data) / "train").is_dir():
            raise ValueError(f"--data: no train/ folder under '{case.data}' (or use synthetic, digits)")
        try:
            case_config(case, "unused")  # builds and validates the run config
        except ConfigError as exc:
            raise ValueError(str(exc)) from None


def run_bench(args: argparse.Namespace) -> int:
    import torch

    from nepa_scale.engine.metrics import KNOWN_PEAK_TFLOPS

    try:
        cases = cases_from_args(args)
        validate_cases(cases)
    except ValueError as exc:
        print(f"nepa-scale bench: error: {exc}", file=sys.stderr)
        return 2
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    precision = args.precision if args.precision != "auto" else ("bf16" if device_type == "cuda" else "fp32")
    env = environment()
    peak = matmul_peak_tflops(device_type, precision)
    spec = next((v for k, v in KNOWN_PEAK_TFLOPS.items() if k in env["device"]), None)
    print(
        f"device: {env['device']} ({env['cpu_count']} CPUs), torch {env['torch']}, deepspeed {env['deepspeed']}; "
        f"measured {precision} matmul peak {peak:.2f} TFLOP/s" + (f" (spec {spec:.0f})" if spec else ""),
        flush=True,
    )
    results: list[dict[str, Any]] = []
    report = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": env,
        "matmul_peak_tflops": peak,
        "matmul_precision": precision,
        "spec_peak_tflops": spec,
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for case in cases:
        print(f"case: {case.label()} ...", flush=True)
        result = run_isolated(case, args.case_timeout)
        add_mfu(result, peak, spec)
        results.append(result)
        summary = result.get("error") or (
            f"{result['img_per_s']:.1f} img/s, {result['tflops_per_s']:.2f} TFLOP/s, MFU {result['mfu']:.3f}, "
            f"{result['peak_memory_gb']:.2f} GiB"
        )
        print(f"  {summary}", flush=True)
        out.write_text(json.dumps(report, indent=1))  # after every case: a cut-short run keeps its results
    print(table(results))
    for result in results:
        if result.get("profile"):
            print(profile_summary(result))
    print(f"written: {out}")
    return 1 if any("error" in r for r in results) else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="nepa_tiny", help="comma-separated zoo entries")
    parser.add_argument("--batch", default="64", help="micro-batch: one value, or one per model")
    parser.add_argument("--attention", default="auto", help="comma-separated: auto,sdpa,xformers,math")
    parser.add_argument("--zero", default="2", help="comma-separated ZeRO stages")
    parser.add_argument("--compile", default="none", help="comma-separated: none,blocks,model")
    parser.add_argument("--engine", default="deepspeed", help="comma-separated: deepspeed,plain")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--data", default="synthetic", help="synthetic | digits | an ImageNet-style folder")
    parser.add_argument("--decode", default="cpu", help="comma-separated, for a folder: cpu,device")
    parser.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps first (compilation happens here)"
    )
    parser.add_argument(
        "--grad-checkpointing", default="false", help="false | true | N (first N blocks) | auto (what fits)"
    )
    parser.add_argument("--override", action="append", help="model.overrides key=value, e.g. image_size=32")
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any run-config override for every case, e.g. deepspeed.overlap_comm=false",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        help="N: profile N more steps (device busy share, costliest kernels)",
    )
    parser.add_argument("--case-timeout", type=float, default=None, help="seconds per case")
    parser.add_argument("--out", default="bench.json", help="JSON report path")


if __name__ == "__main__":  # one case, in a child process of run_bench
    fields = json.loads(sys.argv[1])
    result = run_case(
        BenchCase(
            **{**fields, "overrides": tuple(fields["overrides"]), "settings": tuple(fields["settings"])}
        )
    )
    print(RESULT_PREFIX + json.dumps(result), flush=True)
