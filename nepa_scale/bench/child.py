"""One case, in a process of its own (``python -m nepa_scale.bench.child CASE_JSON``): built as
``nepa-scale train`` builds a run, timed with the loop's own ``Trainer.train_step``."""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Any

import torch
import torch._dynamo.utils

from nepa_scale.bench.case import PHASES, RESULT_PREFIX, BenchCase, case_config
from nepa_scale.bench.device import profile_steps
from nepa_scale.engine.metrics import PhaseTimer, max_memory_gb
from nepa_scale.engine.settings import resolve_step_settings
from nepa_scale.engine.trainer import Trainer


class PlainEngine:
    """The training step without DeepSpeed, for the engine-overhead comparison: fp32 weights, bf16
    autocast on GPUs, fused AdamW, the same gradient clipping. Quacks like the DeepSpeed engine as far
    as ``Trainer.train_step`` is concerned."""

    def __init__(self, model, optimizer, scheduler, device, bf16: bool, clip_grad: float):
        self.module = model
        self.optimizer, self.scheduler, self.clip_grad = optimizer, scheduler, clip_grad
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def __call__(self, images):
        with self.autocast:
            return self.module(images.float())

    def backward(self, loss) -> None:
        loss.backward()

    def step(self) -> None:
        if self.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()


def loader_rate(trainer, batches: int = 8) -> float:
    """Images per second from the case's loader alone (no model): decode, augment, collate."""
    loader = trainer.batches(start_step=trainer.sampler.steps_per_epoch)  # epoch 1: not the timed batches
    next(loader)  # worker start-up
    start, images = time.perf_counter(), 0
    for _, batch in zip(range(batches), loader, strict=False):
        images += len(batch.labels)  # data.decode=device: still encoded (the device's part is in "data")
    return images / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(
    trainer: Trainer, engine, batches, case: BenchCase
) -> tuple[int, list[float], dict[str, float]]:
    """The warm-up steps, then ``case.repeats`` timed repeats of ``case.steps``: the next step, the
    images per second of each repeat and the seconds of each phase (summed over the repeats)."""
    device, step = trainer.world.device, 0
    for _ in range(case.warmup):
        trainer.train_step(engine, batches, step)
        step += 1
    sync(device)
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
        sync(device)
        img_per_s.append(trainer.meter.images / (time.perf_counter() - start))
        for phase, seconds in timer.totals().items():
            phases[phase] += seconds
    return step, img_per_s, phases


def predicted_memory_gb(trainer: Trainer, case: BenchCase) -> float | None:
    """The planner's memory model for the case (the plain loop's fp32 weights are not modelled)."""
    if case.engine != "deepspeed":
        return None
    settings = trainer.settings
    if settings.predicted_memory_gb is not None:  # known when grad_checkpointing=auto chose the blocks
        return settings.predicted_memory_gb
    return resolve_step_settings(
        trainer.config, trainer.arch, trainer.world.world_size, trainer.world.device.type, predict_memory=True
    ).predicted_memory_gb


def run_case(case: BenchCase) -> dict[str, Any]:
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
        step, img_per_s, phases = time_steps(trainer, engine, batches, case)
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
            "predicted_memory_gb": predicted_memory_gb(trainer, case),
            "checkpointed_blocks": settings.checkpointed_blocks,
            "loader_img_per_s": loader_img_s,
            "loader_img_per_s_per_worker": loader_img_s / max(1, case.num_workers),
            "compiled_graphs": graphs,
            "graph_breaks": graph_breaks,
            "loss_last": loss,
            "profile": profiled,
        }


if __name__ == "__main__":  # one case, in a child process of run_bench
    fields = json.loads(sys.argv[1])
    result = run_case(
        BenchCase(
            **{**fields, "overrides": tuple(fields["overrides"]), "settings": tuple(fields["settings"])}
        )
    )
    print(RESULT_PREFIX + json.dumps(result), flush=True)
