"""GPU checks in one short run: environment, matmul peak, bf16 numerics, and the real training step.

Run through ``benchmarks/gpu_check.sh`` on a machine with one CUDA GPU. The training numbers come
from the same code path as ``nepa-scale train`` (DeepSpeed engine, synthetic 224-px images),
read back from each run's metrics.jsonl. Writes a JSON summary to $OUT (or ./gpu_check.json).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

OUT = Path(os.environ.get("OUT", "."))
REPO = Path(__file__).resolve().parents[1]
summary: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def section(name: str) -> None:
    print(f"\n=== {name}", flush=True)


def environment() -> None:
    section("environment")
    import deepspeed

    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    summary["env"] = {
        "gpu": smi,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "deepspeed": deepspeed.__version__,
        "python": sys.version.split()[0],
    }
    print(summary["env"], flush=True)


def matmul_peak() -> None:
    section("bf16 matmul peak (8192^3)")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    tflops = 2 * 8192**3 * 20 / (start.elapsed_time(end) / 1e3) / 1e12
    summary["matmul_peak_tflops"] = tflops
    print(f"{tflops:.0f} TFLOP/s", flush=True)


def numerics() -> None:
    section("numerics: attention backends and bf16 on GPU")
    from nepa_scale.models import create_model, resolve_backend
    from nepa_scale.models.attention import xformers_unavailable_reason

    result = {
        "auto_backend_bf16": resolve_backend("auto", "cuda", torch.bfloat16),
        "xformers_reason": xformers_unavailable_reason("cuda", torch.bfloat16),
    }
    torch.manual_seed(0)
    ref = create_model("nepa_b14", attention="math").cuda().eval()
    images = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad():
        fp32 = ref(images).prediction
        ref.set_attention(backend="sdpa")
        sdpa32 = ref(images).prediction
        with torch.autocast("cuda", dtype=torch.bfloat16):
            sdpa16 = ref(images).prediction.float()
        causal_ok = True
        changed = images.clone()
        changed[..., 112:, :] += 1.0  # rows of patches 128.. change: tokens <= 128 must not
        with torch.autocast("cuda", dtype=torch.bfloat16):
            a, b = ref(images).prediction, ref(changed).prediction
        causal_ok = bool(torch.equal(a[:, :129], b[:, :129]))
    result.update(
        sdpa_vs_math_fp32_maxabs=(sdpa32 - fp32).abs().max().item(),
        bf16_autocast_vs_fp32_maxabs=(sdpa16 - fp32).abs().max().item(),
        bf16_cosine_to_fp32=torch.nn.functional.cosine_similarity(sdpa16.flatten(1), fp32.flatten(1))
        .min()
        .item(),
        causal_prefix_unchanged_bf16=causal_ok,
    )
    summary["numerics"] = result
    print(json.dumps(result, indent=1), flush=True)


def train_bench(model: str, batch: int, steps: int, zero: int = 2) -> dict:
    run_dir = Path("/tmp/gpu_runs") / f"{model}_z{zero}_b{batch}"
    shutil.rmtree(
        run_dir, ignore_errors=True
    )  # a finished run there would resume at its end and train nothing
    cmd = [
        sys.executable,
        "-m",
        "nepa_scale.cli",
        "train",
        str(REPO / "configs" / "digits_tiny.yaml"),
        f"output_dir={run_dir}",
        f"model.name={model}",
        "data.kind=synthetic",
        f"data.synthetic_size={batch * (steps + 1)}",
        "data.num_workers=10",
        f"budget.global_batch={batch}",
        f"budget.images={batch * steps}",
        f"deepspeed.zero_stage={zero}",
        "deepspeed.precision=bf16",
        "logging.log_every=10",
        "logging.eval_every=0",
        "logging.eval_batches=1",
        "checkpoint.every=100000",
        "logging.progress=never",
        "model.attention=auto",
    ]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = {
        "model": model,
        "batch": batch,
        "zero": zero,
        "steps": steps,
        "rc": proc.returncode,
        "wall_s": time.time() - start,
    }
    if proc.returncode != 0:
        out["error"] = proc.stderr[-1500:]
        return out
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if m.get("kind") == "train"][1:]  # the first interval holds warm-up
    img_s = sum(m["img_per_s"] for m in train) / len(train)
    per_image = json.loads((run_dir / "run.json").read_text())["flops_per_image"]
    out.update(
        img_per_s=img_s,
        tflops=img_s * per_image / 1e12,
        gflop_per_image=per_image / 1e9,
        mfu_vs_measured_peak=img_s * per_image / 1e12 / summary["matmul_peak_tflops"],
        max_memory_gb=max(m["max_memory_gb"] for m in train),
        data_wait_frac=train[-1]["data_wait_frac"],
        loss_last=train[-1]["loss"],
    )
    return out


def main() -> None:
    environment()
    matmul_peak()
    numerics()
    section("training step through DeepSpeed (bf16, ZeRO-2, eager, synthetic data)")
    summary["train"] = []
    for model, batch in (("nepa_s14", 256), ("nepa_b14", 256), ("nepa_l14", 128), ("nepa_h14", 64)):
        result = train_bench(model, batch, steps=30)
        summary["train"].append(result)
        print(json.dumps(result), flush=True)
        (OUT / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    (OUT / "gpu_check.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
