"""Every GPU check in one short run, in order of value; each part writes its JSON to $OUT at once.

Round 2 of the performance work (the first round's loader and JPEG checks are in
docs/results/h100-2026-11-27/):

1. numerics on the GPU: SDPA vs the math reference (fp32), bf16 vs fp32, causality in bf16,
   compiled blocks vs eager in bf16, xformers vs SDPA where xformers loads;
2. ``nepa-scale bench``: S/B/L/H, bf16, ZeRO-2, compiled blocks, at the micro-batches the memory
   model fits in the card (on a 141 GB H200: 1536/512/256/128), one profiled step each;
3. L/14 in the plain PyTorch loop at the same micro-batch (the engine's cost; target <= 5%);
4. the levers on L/14, one bench each: RoPE in bf16, float8 linear layers (torchao), inductor's
   max-autotune without CUDA graphs, and ZeRO-2 without its gradient-norm pass (no clipping);
5. loss over 300 steps of the digits run in bf16: fp32 RoPE against bf16 RoPE and float8;
6. H/14 with float8;
7. a summary (``summary.json``): MFU per model against the measured matmul peak and the spec dense
   bf16 peak (989 TFLOP/s for H100/H200 SXM), the targets, the engine against the plain loop,
   each lever's img/s against L/14's baseline, and the loss differences.

    bash benchmarks/gpu_check.sh            # on the GPU machine (wheels prepared in .whl/)
    python benchmarks/gpu_check.py --smoke  # the same script on this CPU, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

OUT = Path(os.environ.get("OUT", "."))
REPO = Path(__file__).resolve().parents[1]


def section(name: str) -> None:
    print(f"\n=== {name} [{time.strftime('%H:%M:%S')}]", flush=True)


def numerics(device: str, model_name: str, image_size: int) -> dict:
    import copy

    from nepa_scale.engine.trainer import apply_compile
    from nepa_scale.models import create_model, resolve_backend
    from nepa_scale.models.attention import xformers_unavailable_reason
    from nepa_scale.objective import next_embedding_loss

    bf16 = torch.bfloat16
    result: dict = {
        "auto_backend_bf16": resolve_backend("auto", device, bf16),
        "xformers_reason": xformers_unavailable_reason(device, bf16),
    }
    torch.manual_seed(0)
    ref = create_model(model_name, attention="math").to(device).eval()
    images = torch.randn(4, 3, image_size, image_size, device=device)
    autocast = torch.autocast(device, dtype=bf16)
    with torch.no_grad():
        fp32 = ref(images).prediction
        ref.set_attention(backend="sdpa")
        sdpa32 = ref(images).prediction
        with autocast:
            sdpa16 = ref(images).prediction.float()
        changed = images.clone()
        half = image_size // 2
        changed[..., half:, :] += 1.0  # patches in the lower half change: the upper half's tokens must not
        first_changed = 1 + (half // ref.arch.patch_size) * ref.arch.grid
        with autocast:
            a, b = ref(images).prediction, ref(changed).prediction
        result["causal_prefix_unchanged_bf16"] = bool(torch.equal(a[:, :first_changed], b[:, :first_changed]))
        if result["xformers_reason"] is None:
            ref.set_attention(backend="xformers")
            with autocast:
                xf16 = ref(images).prediction.float()
            result["xformers_vs_sdpa_bf16_maxabs"] = (xf16 - sdpa16).abs().max().item()
    result.update(
        sdpa_vs_math_fp32_maxabs=(sdpa32 - fp32).abs().max().item(),
        bf16_autocast_vs_fp32_maxabs=(sdpa16 - fp32).abs().max().item(),
        bf16_cosine_to_fp32=torch.nn.functional.cosine_similarity(sdpa16.flatten(1), fp32.flatten(1))
        .min()
        .item(),
    )
    # compiled blocks vs eager, bf16 weights as DeepSpeed holds them: prediction, loss, gradients
    torch.manual_seed(0)
    eager = create_model(model_name, attention="sdpa").to(device, bf16).train()
    compiled = copy.deepcopy(eager)
    apply_compile(compiled, "blocks")
    outs = []
    for model in (eager, compiled):
        torch.manual_seed(1)
        out = model(images.to(bf16))
        loss = next_embedding_loss(out.prediction, out.target).loss
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
        outs.append((out.prediction.float().detach(), loss.item(), grads))
    (pe, le, ge), (pc, lc, gc) = outs
    result.update(
        compiled_vs_eager_bf16_pred_maxabs=(pc - pe).abs().max().item(),
        compiled_vs_eager_bf16_loss=[le, lc],
        compiled_vs_eager_bf16_grad_cosine=torch.nn.functional.cosine_similarity(gc, ge, dim=0).item(),
    )
    return result


TARGET_MFU = {"nepa_s14": 0.30, "nepa_b14": 0.40, "nepa_l14": 0.50, "nepa_h14": 0.50}  # issue 20's
GPUS_PER_NODE = 8


def load(name: str) -> dict | None:
    path = OUT / name
    return json.loads(path.read_text()) if path.exists() else None


def bench_rows(name: str) -> list[dict]:
    return [r for r in (load(name) or {}).get("results", []) if "error" not in r]


def final_eval_loss(run_dir: Path) -> float | None:
    from nepa_scale.rundir import RunDir

    evals = [r for r in RunDir(run_dir).read_metrics() if r.get("kind") == "eval"]
    return evals[-1]["val_loss"] if evals else None


def summary() -> dict:
    """The targets against what this run measured: MFU per model (measured and spec peaks), the
    engine against the plain loop, each lever against L/14's baseline, and the loss checks."""
    zoo, out = load("bench_zoo.json") or {}, {"matmul_peak_tflops": None, "spec_peak_tflops": None}
    rows = bench_rows("bench_zoo.json")
    out.update(matmul_peak_tflops=zoo.get("matmul_peak_tflops"), spec_peak_tflops=zoo.get("spec_peak_tflops"))
    print(
        f"{'model':<9} {'batch':>5} {'img/s':>7} {'MFU':>6} {'vs spec':>7} {'target':>6} {'met':>5} {'mem GiB':>7} {'pred':>6} {'busy':>5}"
    )
    for r in rows:
        target, busy = TARGET_MFU.get(r["model"]), (r.get("profile") or {}).get("device_busy")
        met = None if target is None else r["mfu"] >= target
        out[r["model"]] = {
            key: r.get(key)
            for key in (
                "micro_batch",
                "img_per_s",
                "mfu",
                "mfu_vs_spec",
                "peak_memory_gb",
                "predicted_memory_gb",
                "phase_ms",
            )
        } | {"target_mfu": target, "met": met, "device_busy": busy}
        print(
            f"{r['model']:<9} {r['micro_batch']:>5} {r['img_per_s']:>7.0f} {r['mfu']:>6.3f} {r['mfu_vs_spec'] or 0:>7.3f} "
            f"{target or 0:>6.2f} {str(met):>5} {r['peak_memory_gb']:>7.1f} {r['predicted_memory_gb'] or 0:>6.1f} "
            f"{'-' if busy is None else f'{100 * busy:.0f}%':>5}"
        )
    baseline = {r["model"]: r for r in rows}
    for p in bench_rows("bench_plain.json"):
        engine = baseline.get(p["model"])
        if engine and engine["micro_batch"] == p["micro_batch"]:
            cost = 1 - engine["img_per_s"] / p["img_per_s"]
            out.setdefault("engine_vs_plain", {})[p["model"]] = cost
            print(
                f"{p['model']}: DeepSpeed {engine['img_per_s']:.0f} img/s, plain {p['img_per_s']:.0f}: the engine costs {100 * cost:.1f}% (target <= 5%)"
            )
    for path in sorted(OUT.glob("lever_*.json")):
        lever = path.stem.removeprefix("lever_")
        for r in bench_rows(path.name):
            base = baseline.get(r["model"])
            gain = (
                r["img_per_s"] / base["img_per_s"] - 1
                if base and base["micro_batch"] == r["micro_batch"]
                else None
            )
            out.setdefault("levers", {})[f"{lever} {r['model']}"] = {
                "img_per_s": r["img_per_s"],
                "mfu": r["mfu"],
                "mfu_vs_spec": r["mfu_vs_spec"],
                "gain": gain,
            }
            print(
                f"lever {lever} on {r['model']}: {r['img_per_s']:.0f} img/s, MFU {r['mfu']:.3f} ({r['mfu_vs_spec'] or 0:.3f} of spec)"
                + ("" if gain is None else f", {100 * gain:+.1f}% against the baseline")
            )
    losses = {name: final_eval_loss(OUT / "loss_runs" / name) for name in LOSS_RUNS}
    if any(v is not None for v in losses.values()):
        out["final_eval_loss"] = losses
        print("final eval loss, digits 300 steps bf16: " + ", ".join(f"{k} {v}" for k, v in losses.items()))
    (OUT / "summary.json").write_text(json.dumps(out, indent=1))
    return out


class Deadline:
    """The whole script must end inside one device call: each part gets at most what is left, less
    the seconds kept for the summary, and a part with too little time left is skipped."""

    def __init__(self, seconds: float, reserve: float = 15.0) -> None:
        self.end, self.reserve = time.time() + seconds, reserve

    def timeout(self, wanted: float, least: float = 45.0) -> float | None:
        left = self.end - self.reserve - time.time()
        return min(wanted, left) if left >= least else None


def run_part(name: str, cmd: list[str], wanted: float, deadline: Deadline) -> None:
    timeout = deadline.timeout(wanted)
    if timeout is None:
        print(f"{name}: skipped, too little of the time budget left", flush=True)
        return
    print(" ".join(cmd), f"(at most {timeout:.0f} s)", flush=True)
    # its own process group: a stopped part takes its case processes and loader workers with it,
    # so nothing it started keeps the GPU busy under the next part's timings
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        print(f"{name}: stopped after {timeout:.0f} s (what finished is in its JSON)", flush=True)


def bench(out_name: str, args: list[str], wanted: float, deadline: Deadline) -> None:
    cmd = [sys.executable, "-m", "nepa_scale.cli", "bench", "--out", str(OUT / out_name), *args]
    run_part(f"bench {out_name}", cmd, wanted, deadline)


# One bench per lever on L/14 (and float8 on H/14 too): --set/--override options for `nepa-scale bench`.
LEVERS = {
    "rope_bf16": ["--override", "rope_dtype=bf16"],
    "float8": ["--set", "model.float8=true"],
    "autotune": ["--set", "model.compile_mode=max-autotune-no-cudagraphs"],
    "no_grad_norm": [
        "--set",
        "optim.clip_grad=0",
        "--set",
        "deepspeed.extra.zero_optimization.compute_grad_norm=false",
    ],
}
# 300 steps of configs/digits_tiny.yaml in bf16 on the GPU: the loss each lever gives.
LOSS_RUNS = {
    "baseline": [],
    "rope_bf16": ["model.overrides.rope_dtype=bf16"],
    "float8": ["model.float8=true"],
}


def loss_runs(smoke: bool, deadline: Deadline) -> None:
    for name, sets in LOSS_RUNS.items():
        cmd = [sys.executable, "-m", "nepa_scale.cli", "train", str(REPO / "configs" / "digits_tiny.yaml")]
        cmd += [
            f"output_dir={OUT / 'loss_runs' / name}",
            "deepspeed.precision=bf16",
            "logging.progress=never",
            *sets,
        ]
        if smoke:  # CPU float8 is an emulation: a few steps of a narrow model
            cmd += [
                "budget.images=640",
                "logging.eval_every=5",
                "model.overrides.dim=32",
                "model.overrides.num_heads=2",
            ]
        run_part(f"loss run {name}", cmd, 60, deadline)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: check this script runs")
    parser.add_argument("--budget", type=float, default=480, help="seconds the whole script may take")
    args = parser.parse_args()
    deadline = Deadline(args.budget)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.time()

    section("numerics")
    model, size = ("nepa_tiny", 16) if args.smoke else ("nepa_b14", 224)
    result = numerics(device, model, size)
    print(json.dumps(result, indent=1), flush=True)
    (OUT / "numerics.json").write_text(json.dumps(result, indent=1))

    section("bench: the zoo, bf16, ZeRO-2, compiled blocks, the micro-batches that fit")
    if args.smoke:
        timing = ["--steps", "2", "--repeats", "1", "--warmup", "1"]
        zoo = ["--models", "nepa_tiny", "--batch", "32", *timing]
        large = [
            "--models",
            "nepa_tiny",
            "--batch",
            "8",
            *timing,
            "--override",
            "dim=32",
            "--override",
            "num_heads=2",
        ]
        huge = large
    else:
        timing = [
            "--steps",
            "6",
            "--repeats",
            "2",
            "--warmup",
            "3",
            "--workers",
            "10",
            "--case-timeout",
            "120",
        ]
        zoo = ["--models", "nepa_s14,nepa_b14,nepa_l14,nepa_h14", "--batch", "1536,512,256,128", *timing]
        large = ["--models", "nepa_l14", "--batch", "256", *timing]
        huge = ["--models", "nepa_h14", "--batch", "128", *timing]
    bench("bench_zoo.json", [*zoo, "--zero", "2", "--compile", "blocks", "--profile", "1"], 240, deadline)

    section("bench: L/14 in a plain PyTorch loop (the engine's cost)")
    bench("bench_plain.json", [*large, "--engine", "plain", "--compile", "blocks"], 60, deadline)

    for lever, options in LEVERS.items():
        section(f"lever on L/14: {lever}")
        bench(f"lever_{lever}.json", [*large, "--zero", "2", "--compile", "blocks", *options], 75, deadline)

    section("loss: 300 steps of the digits in bf16, fp32 RoPE vs bf16 RoPE vs float8")
    loss_runs(args.smoke, deadline)

    section("lever on H/14: float8")
    bench(
        "lever_float8_h14.json",
        [*huge, "--zero", "2", "--compile", "blocks", *LEVERS["float8"]],
        90,
        deadline,
    )

    section("summary: the targets")
    summary()
    print(f"\ngpu_check finished in {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
