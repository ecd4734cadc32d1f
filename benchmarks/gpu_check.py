"""Every GPU check in one short run, in order of value; each part writes its JSON to $OUT at once.

1. numerics on the GPU: SDPA vs the math reference (fp32), bf16 vs fp32, causality in bf16,
   compiled blocks vs eager in bf16, xformers vs SDPA where xformers runs;
2. ``nepa-scale bench``: S/B/L/H, bf16, ZeRO-2, compiled blocks (the performance targets; the eager
   figures are in docs/performance.md, and the whole script must fit one 600 s device call), with
   one profiled step each (how busy the device is, how much kernel time is torch.compile's);
3. the same bench for L with the plain PyTorch loop (the engine's overhead);
4. the loader on real JPEG photographs with 1, 4 and 8 workers, and nvJPEG decoding on the device,
   from the photographs and from a copy resized to short side 256 (``nepa-scale resize-data``);
5. S/14 trained from those JPEGs, decoded in the workers or on the device (is data the bottleneck?);
6. a summary against the targets (``summary.json``): MFU per model, the engine against the plain
   loop, predicted memory, the profile, and loader workers per 8-GPU node at the target rates.

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


TARGET_MFU = {"nepa_s14": 0.25, "nepa_b14": 0.40, "nepa_l14": 0.50, "nepa_h14": 0.50}  # the issue's
GPUS_PER_NODE = 8


def load(name: str) -> dict | None:
    path = OUT / name
    return json.loads(path.read_text()) if path.exists() else None


def summary() -> dict:
    """The performance targets against what this run measured: MFU per model, the engine against
    the plain loop, memory predictions, the profile, and the loader against an 8-GPU node's needs."""
    zoo, plain, loader = load("bench_zoo.json"), load("bench_plain.json"), load("loader.json")
    rows, out = [r for r in (zoo or {}).get("results", []) if "error" not in r], {}
    print(
        f"{'model':<9} {'img/s':>7} {'MFU':>6} {'target':>6} {'met':>4} {'mem GiB':>7} {'pred':>6} {'busy':>5} {'compiled':>8}"
    )
    for r in rows:
        target, prof = TARGET_MFU.get(r["model"]), r.get("profile") or {}
        met = None if target is None else r["mfu"] >= target
        busy, share = prof.get("device_busy"), prof.get("compiled_kernel_share")
        out[r["model"]] = {
            "img_per_s": r["img_per_s"],
            "mfu": r["mfu"],
            "target_mfu": target,
            "met": met,
            "peak_memory_gb": r["peak_memory_gb"],
            "predicted_memory_gb": r["predicted_memory_gb"],
            "device_busy": busy,
            "compiled_kernel_share": share,
        }
        print(
            f"{r['model']:<9} {r['img_per_s']:>7.0f} {r['mfu']:>6.3f} {target or 0:>6.2f} {str(met):>4} "
            f"{r['peak_memory_gb']:>7.1f} {r['predicted_memory_gb'] or 0:>6.1f} "
            f"{'-' if busy is None else f'{100 * busy:.0f}%':>5} {'-' if share is None else f'{100 * share:.0f}%':>8}"
        )
    for p in [r for r in (plain or {}).get("results", []) if "error" not in r]:
        engine = next(
            (r for r in rows if r["model"] == p["model"] and r["micro_batch"] == p["micro_batch"]), None
        )
        if engine:
            cost = 1 - engine["img_per_s"] / p["img_per_s"]
            out.setdefault("engine_vs_plain", {})[p["model"]] = cost
            print(
                f"{p['model']}: DeepSpeed {engine['img_per_s']:.0f} img/s, plain loop {p['img_per_s']:.0f}: "
                f"the engine costs {100 * cost:.1f}% (target: at most 5%)"
            )
    if loader and rows:
        per_worker = {}
        for rate in loader["rates"]:  # the best per-worker rate of each output
            value = rate["img_per_s"] / rate["workers"]
            per_worker[rate["output"]] = max(per_worker.get(rate["output"], 0.0), value)
        for r in rows:
            if r["model"] not in ("nepa_s14", "nepa_b14"):
                continue
            need = TARGET_MFU[r["model"]] * zoo["matmul_peak_tflops"] * 1e12 / r["flops_per_image"]
            workers = {name: GPUS_PER_NODE * need / rate for name, rate in per_worker.items() if rate}
            gpu_decode = need / loader["device_decode"]["img_per_s"]
            resized = loader.get("device_decode_resized")
            out.setdefault("loader", {})[r["model"]] = {
                "img_per_s_per_gpu_at_target": need,
                "workers_per_node": workers,
                "device_decode_share_of_gpu_time": gpu_decode,
                "device_decode_share_resized": need / resized["img_per_s"] if resized else None,
            }
            print(
                f"{r['model']} at its target: {need:.0f} img/s per GPU; workers per {GPUS_PER_NODE}-GPU node: "
                + ", ".join(f"{name}: {n:.0f}" for name, n in workers.items())
                + f"; nvJPEG path would take {100 * gpu_decode:.0f}% of a GPU's time"
            )
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: check this script runs")
    parser.add_argument("--photos", default=str(REPO / ".whl" / "photos"), help="JPEGs for the loader check")
    parser.add_argument("--budget", type=float, default=500, help="seconds the whole script may take")
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

    section("bench: the zoo, bf16, ZeRO-2, compiled blocks")
    if args.smoke:
        zoo = ["--models", "nepa_tiny", "--batch", "32", "--steps", "2", "--repeats", "2", "--warmup", "1"]
    else:
        zoo = ["--models", "nepa_s14,nepa_b14,nepa_l14,nepa_h14", "--batch", "768,256,128,64"]
        zoo += ["--steps", "8", "--repeats", "2", "--warmup", "3", "--workers", "10", "--case-timeout", "150"]
    zoo += ["--profile", "1"]  # device busy share and compiled-kernel share: does compile take effect?
    bench("bench_zoo.json", [*zoo, "--zero", "2", "--compile", "blocks"], 300, deadline)

    section("bench: L/14 in a plain PyTorch loop (the engine's overhead)")
    plain = zoo[:]
    if not args.smoke:
        plain[1:4] = ["nepa_l14", "--batch", "128"]
    bench("bench_plain.json", [*plain, "--engine", "plain", "--compile", "blocks"], 120, deadline)

    section("loader: real JPEGs, decode + augment per worker, and nvJPEG on the device")
    jpegs = OUT / "jpegs" if args.smoke else Path("/tmp/nepa-jpegs")
    loader = [sys.executable, str(REPO / "benchmarks" / "loader.py"), "--photos", args.photos]
    loader += ["--keep", str(jpegs), "--images", "64" if args.smoke else "3072", "--resize", "256"]
    loader += ["--workers", "1,2"] if args.smoke else ["--workers", "1,4,8"]
    run_part("loader", loader, 150, deadline)

    section("bench: S/14 on those JPEGs, decoded by PIL in the workers or on the device")
    if args.smoke:
        real = [*zoo, "--override", "image_size=224", "--override", "patch_size=14", "--workers", "1"]
    else:
        real = ["--models", "nepa_s14", "--batch", "256", "--steps", "6", "--repeats", "1", "--warmup", "2"]
        real += ["--workers", "10"]
    real += ["--data", str(jpegs), "--decode", "cpu,device", "--compile", "blocks"]
    bench("bench_jpeg.json", real, 180, deadline)
    section("summary: the targets")
    summary()
    print(f"\ngpu_check finished in {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
