"""``sweep plan``: what each run will cost before anything is submitted.

Per run: C (training FLOPs of the run under its ``budget.flop_convention``), N (parameters, all of
them), D (images seen), the device-hours this design spends on it (a cooldown branch spends only
its cooldown: the trunk trained the rest), the predicted memory and the layout. Below the table:
the sweep's device-hours against the same runs trained independently, and against another
sweep (``--against``).
"""

from __future__ import annotations

from dataclasses import dataclass

from nepa_scale.engine.settings import resolve_step_settings
from nepa_scale.engine.tasks import planned_arch_and_flops
from nepa_scale.errors import DataError
from nepa_scale.launch.design import training_steps
from nepa_scale.launch.sweep import PlannedRun, Sweep
from nepa_scale.models.zoo import count_params
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
    params = count_params(arch)["total"]
    if c.task == "segment":  # the pyramid and heads too (a meta model: shapes, no memory)
        import torch

        from nepa_scale.engine.tasks import SegmentTask

        with torch.device("meta"):
            params = sum(p.numel() for p in SegmentTask.new_model(c, arch, "sdpa").parameters())
    try:
        steps = training_steps(c)
    except (DataError, OSError) as exc:  # an epochs budget needs the dataset's size
        return RunPlan(run.run_id, model, design, **dict(unknown, params=params), error=f"data: {exc}")
    images = images_seen(steps, c.budget.global_batch)
    flops = images * flops_per_image
    device_hours = flops / (r.device_tflops * 1e12) / 3600
    spent = device_hours * (steps - (run.branch_step or 0)) / steps
    # As the trainer will resolve them on a device of the profile's kind and memory.
    settings = resolve_step_settings(
        c,
        arch,
        r.world_size,
        "cuda" if r.gpus_per_node else "cpu",
        memory_gb=r.device_memory_gb,
        predict_memory=True,
    )
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


def plan_table(sweep: Sweep, against: Sweep | None = None) -> str:
    plans = [plan_run(run) for run in sweep.runs]
    head = (
        f"{'run id':<46} {'model':<10} {'design':<13} {'N params':>11} {'D images':>13} {'C FLOPs':>9} "
        f"{'dev-h':>9} {'wall-h':>8} {'mem GB':>7} {'ckpt':>4}  layout"
    )
    lines = [f"warning: {w}" for w in sweep.warnings] + [head, "-" * len(head)]
    for p in plans:
        if p.error:
            lines.append(f"{p.run_id:<46} {p.model:<10} {p.design:<13} INVALID: {p.error}")
            continue
        lines.append(
            f"{p.run_id:<46} {p.model:<10} {p.design:<13} {p.params:>11,} {p.images:>13,} {p.flops:>9.2e} "
            f"{_hours(p.spent_device_hours):>9} {_hours(p.wall_hours):>8} {p.memory_gb:>7.1f} {p.checkpointed:>4}  {p.layout}"
        )
        if p.flops_budget is not None:
            lines[-1] += f"  (C {100 * (p.flops / p.flops_budget - 1):+.2f}% of budget {p.flops_budget:.3g})"
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
        lines.append(
            f"estimates assume {profile.device_tflops:g} TFLOP/s achieved per device (profile {sweep.profile_name}); "
            "mem GB: predicted peak per device (nepa_scale/memory.py); ckpt: blocks under activation checkpointing"
        )
    return "\n".join(lines)
