"""``sweep plan``: what each run will cost before anything is submitted."""

from __future__ import annotations

from dataclasses import dataclass

from nepa_scale.engine.settings import resolve_step_settings
from nepa_scale.errors import DataError
from nepa_scale.flops import train_flops_per_image
from nepa_scale.launch.design import training_steps
from nepa_scale.launch.sweep import PlannedRun, Sweep
from nepa_scale.models.zoo import count_params
from nepa_scale.rundir import images_seen


@dataclass(frozen=True)
class RunPlan:
    run_id: str
    model: str
    params: int | None
    images: int | None
    flops: float | None
    device_hours: float | None
    wall_hours: float | None
    memory_gb: float | None
    checkpointed: int | None  # blocks under activation checkpointing (auto: chosen for the profile's memory)
    layout: str  # nodes x devices per node
    error: str | None


def plan_run(run: PlannedRun) -> RunPlan:
    r = run.resources
    per_node = r.gpus_per_node or r.tasks_per_node
    layout = f"{r.nodes}x{per_node} {'GPU' if r.gpus_per_node else 'CPU task'}"
    if run.config is None or run.error:  # invalid, or valid but not for this world size
        model = str(run.config_data.get("model", {}).get("name", "?"))
        return RunPlan(run.run_id, model, None, None, None, None, None, None, None, layout, run.error)
    c = run.config
    arch = c.model.arch()
    params = count_params(arch)["total"]
    flops_per_image = train_flops_per_image(arch, c.budget.flop_convention)
    try:
        images = images_seen(training_steps(c), c.budget.global_batch)
    except (DataError, OSError) as exc:  # an epochs budget needs the dataset's size
        return RunPlan(
            run.run_id, c.model.name, params, None, None, None, None, None, None, layout, f"data: {exc}"
        )
    flops = images * flops_per_image
    device_hours = flops / (r.device_tflops * 1e12) / 3600
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
        params,
        images,
        flops,
        device_hours,
        device_hours / r.devices,
        settings.predicted_memory_gb,
        settings.checkpointed_blocks,
        layout,
        None,
    )


def plan_table(sweep: Sweep) -> str:
    plans = [plan_run(run) for run in sweep.runs]
    head = f"{'run id':<46} {'model':<10} {'params':>11} {'images':>12} {'FLOPs':>9} {'dev-h':>8} {'wall-h':>7} {'mem GB':>7} {'ckpt':>4}  layout"
    lines = [head, "-" * len(head)]
    for p in plans:
        if p.error:
            lines.append(f"{p.run_id:<46} {p.model:<10} INVALID: {p.error}")
            continue
        lines.append(
            f"{p.run_id:<46} {p.model:<10} {p.params:>11,} {p.images:>12,} {p.flops:>9.2e} "
            f"{p.device_hours:>8.2f} {p.wall_hours:>7.2f} {p.memory_gb:>7.1f} {p.checkpointed:>4}  {p.layout}"
        )
    valid = [p for p in plans if not p.error]
    profile = sweep.runs[0].resources if sweep.runs else None
    total = sum(p.device_hours for p in valid)
    lines.append("-" * len(head))
    lines.append(
        f"{len(sweep.runs)} runs ({len(sweep.runs) - len(valid)} invalid), {total:.2f} device-hours in all; "
        f"FLOPs: training FLOPs under each run's budget.flop_convention"
    )
    if profile is not None:
        lines.append(
            f"estimates assume {profile.device_tflops:g} TFLOP/s achieved per device (profile {sweep.profile_name}); "
            "mem GB: predicted peak per device (nepa_scale/memory.py); ckpt: blocks under activation checkpointing"
        )
    return "\n".join(lines)
