"""``sweep plan``: what each run will cost before anything is submitted.

Per run: C (training FLOPs of the run under its ``budget.flop_convention``), N (parameters, all of
them), D (images seen), the device-hours this design spends on it (a cooldown branch spends only
its cooldown: the trunk trained the rest), the predicted memory, the predicted step time and
scaling efficiency on the profile's nodes x GPUs, and the layout. Below the table: the sweep's
device-hours against the same runs trained independently, and against another sweep
(``--against``).

The step time is the step on one device plus the communication the backward pass does not hide
(nepa_scale/comm.py: what DeepSpeed sends per ZeRO stage, at the profile's bus bandwidths, with
its overlap assumption). The step on one device comes from the profile's ``bench_results`` (a
``nepa-scale bench`` case of the same model, FLOPs per image, precision and compilation: its
forward and backward scaled to the run's images per device, its optimizer phase as measured),
else from ``device_tflops``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nepa_scale.comm import Collective, StepTime, ZeroOptions, step_collectives, step_time, zero_options
from nepa_scale.config import ConfigError, RunConfig
from nepa_scale.engine.distributed import World, deepspeed_config
from nepa_scale.engine.settings import StepSettings, resolve_step_settings
from nepa_scale.engine.tasks import SegmentTask, planned_arch_and_flops
from nepa_scale.errors import DataError
from nepa_scale.launch.design import evaluation_flops, training_steps
from nepa_scale.launch.profiles import ClusterProfile
from nepa_scale.launch.sweep import PlannedRun, Sweep
from nepa_scale.models.arch import NepaArch
from nepa_scale.models.vit import NEPA
from nepa_scale.rundir import images_seen


@dataclass(frozen=True)
class RunPlan:
    run_id: str
    model: str
    design: str  # trunk | branch@STEP | "" (independent)
    params: int | None
    images: int | None
    flops: float | None  # C: the run's training FLOPs (a branch's include the trunk's steps before it)
    device_hours: float | None  # the whole run's
    spent_device_hours: float | None  # what this design spends on it (a branch: its cooldown)
    wall_hours: float | None
    memory_gb: float | None
    checkpointed: int | None  # blocks under activation checkpointing (auto: chosen for the profile's memory)
    layout: str  # nodes x devices per node
    error: str | None
    flops_budget: float | None = None  # budget.flops (IsoFLOP runs)
    timing: StepTime | None = None  # predicted step: one device's compute + exposed communication
    compute_source: str = ""  # where the one-device step comes from
    collectives: tuple[Collective, ...] = ()  # per step (nepa_scale/comm.py)
    world_size: int = 1
    eval_share: float | None = None  # the run's own evaluations' FLOPs / the training FLOPs it spends


CASE_KEYS = ("model", "engine", "precision", "flops_per_image", "zero_stage", "micro_batch", "compile")
PHASE_KEYS = ("data", "forward", "backward", "optimizer")


@functools.lru_cache(maxsize=8)
def _bench_cases(path: str) -> tuple[dict[str, Any], ...]:
    """A bench report's measured cases, each with the fields the planner reads (or a one-line error)."""
    try:
        cases = [r for r in json.loads(Path(path).read_text())["results"] if "error" not in r]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"bench_results: cannot read {path} as a nepa-scale bench report ({exc})") from None
    for i, case in enumerate(cases):
        missing = [k for k in CASE_KEYS if k not in case] + [
            f"phase_ms.{k}" for k in PHASE_KEYS if k not in case.get("phase_ms", {})
        ]
        if missing:
            raise ConfigError(f"bench_results: {path}: results[{i}] has no {', '.join(missing)}")
    return tuple(cases)


def measured_case(
    profile: ClusterProfile, config: RunConfig, flops_per_image: float, settings: StepSettings
) -> tuple[dict[str, Any], str] | None:
    """The bench case (and its file) that measured this run's step on one device: same model,
    FLOPs per image (the same shape), precision and compilation (compiled or not), on the
    DeepSpeed engine; then the same ZeRO stage if measured, a case of the recorded defaults (no
    ``--set``), and the micro-batch nearest the run's. None when the profile has none."""
    cases = [
        (case, path)
        for path in profile.bench_results
        for case in _bench_cases(path)
        if case["model"] == config.model.name
        and case["engine"] == "deepspeed"
        and case["precision"] == settings.precision
        and (case["compile"] != "none") == config.model.compiled
        and abs(case["flops_per_image"] / flops_per_image - 1) < 1e-6
    ]
    if not cases:
        return None
    return min(
        cases,
        key=lambda cp: (
            cp[0]["zero_stage"] != config.deepspeed.zero_stage,
            bool(cp[0].get("settings")),
            abs(cp[0]["micro_batch"] - settings.micro_batch),
        ),
    )


def one_device_step(
    config: RunConfig, arch: NepaArch, settings: StepSettings, flops_per_image: float, profile: ClusterProfile
) -> tuple[float, float, str]:
    """(step seconds, backward seconds, source) of the run's step on one device: all its
    micro-batches, no communication. Checkpointed blocks add their forward again to backward."""
    images = settings.micro_batch * settings.accumulation_steps
    found = measured_case(profile, config, flops_per_image, settings)
    if found is None:
        forward = images * flops_per_image / 3 / (profile.device_tflops * 1e12)  # 6N: 2N forward, 4N backward
        backward = 2 * forward + forward * settings.checkpointed_blocks / arch.depth
        return forward + backward, backward, f"{profile.device_tflops:g} TFLOP/s"
    case, path = found
    ms = case["phase_ms"]
    per = images / case["micro_batch"] / 1e3  # ms per bench micro-batch -> s per run step
    ckpt = settings.checkpointed_blocks - case.get("checkpointed_blocks", 0)
    recompute = ms["forward"] * ckpt / arch.depth
    backward = (ms["backward"] + recompute) * per
    step = (ms["data"] + ms["forward"]) * per + backward + ms["optimizer"] / 1e3
    source = f"bench {Path(path).name}: {case['model']} b{case['micro_batch']} z{case['zero_stage']} compile={case['compile']}"
    return step, backward, source


def planned_collectives(
    config: RunConfig, model: torch.nn.Module, world_size: int, settings: StepSettings, device_type: str
) -> tuple[list[Collective], ZeroOptions]:
    """A run's collectives per step, from the DeepSpeed config the trainer generates for it.
    ``model``: the run's model, on any device (meta for the planner), or DeepSpeed's module (under
    ZeRO-3 its parameters are partitioned: their full sizes are in ``ds_numel``)."""
    world = World(0, 0, world_size, torch.device(device_type), "nccl" if device_type == "cuda" else "gloo")
    zero = zero_options(deepspeed_config(config, world, settings, load_universal=False)["zero_optimization"])

    def size(module: torch.nn.Module) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters(recurse=False))

    modules = [n for n in (size(m) for m in model.modules()) if n]  # registration order: forward's
    element_bytes = 2 if settings.precision == "bf16" else 4
    accumulation = settings.accumulation_steps
    return step_collectives(sum(modules), world_size, accumulation, element_bytes, zero, modules), zero


def planned_model(config: RunConfig, arch: NepaArch):
    """The run's model on the meta device (shapes only): what its parameters and modules are."""

    with torch.device("meta"):
        if config.task == "segment":  # the pyramid and heads too
            return SegmentTask.new_model(config, arch, "sdpa")
        return NEPA(arch, attention="sdpa")


def plan_run(run: PlannedRun) -> RunPlan:
    r = run.resources
    per_node = r.gpus_per_node or r.tasks_per_node
    layout = f"{r.nodes}x{per_node} {'GPU' if r.gpus_per_node else 'CPU task'}"
    design = run.design
    model = str(run.config_data.get("model", {}).get("name", "?"))
    nothing = dict(params=None, images=None, flops=None, device_hours=None, spent_device_hours=None)
    unknown = dict(nothing, wall_hours=None, memory_gb=None, checkpointed=None, layout=layout)
    if run.config is None or run.error:  # invalid, or valid but not for this world size
        return RunPlan(run.run_id, model, design, **unknown, error=run.error)
    c = run.config
    arch, flops_per_image = planned_arch_and_flops(c)
    net = planned_model(c, arch)
    params = sum(p.numel() for p in net.parameters())
    try:
        steps = training_steps(c)
    except (DataError, OSError) as exc:  # an epochs budget needs the dataset's size
        error = str(exc) if str(exc).startswith("data") else f"data: {exc}"
        return RunPlan(run.run_id, model, design, **dict(unknown, params=params), error=error)
    images = images_seen(steps, c.budget.global_batch)
    flops = images * flops_per_image
    device_type = "cuda" if r.gpus_per_node else "cpu"
    # As the trainer will resolve them on a device of the profile's kind and memory.
    settings = resolve_step_settings(
        c, arch, r.world_size, device_type, memory_gb=r.device_memory_gb, predict_memory=True
    )
    compute_s, backward_s, source = one_device_step(c, arch, settings, flops_per_image, r)
    try:
        collectives, zero = planned_collectives(c, net, r.world_size, settings, device_type)
    except ConfigError as exc:  # DeepSpeed refuses the run's zero_optimization settings
        return RunPlan(run.run_id, model, design, **dict(unknown, params=params), error=str(exc))
    timing = step_time(
        collectives,
        r.world_size,
        compute_s=compute_s,
        backward_s=backward_s,
        accumulation=settings.accumulation_steps,
        bus_gbps=r.intra_node_gbps if r.nodes == 1 else r.inter_node_gbps,
        latency_s=r.collective_latency_us * 1e-6,
        overlap_comm=zero.overlap_comm,
    )
    device_hours = steps * timing.step_s * r.devices / 3600
    spent = device_hours * (steps - (run.branch_step or 0)) / steps
    eval_share = None
    if c.task == "pretrain":
        evaluation = evaluation_flops(c, steps, run.branch_step or 0, r.world_size, settings.micro_batch)
        spent_flops = flops * (steps - (run.branch_step or 0)) / steps
        eval_share = None if evaluation is None else evaluation / spent_flops
    return RunPlan(
        run.run_id,
        c.model.name,
        design,
        params,
        images,
        flops,
        device_hours,
        spent,
        spent / r.devices,
        settings.predicted_memory_gb,
        settings.checkpointed_blocks,
        layout,
        None,
        c.budget.flops,
        timing,
        source,
        tuple(collectives),
        r.world_size,
        eval_share,
    )


@dataclass(frozen=True)
class Totals:
    runs: int
    invalid: int
    spent: float  # device-hours this design spends
    independent: float  # device-hours of the same runs, each trained on its own


def totals(plans: list[RunPlan]) -> Totals:
    valid = [p for p in plans if not p.error]
    return Totals(
        len(plans),
        len(plans) - len(valid),
        sum(p.spent_device_hours for p in valid),
        sum(p.device_hours for p in valid),
    )


def _hours(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _seconds(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def comm_lines(p: RunPlan) -> list[str]:
    """``sweep plan --comm``: the run's collectives per step and where its step time goes."""
    t = p.timing
    if t is None:
        return []
    lines = [
        f"    step {1e3 * t.step_s:,.1f} ms = one device {1e3 * t.compute_s:,.1f} ms ({p.compute_source}) "
        f"+ exposed communication {1e3 * t.exposed_s:,.1f} ms of {1e3 * t.comm_s:,.1f} ms"
    ]
    for c in p.collectives:
        lines.append(
            f"    {c.op:<22} {c.what:<34} {c.calls:>5} calls {c.logged_bytes / 1e6:>9,.1f} MB logged "
            f"{c.bus_bytes(p.world_size) / 1e6:>9,.1f} MB through each link"
        )
    return lines


def plan_table(
    sweep: Sweep, against: Sweep | None = None, comm: bool = False, plans: list[RunPlan] | None = None
) -> str:
    """The plan of every run (``plans``, when already made), the totals, and what they assume."""
    plans = plans if plans is not None else [plan_run(run) for run in sweep.runs]
    head = (
        f"{'run id':<46} {'model':<10} {'design':<13} {'N params':>11} {'D images':>13} {'C FLOPs':>9} "
        f"{'dev-h':>9} {'wall-h':>8} {'mem GB':>7} {'ckpt':>4} {'step s':>7} {'eff':>5} {'eval%':>6}  layout"
    )
    lines = [f"warning: {w}" for w in sweep.warnings] + [head, "-" * len(head)]
    for p in plans:
        if p.error:
            lines.append(f"{p.run_id:<46} {p.model:<10} {p.design:<13} INVALID: {p.error}")
            continue
        lines.append(
            f"{p.run_id:<46} {p.model:<10} {p.design:<13} {p.params:>11,} {p.images:>13,} {p.flops:>9.2e} "
            f"{_hours(p.spent_device_hours):>9} {_hours(p.wall_hours):>8} {p.memory_gb:>7.1f} {p.checkpointed:>4} "
            f"{_seconds(p.timing.step_s):>7} {p.timing.efficiency:>5.2f} {_share(p.eval_share):>6}  {p.layout}"
        )
        if p.flops_budget is not None:
            lines[-1] += f"  (C {100 * (p.flops / p.flops_budget - 1):+.2f}% of budget {p.flops_budget:.3g})"
        if comm:
            lines += comm_lines(p)
    t = totals(plans)
    lines.append("-" * len(head))
    lines.append(f"{t.runs} runs ({t.invalid} invalid), {_hours(t.spent)} device-hours in all")
    if any(p.design.startswith("branch") for p in plans):
        saved = t.independent - t.spent
        lines.append(
            f"cooldown branches: the same runs trained independently would take {_hours(t.independent)} "
            f"device-hours; this design saves {_hours(saved)} ({100 * saved / t.independent:.0f}%)"
        )
    if against is not None:
        other = totals([plan_run(run) for run in against.runs])
        diff = other.spent - t.spent
        lines.append(
            f"against {against.path} ({other.runs} runs, {_hours(other.spent)} device-hours): "
            + (
                f"this design saves {_hours(diff)}"
                if diff >= 0
                else f"this design costs {_hours(-diff)} more"
            )
            + f" device-hours ({100 * abs(diff) / other.spent:.0f}%)"
        )
    profile = sweep.runs[0].resources if sweep.runs else None
    lines.append(
        "C: training FLOPs under each run's budget.flop_convention; N: all parameters; D: images seen; "
        "dev-h: device-hours this design spends on the run (GPU-hours on GPU profiles; a branch: its cooldown)"
    )
    if profile is not None:
        measured = sum(p.compute_source.startswith("bench") for p in plans if not p.error)
        valid = sum(not p.error for p in plans)
        lines.append(
            f"step s: predicted optimizer step = one device's step (measured by bench for {measured} of {valid} runs, "
            f"else {profile.device_tflops:g} TFLOP/s; --comm: which) + the communication backward does not hide "
            f"(nepa_scale/comm.py at {profile.intra_node_gbps:g} GB/s within a node, {profile.inter_node_gbps:g} GB/s "
            "per device across nodes); eff: throughput per device against one device alone"
        )
        lines.append(
            "mem GB: predicted peak per device (nepa_scale/memory.py); ckpt: blocks under activation checkpointing"
        )
        lines.append(
            "eval%: FLOPs of the run's own evaluations (held-out batches and diagnostics at every evaluation "
            "point, the probe's feature extraction at every probe point; forward only) / the training FLOPs this "
            "design spends on it ('-': the probe's data is not reachable from here, or not a pretraining run)"
        )
    return "\n".join(lines)
