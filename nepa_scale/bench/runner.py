"""The benchmark: every case in a fresh process, one after the other, against the matmul peak
measured here; a table on the console and every result in a JSON file."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from nepa_scale.bench.case import ENGINES, RESULT_PREFIX, BenchCase, case_config, data_label
from nepa_scale.bench.device import environment, matmul_peak_tflops
from nepa_scale.engine.metrics import device_peak_tflops
from nepa_scale.engine.settings import resolve_precision
from nepa_scale.errors import ConfigError


def run_isolated(case: BenchCase, timeout_s: float | None) -> dict[str, Any]:
    """One case in a fresh process; a failure (out of memory, compile error) becomes the case's error."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):  # a single-process case
        env.pop(key, None)
    start = time.time()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "nepa_scale.bench.child", json.dumps(asdict(case))],
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
    try:
        cases = cases_from_args(args)
        validate_cases(cases)
    except ValueError as exc:
        print(f"nepa-scale bench: error: {exc}", file=sys.stderr)
        return 2
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(args.precision, device_type)
    env = environment()
    peak = matmul_peak_tflops(device_type, precision)
    spec = device_peak_tflops(torch.device(device_type), None)
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
