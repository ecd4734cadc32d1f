"""What a run optimises: NEPA pretraining, classification fine-tuning or semantic segmentation,
each a ``Task`` (tasks/base.py says what a task decides and what the trainer keeps for itself)."""

from __future__ import annotations

from nepa_scale.config import RunConfig
from nepa_scale.engine.tasks.base import Evaluation, Task, TaskContext, backbone_flops, layer_decay_groups
from nepa_scale.engine.tasks.finetune import FinetuneTask
from nepa_scale.engine.tasks.pretrain import PretrainTask
from nepa_scale.engine.tasks.segment import SegmentTask
from nepa_scale.models.arch import NepaArch

TASKS: dict[str, type[Task]] = {task.name: task for task in (PretrainTask, FinetuneTask, SegmentTask)}

__all__ = [
    "TASKS",
    "Evaluation",
    "FinetuneTask",
    "PretrainTask",
    "SegmentTask",
    "Task",
    "TaskContext",
    "layer_decay_groups",
    "planned_arch_and_flops",
]


def planned_arch_and_flops(config: RunConfig) -> tuple[NepaArch, float]:
    """The architecture a run trains and its training FLOPs per image as the trainer counts them,
    without reading data (for the planner: a fine-tune's head size is not in its convention)."""
    if config.task == "segment":
        arch = SegmentTask.resolve_arch(config)
        return arch, SegmentTask.flops_per_image(config, arch)
    arch = config.model.arch()
    return arch, backbone_flops(config, arch)
