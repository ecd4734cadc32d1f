"""The interface every task implements, and what the tasks share.

The trainer owns everything the tasks share (DeepSpeed engine, data order, checkpoints, resume,
preemption, metrics). A task gets a narrow ``TaskContext`` (config, arch, world, step settings,
evaluator), never the trainer, and decides the model, the optimizer groups, the
training and evaluation data, the loss of one micro-batch, and what "evaluate" means. It writes
nothing: ``evaluate`` returns an ``Evaluation``, whose metrics the metrics writer logs, whose score
the checkpointer keeps the best EMA weights by, and whose detailed record the writer keeps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from timm.optim import param_groups_layer_decay

from nepa_scale.config import RunConfig
from nepa_scale.data import build_dataset
from nepa_scale.engine.distributed import World
from nepa_scale.engine.evaluator import Evaluator
from nepa_scale.engine.export import EXPORTED, stale_export
from nepa_scale.engine.settings import StepSettings
from nepa_scale.errors import ConfigError
from nepa_scale.flops import train_flops_per_image
from nepa_scale.models import NEPA
from nepa_scale.models.arch import NepaArch
from nepa_scale.models.official import load_weights

if TYPE_CHECKING:  # type hints only
    from nepa_scale.engine.ema import Ema

log = logging.getLogger("nepa_scale.train")


@dataclass(frozen=True)
class TaskContext:
    config: RunConfig
    arch: NepaArch  # the task's architecture (resolve_arch)
    world: World
    settings: StepSettings
    evaluator: Evaluator


@dataclass
class Evaluation:
    """What one evaluation found. ``metrics``: the values of the run's eval line; ``best_score``:
    the number the best EMA weights are kept by (higher is better; None: no kept-best weights);
    ``record``: a fuller record kept as RUN_DIR/``record_file`` (the newest evaluation's)."""

    metrics: dict[str, Any] = field(default_factory=dict)
    best_score: float | None = None
    record: dict[str, Any] | None = None
    record_file: str | None = None


class Task(Protocol):
    """One kind of run. The class attributes and static methods are asked before a trainer exists
    (the planner sizes runs from them); the rest is called by the trainer on every rank."""

    name: ClassVar[str]  # config's ``task``
    eval_each_epoch: ClassVar[bool]  # evaluate at each epoch's end besides logging.eval_every
    eval_at_start: bool  # evaluate before the first step

    def __init__(self, ctx: TaskContext) -> None: ...

    @staticmethod
    def resolve_arch(config: RunConfig) -> NepaArch:
        """The architecture the task trains (the zoo's, with its head, attention and crop)."""
        ...

    @staticmethod
    def flops_per_image(config: RunConfig, arch: NepaArch) -> float:
        """Training FLOPs per image under the run's convention (nepa_scale/flops.py)."""
        ...

    @staticmethod
    def train_dataset(config: RunConfig, arch: NepaArch): ...

    @staticmethod
    def val_dataset(config: RunConfig, arch: NepaArch): ...

    def build_model(self) -> torch.nn.Module:
        """The model at its initialisation (pretrained weights loaded where the config says)."""
        ...

    def optimizer_groups(self, model: torch.nn.Module, peak_lr: float) -> list[dict]: ...

    def micro_step(
        self, engine, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one micro-batch and the statistics to log (means over the interval)."""
        ...

    def annotate(self, record: dict) -> None:
        """Add the task's judgement to a train record (e.g. NEPA's collapse flag)."""
        ...

    def evaluate(self, engine, ema: Ema | None, step: int) -> Evaluation:
        """Every rank calls it; the metrics are the same on every rank."""
        ...


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and [CLS]); none on biases, norms and LayerScale (ndim <= 1)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def layer_decay_groups(
    model: torch.nn.Module, peak_lr: float, weight_decay: float, layer_decay: float
) -> list[dict]:
    """timm's layer-wise lr decay groups (the model's ``group_matcher``); each group's lr is the peak
    lr times its scale."""
    groups = param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=layer_decay)
    for group in groups:
        group["lr"] = peak_lr * group["lr_scale"]
    return groups


def load_pretrained(backbone: NEPA, pretrained: str | None, ema: bool, key: str) -> None:
    """Backbone weights from a file (ours or the official layout) or a run directory's export/; the
    pretraining head, if any, is left out and a missing QK-norm is filled with identity."""
    if not pretrained:
        return
    path = Path(pretrained)
    if path.is_dir():
        stale = stale_export(path)
        if stale is not None:  # weights of another step than the run's newest: refused, never taken silently
            held, newest = stale
            exported = path / "export" / EXPORTED
            if held is not None:
                what = f"the export of step {held}"
            elif exported.exists():
                what = f"no readable export ({exported} is not a safetensors file with its step)"
            else:
                what = "no export"
            raise ConfigError(
                f"{key}: {path} has {what}, but its newest "
                f"checkpoint is step {newest}: run `nepa-scale export {path}` first"
            )
        path = path / "export" / ("model_ema.safetensors" if ema else "model.safetensors")
    load_weights(backbone, path, head="ignore", qk_norm="fill")
    log.info("initialised from %s", path)


def backbone_flops(config: RunConfig, arch: NepaArch) -> float:
    """Training FLOPs per image under the run's convention (nepa_scale/flops.py)."""
    return train_flops_per_image(arch, config.budget.flop_convention)


def image_val_dataset(config: RunConfig, arch: NepaArch):
    """The val split with evaluation transforms: what pretraining and fine-tuning evaluate on."""
    return build_dataset(config.data, "val", arch.image_size, train=False)
